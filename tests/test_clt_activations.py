"""The trainable CLT activations (batchtopk, jumprelu, relu): forward, penalty and every gradient
(thresholds included) against a dense float64 CLT written in plain torch; the per-layer target-L0
controllers reaching their target on a synthetic problem and resuming exactly; BatchTopK's
per-layer inference thresholds; the JumpReLU export of a BatchTopK CLT."""

import copy

import pytest
import torch

import flashsae
from flashsae.modules.clt import CUT_SAMPLE_ROWS
from flashsae.modules.jumprelu import _JumpReLU, _Step
from flashsae.ops.batch_topk import batch_topk_reference
from helpers import assert_close, backends

L, D_IN, D_OUT, N, K = 3, 13, 11, 37, 5


def make_clt(activation, dtype=torch.float64, backend=None, **options):
    options = {"d_out": D_OUT, "k": K, "aux_k": 7, **options}
    clt = flashsae.create(
        "clt", n_layers=L, d_in=D_IN, n_latents=N, activation=activation, dtype=dtype, backend=backend, **options
    )
    with torch.no_grad():  # the zero init would make most gradients vanish: give every weight a value
        for name, p in clt.named_parameters():
            if name.startswith(("W_dec", "b_", "W_skip")):
                p.normal_(0, 0.3)
            elif name.startswith("threshold"):  # above bandwidth / 2 (see modules/slot_jumprelu.py)
                p.uniform_(0.3, 1.2)
    return clt


def dense_reference(params, x, y, activation, coefficient=0.0, bandwidth=None, k=K):
    """The CLT in plain float64 torch over dense [rows, n] latents: per layer relu / JumpReLU (the
    JumpReLU SAE's own dense estimators) / the batch's top rows * k, y_hat_j = b_dec_j + sum_{i<=j}
    f_i W_dec_i[:, j - i], loss = mean_j fvu_j + coefficient * sum_i S_i."""
    rows = x.shape[0]
    latents, penalty = [], torch.zeros((), dtype=x.dtype)
    for i in range(L):
        pre = x[:, i] @ params[f"W_enc_{i}"].T + params[f"b_enc_{i}"]
        if activation == "jumprelu":
            theta = params[f"threshold_{i}"]
            f = _JumpReLU.apply(pre, theta, bandwidth)
            penalty = penalty + _Step.apply(pre, theta, bandwidth).sum(1).mean()
        elif activation == "relu":
            f = pre.relu()
            penalty = penalty + (f * params[f"W_dec_{i}"].detach().norm(dim=1)).sum(1).mean()
        else:
            values, indices = batch_topk_reference(x[:, i], params[f"W_enc_{i}"], params[f"b_enc_{i}"], k)
            f = flashsae.SparseLatents(values, indices).to_dense(N)
        latents.append(f)
    outputs = []
    for j in range(L):
        total = params[f"b_dec_{j}"].expand(rows, D_OUT)
        for i in range(j + 1):
            total = total + latents[i] @ params[f"W_dec_{i}"].view(N, L - i, D_OUT)[:, j - i]
        outputs.append(total)
    y_hat = torch.stack(outputs, 1)
    fvu_per_layer = (y_hat - y).pow(2).sum(dim=(0, 2)) / (y - y.mean(0)).pow(2).sum(dim=(0, 2))
    loss = fvu_per_layer.mean() + coefficient * penalty
    return {"x_hat": y_hat, "latents": latents, "fvu_per_layer": fvu_per_layer, "loss": loss}


def check_against_reference(clt, x, y, dtype, **reference_options):
    torch.manual_seed(0)
    for p in clt.parameters():  # poisoned: a gradient never written stays NaN
        p.grad = torch.full_like(p, float("nan"))
    clt.zero_grad(set_to_none=True)
    out = clt(x, y)
    out.loss.backward()
    params = {n: p.detach().double().clone().requires_grad_(True) for n, p in clt.named_parameters()}
    expected = dense_reference(params, x.double(), y.double(), clt.activation, **reference_options)
    expected["loss"].backward()
    assert_close(out.x_hat, expected["x_hat"], dtype, "y_hat")
    assert_close(out.loss, expected["loss"], dtype, "loss")
    assert_close(out.fvu_per_layer, expected["fvu_per_layer"], dtype, "fvu_per_layer")
    for i in range(L):
        layer = flashsae.SparseLatents(out.latents.values[:, i], out.latents.indices[:, i])
        assert_close(layer.to_dense(N), expected["latents"][i], dtype, f"latents of layer {i}")
    for name, p in clt.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert_close(p.grad, params[name].grad, dtype, f"grad {name}")
    return out


