"""ReLU-L1 (Anthropic, April 2024): objective and gradients against a float64 reference, the L1
warm-up, the unconstrained-decoder init and policy, sparse inference, configs, checkpoints."""

import pytest
import torch

import flashsae
from flashsae import ReLUConfig, ReLUSAE
from helpers import assert_close
from sae_helpers import check_against_reference


def make_sae(dtype=torch.float64, **options):
    torch.manual_seed(13)
    sae = ReLUSAE(14, 70, dtype=dtype, **options)
    with torch.no_grad():  # decoder rows of different norms, biases, untied encoder
        sae.W_dec.mul_(torch.rand(70, 1, dtype=torch.float64).to(dtype) * 10 + 1)
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    return sae


def reference_objective(params, x, cfg: ReLUConfig, num_steps=0):
    """|x - x_hat|^2 summed over features, averaged over rows, + lambda(t) sum_i f_i |W_dec_i|."""
    W_enc, b_enc, W_dec, b_dec = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    f = (((x - b_dec) if cfg.apply_b_dec_to_input else x) @ W_enc.T + b_enc).relu()
    x_hat = f @ W_dec + b_dec
    sse = (x_hat - x).pow(2).sum()
    ramp = 1.0 if cfg.l1_warmup_steps == 0 else min(1.0, num_steps / cfg.l1_warmup_steps)
    l1 = (f * W_dec.norm(dim=1)).sum(1).mean()
    variance = (x - x.mean(0)).pow(2).sum()
    loss = sse / x.shape[0] + cfg.l1_coefficient * ramp * l1
    return {"x_hat": x_hat, "fvu": sse / variance, "mse": sse / x.numel(), "loss": loss}, f


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_forward_and_gradients_match_reference_float64(apply_b_dec):
    sae = make_sae(l1_coefficient=0.7, apply_b_dec_to_input=apply_b_dec)
    check_against_reference(sae, torch.randn(4, 11, 14, dtype=torch.float64), reference_objective)


def test_l1_warmup():
    sae = make_sae(l1_coefficient=2.0, l1_warmup_steps=3)
    x = torch.randn(16, 14, dtype=torch.float64)
    seen = []
    for step in range(5):
        assert int(sae.num_steps) == step
        seen.append(float(sae.l1_coefficient_now()))
        expected, _ = reference_objective(dict(sae.named_parameters()), x, sae.config, num_steps=step)
        assert_close(sae(x).loss, expected["loss"], torch.float64, f"loss at step {step}")
    assert seen == pytest.approx([0.0, 2 / 3, 4 / 3, 2.0, 2.0])
    sae.eval()
    sae(x)  # eval mode: not a training step
    assert int(sae.num_steps) == 5


def test_init_follows_the_update():
    sae = ReLUSAE(20, 64, decoder_init_norm=0.05)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 0.05))
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any() and not sae.b_dec.any()
    assert ReLUSAE.unit_norm_decoder is False and sae.unit_norm_decoder is False


def test_default_init_reconstructs_at_the_data_scale():
    # Adam moves every weight by ~lr per step, and flashsae train's lr is sized for unit rows: rows
    # of norm 0.1 (the former default) start with x_hat ~ 0.01 x and move 10x as fast relative to
    # their size. At the default norm the first training batch, cut to its target L0, already
    # reconstructs much of x (FVU 0.43 here; 0.1 gives 0.991).
    assert ReLUConfig(d_in=8, n_latents=32).decoder_init_norm == 1.0
    torch.manual_seed(5)
    x = torch.randn(1024, 64)
    for norm, low, high in ((None, 0.0, 0.6), (0.1, 0.98, 1.0)):
        torch.manual_seed(6)
        options = {} if norm is None else {"decoder_init_norm": norm}
        sae = flashsae.create("relu", d_in=64, n_latents=512, target_l0=32, **options)
        fvu = float(sae(x).fvu.detach())
        assert low <= fvu <= high, (norm, fvu)


def test_sparse_encode_gives_the_training_latents():
    sae = make_sae()
    x = torch.randn(33, 14, dtype=torch.float64)
    out = sae(x)
    latents = sae.encode(x)
    assert torch.equal(latents.indices, out.latents.indices)
    assert_close(latents.values, out.latents.values, torch.float64, "values")
    assert_close(sae.decode(latents), out.x_hat, torch.float64, "decode(encode(x))")
    counts = (latents.indices >= 0).sum(1)
    assert latents.values.shape[1] == int(counts.max()) and int(counts.min()) < int(counts.max())


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"l1_coefficient": -5.0}, r"l1_coefficient: expected a number >= 0"),
        ({"l1_warmup_steps": 1.5}, r"l1_warmup_steps: expected an int >= 0"),
        ({"decoder_init_norm": 0.0}, r"decoder_init_norm: expected a finite number > 0"),
        ({"apply_b_dec_to_input": 1}, r"apply_b_dec_to_input: expected True or False"),
        ({"d_in": 0}, r"d_in: expected a positive int"),
    ],
)
def test_bad_configs(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashsae.create("relu", **{"d_in": 8, "n_latents": 32, **kwargs})


def test_save_load_round_trip(tmp_path):
    sae = make_sae(dtype=torch.float32, l1_warmup_steps=100)
    x = torch.randn(25, 14)
    for _ in range(2):
        sae(x).loss.backward()
    sae.save(tmp_path / "relu")
    loaded = flashsae.load(tmp_path / "relu")
    assert type(loaded) is ReLUSAE and loaded.config == sae.config and int(loaded.num_steps) == 2
    for (name, p), q in zip(sae.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(loaded(x).loss, sae(x).loss)


def test_float32_and_bfloat16():
    sae = make_sae(dtype=torch.float32)
    x = torch.randn(30, 14)
    out = sae(x)
    params = {n: p.detach().double() for n, p in sae.named_parameters()}
    expected, _ = reference_objective(params, x.double(), sae.config)
    assert_close(out.loss, expected["loss"], torch.float32, "loss")
    low = make_sae(dtype=torch.bfloat16)
    out = low(x.bfloat16())
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in low.parameters())
