"""BatchTopK: BatchTopKSAE against a float64 reference of its objective, the running threshold, the
eval-mode threshold rule and its JumpReLU export, configs, checkpoints. The batch_topk op itself:
tests/ops/test_batch_topk.py."""

import importlib

import pytest
import torch

import flashsae
from flashsae import BatchTopKConfig, BatchTopKSAE, JumpReLUSAE
from helpers import RTOL, LargestTensorMode, assert_close
from sae_helpers import auxk_reference, batch_topk_activations
from sae_helpers import one_thread  # noqa: F401 - a fixture the tests request by name

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")


@pytest.mark.parametrize("first_candidates", [16, None], ids=["retry", "default"])
def test_training_step_never_materializes_batch_by_latents(first_candidates, monkeypatch):
    rows, d, n, k = 512, 32, 8192, 16
    monkeypatch.setattr(topk_encode_module, "TILE_ELEMENTS", 1 << 17)  # 256-latent tiles
    sae = BatchTopKSAE(d, n, k)
    if first_candidates is not None:
        sae._candidates = first_candidates  # the hint: too small, so the counting pass and re-encode run
    x = torch.randn(rows, d)
    with LargestTensorMode() as mode:
        out = sae(x, dead_mask=torch.rand(n) < 0.5)
        out.loss.backward()
    slots = out.latents.values.shape[-1]
    if first_candidates is None:
        # the largest tensors: [n, d] parameter gradients and [rows, 256 + 4k] encoder tiles
        assert mode.largest <= max(n * d, rows * (256 + 4 * k)), f"{mode.largest} from {mode.largest_op}"
    else:
        # the re-encode takes as many slots as a row has activations above the provisional cut
        # (an upper bound on its share): more than needed, far from [rows, n]
        assert slots > first_candidates, "the retry path did not run"
        assert mode.largest < rows * n // 4, f"{mode.largest} from {mode.largest_op}"


# -------------------------------------------------------------------------------------- the module


def make_sae(dtype=torch.float64, **options):
    torch.manual_seed(5)
    sae = BatchTopKSAE(20, 120, 4, aux_k=9, dtype=dtype, **options)
    with torch.no_grad():  # non-trivial biases, untied encoder
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)
    return sae


def reference_objective(params, x, k, aux_k, auxk_alpha, dead_mask=None):
    """BatchTopK's objective written plainly over dense float64 activations."""
    W_dec, b_dec = params["W_dec"], params["b_dec"]
    act, f = batch_topk_activations(params, x, k)
    x_hat = f @ W_dec + b_dec
    variance = (x - x.mean(0)).pow(2).sum()
    sse = (x_hat - x).pow(2).sum()
    fvu = sse / variance
    auxk = torch.zeros((), dtype=x.dtype)
    if dead_mask is not None:
        auxk = auxk_reference(act, dead_mask, aux_k, W_dec, x - x_hat) / variance
    return {"x_hat": x_hat, "fvu": fvu, "mse": sse / x.numel(), "auxk_loss": auxk, "loss": fvu + auxk_alpha * auxk}, f


@pytest.mark.parametrize("with_dead", [False, True])
def test_forward_and_gradients_match_reference_float64(with_dead):
    sae = make_sae(auxk_alpha=0.25)
    x = torch.randn(3, 16, 20, dtype=torch.float64)
    dead = torch.rand(120) < 0.3 if with_dead else None
    out = sae(x, dead_mask=dead)
    out.loss.backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    expected, f = reference_objective(params, x.reshape(-1, 20), 4, 9, 0.25, dead)
    expected["loss"].backward()
    for field in ("fvu", "mse", "auxk_loss", "loss"):
        assert_close(getattr(out, field), expected[field], torch.float64, field)
    assert_close(out.x_hat, expected["x_hat"].reshape(3, 16, 20), torch.float64, "x_hat")
    assert_close(out.latents.to_dense(120).reshape(-1, 120), f, torch.float64, "latents")
    if with_dead:
        assert out.auxk_loss > 0
    for name, p in sae.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float64, f"grad {name}")


def test_float32_matches_float64_reference():
    sae = make_sae(dtype=torch.float32)
    x = torch.randn(64, 20)
    out = sae(x)
    params = {n: p.detach().double() for n, p in sae.named_parameters()}
    expected, _ = reference_objective(params, x.double(), 4, 9, 1 / 32)
    assert_close(out.x_hat, expected["x_hat"], torch.float32, "x_hat")
    assert_close(out.fvu, expected["fvu"], torch.float32, "fvu")


def test_threshold_estimate_and_step_counter():
    sae = make_sae(threshold_beta=0.5, threshold_start_step=2)
    assert float(sae.threshold) == -1 and int(sae.num_steps) == 0
    x = torch.randn(32, 20, dtype=torch.float64)
    minima = []
    for step in range(4):
        out = sae(x * (1 + step / 4))  # a different smallest selected activation each step
        minima.append(float(out.latents.values.detach()[out.latents.indices >= 0].min()))
    assert len(set(minima)) == 4
    assert int(sae.num_steps) == 4
    # steps 0 and 1 are before threshold_start_step; step 2 sets the estimate, step 3 blends
    assert float(sae.threshold) == pytest.approx(0.5 * minima[2] + 0.5 * minima[3], rel=1e-12)
    with torch.no_grad():
        sae(x)  # no autograd: not a training step
    sae.eval()
    sae(x)  # eval mode: not a training step
    assert int(sae.num_steps) == 4