@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_jumprelu_matches_the_dense_estimator_float64(backend):
    clt = make_clt("jumprelu", backend=backend, sparsity_coefficient=0.05, bandwidth=0.4)
    x, y = torch.randn(40, L, D_IN, dtype=torch.float64), torch.randn(40, L, D_OUT, dtype=torch.float64)
    out = check_against_reference(clt, x, y, torch.float64, coefficient=0.05, bandwidth=0.4)
    # the window (pre within eps / 2 of a threshold) held latents: the threshold gradients are not
    # only the reconstruction's through active ones
    assert all(bool(clt.threshold(i).grad.ne(0).any()) for i in range(L))
    assert out.sparsity_loss is not None and out.sparsity_loss > 0
    # reported latents are the active ones only (the window's inactive slots are not latents)
    assert bool(((out.latents.indices >= 0) == (out.latents.values > 0)).all())


@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_relu_matches_the_dense_l1_float64(backend):
    clt = make_clt("relu", backend=backend, sparsity_coefficient=0.03)
    x, y = torch.randn(21, L, D_IN, dtype=torch.float64), torch.randn(21, L, D_OUT, dtype=torch.float64)
    out = check_against_reference(clt, x, y, torch.float64, coefficient=0.03)
    assert out.sparsity_loss > 0


@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_batchtopk_matches_the_dense_batch_selection_float64(backend):
    clt = make_clt("batchtopk", backend=backend)
    x, y = torch.randn(17, L, D_IN, dtype=torch.float64), torch.randn(17, L, D_OUT, dtype=torch.float64)
    assert bool((clt.threshold_estimate < 0).all())
    out = check_against_reference(clt, x, y, torch.float64)
    # the per-layer counts vary by row (the batch's selection) and total rows * k
    counts = (out.latents.indices >= 0).sum(-1)
    assert bool((counts.sum(0) == 17 * K).all()) and counts.min() < counts.max()
    # the first training step set each layer's inference threshold: its smallest selected value
    for i in range(L):
        selected = out.latents.values.detach()[:, i][out.latents.indices[:, i] >= 0]
        assert float(clt.threshold_estimate[i]) == pytest.approx(float(selected.min()))


def test_batchtopk_inference_threshold_auxk_and_jumprelu_export(tmp_path):
    torch.manual_seed(1)
    clt = make_clt("batchtopk", dtype=torch.float32, threshold_beta=0.5, d_out=D_IN)  # circuit-tracer: one width
    x, y = torch.randn(64, L, D_IN), torch.randn(64, L, D_IN)
    steps = [clt(x, y), clt(x + 0.1, y)]  # the second step: an EMA of the two smallest selected values
    for i in range(L):
        layers = [out.latents.values.detach()[:, i][out.latents.indices[:, i] >= 0] for out in steps]
        first, second = (float(values.min()) for values in layers)
        assert float(clt.threshold_estimate[i]) == pytest.approx(0.5 * first + 0.5 * second, rel=1e-6)
    dead = torch.rand(L, N) < 0.5
    assert clt(x, y, dead_mask=dead).auxk_loss > 0  # AuxK in training mode
    clt.eval()
    with torch.no_grad():
        eval_out = clt(x, y, dead_mask=dead)  # eval: the thresholds, no AuxK
        assert eval_out.auxk_loss == 0
        for i in range(L):
            pre = (x[:, i] @ clt.encoder(i)[0].T + clt.encoder(i)[1]).relu()
            expected = pre * (pre > clt.threshold(i))
            layer = flashsae.SparseLatents(eval_out.latents.values[:, i], eval_out.latents.indices[:, i])
            assert_close(layer.to_dense(N), expected, torch.float32, f"eval latents of layer {i}")
        jump = clt.to_jumprelu()
        assert jump.activation == "jumprelu" and not hasattr(jump, "l0_controllers")
        assert torch.equal(jump.encode(x).indices, clt.encode(x).indices)
        clt.save(tmp_path / "ct", format="circuit_tracer")
        loaded = flashsae.load(tmp_path / "ct")
        assert loaded.activation == "jumprelu"
        assert torch.equal(loaded.encode(x).indices, clt.encode(x).indices)