def test_eval_mode_applies_the_threshold():
    sae = make_sae()
    x = torch.randn(40, 20, dtype=torch.float64)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    sae.eval()
    out = sae(x, dead_mask=torch.ones(120, dtype=torch.bool))
    act = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).relu().detach()
    expected = act * (act > 0.3)
    assert_close(out.latents.to_dense(120), expected, torch.float64, "thresholded latents")
    assert out.auxk_loss == 0  # no AuxK at inference
    assert torch.equal(sae.encode(x).indices, out.latents.indices)
    # explicit choice of rule, whatever the mode
    assert int((sae.encode(x, use_threshold=False).indices >= 0).sum()) == 40 * 4
    sae.train()
    assert torch.equal(sae.encode(x, use_threshold=True).indices, out.latents.indices)


def test_decode_of_encode_is_forward_reconstruction():
    sae = make_sae(dtype=torch.float32)
    x = torch.randn(2, 10, 20)
    out = sae(x)
    assert out.latents.values.shape[:2] == (2, 10)
    assert_close(sae.decode(out.latents), out.x_hat.double(), torch.float32, "decode(latents)")


def test_to_jumprelu_gives_the_same_outputs_on_held_out_data(one_thread):
    from flashsae.synthetic import SyntheticDictionary

    data = SyntheticDictionary(16, 24, mean_active=3, seed=3)
    sae = BatchTopKSAE(16, 48, 3, threshold_start_step=5, threshold_beta=0.9)
    sae.init_b_dec_(data.sample(512))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(40):
        sae(data.sample(128)).loss.backward()
        opt.step()
        opt.zero_grad()
    sae.metadata = {"hookpoint": "layers.3"}
    jump = sae.to_jumprelu()
    assert isinstance(jump, JumpReLUSAE) and jump.config.apply_b_dec_to_input and jump.metadata == sae.metadata
    held_out = data.sample(1000)
    sae.eval()
    jump.eval()
    ours, theirs = sae(held_out), jump(held_out)
    assert torch.equal(ours.latents.indices, theirs.latents.indices)
    assert_close(theirs.latents.values, ours.latents.values.double(), torch.float32, "latent values")
    assert_close(theirs.x_hat, ours.x_hat.double(), torch.float32, "x_hat")
    l0 = (ours.latents.indices >= 0).sum(-1).double().mean()
    assert 1.5 < l0 < 6, f"the threshold should give about k = 3 active latents per row, got {l0:.2f}"


def test_to_jumprelu_needs_an_estimate():
    with pytest.raises(ValueError, match="threshold: not estimated yet"):
        make_sae().to_jumprelu()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"k": 0}, r"k: expected a positive int"),
        ({"k": 121}, r"k: expected 1 <= k <= n_latents"),
        ({"k": 4, "aux_k": 0}, r"aux_k: expected a positive int"),
        ({"k": 4, "auxk_alpha": -0.1}, r"auxk_alpha: expected a number >= 0"),
        ({"k": 4, "threshold_beta": 1.0}, r"threshold_beta: expected a number in \[0, 1\)"),
        ({"k": 4, "threshold_start_step": -1}, r"threshold_start_step: expected an int >= 0"),
    ],
)
def test_bad_configs(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashsae.create("batchtopk", d_in=20, n_latents=120, **kwargs)


def test_save_load_round_trip_keeps_schedule_state(tmp_path):
    sae = make_sae(dtype=torch.float32, threshold_start_step=0)
    x = torch.randn(50, 20)
    for _ in range(3):
        sae(x).loss.backward()
    sae.save(tmp_path / "sae")
    loaded = flashsae.load(tmp_path / "sae")
    assert type(loaded) is BatchTopKSAE and loaded.config == sae.config
    assert loaded.config == BatchTopKConfig(d_in=20, n_latents=120, k=4, aux_k=9, threshold_start_step=0)
    assert int(loaded.num_steps) == 3 and float(loaded.threshold) == float(sae.threshold) > 0
    for (name, p), q in zip(sae.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    sae.eval()
    loaded.eval()
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_runs(dtype):
    sae = make_sae(dtype=dtype)
    out = sae(torch.randn(30, 20, dtype=dtype), dead_mask=torch.rand(120) < 0.5)
    out.loss.backward()
    assert out.x_hat.dtype == dtype and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
    assert RTOL[dtype] > 0


def test_default_threshold_is_estimated_from_the_first_step():
    """A short run must not save an SAE without a threshold (it would encode every positive
    activation): with the defaults the first training step sets the estimate, later ones blend
    with beta 0.99."""
    sae = BatchTopKSAE(20, 120, 4, dtype=torch.float64)
    x = torch.randn(64, 20, dtype=torch.float64)
    smallest = []
    for scale in (1.0, 2.0):
        out = sae(x * scale)
        smallest.append(float(out.latents.values.detach()[out.latents.indices >= 0].min()))
        if scale == 1.0:
            assert float(sae.threshold) == smallest[0]
    assert float(sae.threshold) == pytest.approx(0.99 * smallest[0] + 0.01 * smallest[1], rel=1e-12)