def test_configs():
    with pytest.raises(ValueError, match="target_l0: a topk CLT's L0 is k=4"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, k=4, target_l0=8)
    assert flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, k=4, target_l0=4).config.target_l0 == 4
    with pytest.raises(ValueError, match="target_l0: expected a number in"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, activation="jumprelu", k=2, target_l0=16)
    with pytest.raises(ValueError, match="threshold_beta"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, activation="batchtopk", k=2, threshold_beta=1.0)
    with pytest.raises(ValueError, match="sparsity_coefficient"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, activation="relu", k=2, sparsity_coefficient=-1)
    with pytest.raises(ValueError, match="to_jumprelu converts a TopK or BatchTopK"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, activation="relu", k=2).to_jumprelu()
    with pytest.raises(ValueError, match="x: a TopK CLT's thresholds are calibrated"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, k=2).to_jumprelu()
    relative = flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, activation="jumprelu", k=2, target_l0=3)
    assert relative.config.bandwidth == 0.1 and len(relative.l0_controllers) == 2
    plain = flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, activation="jumprelu", k=2)
    assert plain.config.bandwidth == 0.001


def synthetic_clt_problem(seed, rows, d=24, atoms=96, active=4):
    """Inputs x_i = codes_i D_i (sparse codes, `active` of `atoms` per row) with offsets and
    scales far from 1, targets y_j = sum_{i<=j} codes_i E_ij: a CLT with `atoms` latents per
    layer and L0 = `active` explains them."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(L, atoms, d, generator=g), dim=-1)
    E = torch.randn(L, L, atoms, d, generator=g) / d**0.5

    def sample(n):
        codes = torch.zeros(n, L, atoms)
        pick = torch.rand(n, L, atoms, generator=g).argsort(-1)[..., :active]
        codes.scatter_(2, pick, torch.rand(n, L, active, generator=g) * 2 + 1)
        x = torch.einsum("rla,lad->rld", codes, D) * 7.0 + 3.0  # raw scale and offset
        y = torch.stack([sum(codes[:, i] @ E[i, j] for i in range(j + 1)) for j in range(L)], 1) * 0.2
        return x, y

    return sample


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_target_l0_is_reached_per_layer_on_a_synthetic_problem(activation):
    torch.manual_seed(0)
    sample = synthetic_clt_problem(0, 256)
    target = 6
    clt = flashsae.create("clt", n_layers=L, d_in=24, n_latents=96, activation=activation, target_l0=target)
    optimizer = torch.optim.Adam(clt.parameters(), lr=3e-3)
    for _ in range(150):
        x, y = sample(256)
        out = clt(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    clt.eval()
    x, y = sample(2048)
    with torch.no_grad():
        out = clt(x, y)
    l0 = ((out.latents.indices >= 0) & (out.latents.values > 0)).sum(-1).float().mean(0)
    assert bool(((l0 - target).abs() <= 0.2 * target).all()), f"per-layer L0 {l0.tolist()}, target {target}"
    assert float(out.fvu) < 0.5, f"fvu {float(out.fvu)}"
    for controller in clt.l0_controllers:  # every layer's lambda moved from its start
        assert controller.is_started() and float(controller.log_coefficient) != float(controller.log_initial)


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
def test_resume_continues_exactly(activation):
    """Training 4 steps, saving state (model buffers: controllers, thresholds, estimates; optimizer)
    and continuing 4 more equals resuming a fresh CLT from that state for the same 4 steps."""
    sample = synthetic_clt_problem(3, 64)
    batches = [sample(CUT_SAMPLE_ROWS + 64) for _ in range(8)]
    options = {"activation": activation, "k": 4}
    if activation != "batchtopk":
        options["target_l0"] = 4

    def run(clt, optimizer, steps):
        for x, y in steps:
            out = clt(x, y)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()

    torch.manual_seed(5)
    clt = flashsae.create("clt", n_layers=L, d_in=24, n_latents=96, **options)
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-2)
    run(clt, optimizer, batches[:4])
    state = {k: v.clone() for k, v in clt.state_dict().items()}
    optim_state = copy.deepcopy(optimizer.state_dict())  # else its tensors are the live state
    keys = [k for k in state if "l0_controllers" in k or k.startswith("threshold")]
    assert keys, "the resumable state holds the controllers / thresholds"
    resumed = flashsae.create("clt", n_layers=L, d_in=24, n_latents=96, **options)
    resumed.load_state_dict(state)
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(optim_state)
    run(clt, optimizer, batches[4:])
    run(resumed, resumed_optimizer, batches[4:])
    for (name, a), b in zip(clt.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
