"""JumpReLU: JumpReLUSAE's objective and straight-through gradients against a float64 reference
(step and tanh penalties, pre-activation loss, warm-up), sparse inference = training latents,
configs, checkpoints. The threshold_encode op itself: tests/ops/test_threshold_encode.py."""

import pytest
import torch

import flashsae
from flashsae import JumpReLUConfig, JumpReLUSAE
from helpers import assert_close
from sae_helpers import check_against_reference

# -------------------------------------------------------------------------------------- the module


def make_sae(dtype=torch.float64, **options):
    torch.manual_seed(7)
    options = {"bandwidth": 0.5, "threshold_init": 0.3, **options}
    sae = JumpReLUSAE(16, 90, dtype=dtype, **options)
    with torch.no_grad():  # per-latent thresholds, biases, untied encoder
        sae.log_threshold.add_(torch.randn(90, dtype=torch.float64).to(dtype) * 0.5)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.2)
    return sae


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).double()


def straight_through(value: torch.Tensor, theta: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, d/dtheta = `slope` in the backward pass."""
    surrogate = slope.detach() * theta
    return value + surrogate - surrogate.detach()


def reference_objective(params, x, cfg: JumpReLUConfig, num_steps=0, dead_mask=None):
    """The JumpReLU objective with the paper's pseudo-derivatives, written plainly in float64."""
    W_enc, b_enc, W_dec, b_dec = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    theta, eps = params["log_threshold"].exp(), cfg.bandwidth
    pre = ((x - b_dec) if cfg.apply_b_dec_to_input else x) @ W_enc.T + b_enc
    above = (pre > theta).double().detach()
    window = rectangle((pre.detach() - theta.detach()) / eps)
    f = straight_through(pre * above, theta, -(theta.detach() / eps) * window)  # d/dpre = H
    x_hat = f @ W_dec + b_dec
    sse = (x_hat - x).pow(2).sum()
    norms = W_dec.norm(dim=1)
    if cfg.sparsity_loss == "step":
        l0 = straight_through(above, theta, -(1 / eps) * window)  # no gradient to pre
        sparsity = l0.sum(1).mean()
    else:
        sparsity = torch.tanh(cfg.tanh_scale * f * norms).sum(1).mean()
    ramp = 1.0 if cfg.l0_warmup_steps == 0 else min(1.0, num_steps / cfg.l0_warmup_steps)
    loss = sse / x.shape[0] + cfg.l0_coefficient * ramp * sparsity
    if cfg.pre_act_coefficient:
        mask = torch.ones(pre.shape[1], dtype=torch.bool) if dead_mask is None else dead_mask
        loss = loss + cfg.pre_act_coefficient * ((theta - pre).relu() * norms * mask).sum(1).mean()
    variance = (x - x.mean(0)).pow(2).sum()
    return {"x_hat": x_hat, "fvu": sse / variance, "mse": sse / x.numel(), "loss": loss}, f


CASES = {
    "step": {},
    "step_b_dec_in": {"apply_b_dec_to_input": True, "l0_coefficient": 0.3},
    "tanh": {"sparsity_loss": "tanh", "tanh_scale": 2.0, "l0_coefficient": 0.2},
    "pre_act": {"pre_act_coefficient": 0.05, "l0_coefficient": 0.1},
}


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_reference_float64(case, with_dead):
    sae = make_sae(**CASES[case])
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    dead = torch.rand(90) < 0.4 if with_dead else None
    params = check_against_reference(sae, x, reference_objective, 0, dead, dead_mask=dead)
    assert params["log_threshold"].grad.abs().max() > 0, "no latent near its threshold: a vacuous check"


def test_l0_warmup_follows_the_step_counter():
    sae = make_sae(l0_coefficient=0.5, l0_warmup_steps=4)
    x = torch.randn(20, 16, dtype=torch.float64)
    for step in range(6):
        params = {n: p.detach().clone() for n, p in sae.named_parameters()}
        expected, _ = reference_objective(params, x, sae.config, num_steps=step)
        assert int(sae.num_steps) == step
        assert_close(sae(x).loss, expected["loss"], torch.float64, f"loss at step {step}")
    with torch.no_grad():
        sae(x)
    assert int(sae.num_steps) == 6
    sae.num_steps.fill_(2)  # a loop with gradient accumulation sets the count itself
    expected, _ = reference_objective(dict(sae.named_parameters()), x, sae.config, num_steps=2)
    assert_close(sae(x).loss, expected["loss"], torch.float64, "loss after fill_")


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_sparse_encode_gives_the_training_latents(apply_b_dec):
    sae = make_sae(apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    out = sae(x)
    latents = sae.encode(x)
    assert latents.values.shape == out.latents.values.shape
    assert torch.equal(latents.indices, out.latents.indices)
    assert_close(latents.values, out.latents.values, torch.float64, "values")
    assert_close(sae.decode(latents), out.x_hat, torch.float64, "decode(encode(x))")
    sae.eval()
    assert torch.equal(sae.encode(x).indices, out.latents.indices)


def test_init_and_decoder_policy():
    sae = JumpReLUSAE(12, 40)
    torch.testing.assert_close(sae.threshold, torch.full((40,), 0.001))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any()
    assert sae.unit_norm_decoder
    assert not JumpReLUSAE(12, 40, sparsity_loss="tanh").unit_norm_decoder
    assert {n for n, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"l0_coefficient": -1.0}, r"l0_coefficient: expected a number >= 0"),
        ({"bandwidth": 0.0}, r"bandwidth: expected a finite number > 0"),
        ({"threshold_init": -0.1}, r"threshold_init: expected a finite number > 0"),
        ({"sparsity_loss": "l1"}, r"sparsity_loss: expected one of \('step', 'tanh'\)"),
        ({"tanh_scale": 0}, r"tanh_scale: expected a finite number > 0"),
        ({"pre_act_coefficient": -3e-6}, r"pre_act_coefficient: expected a number >= 0"),
        ({"l0_warmup_steps": -5}, r"l0_warmup_steps: expected an int >= 0"),
        ({"apply_b_dec_to_input": "yes"}, r"apply_b_dec_to_input: expected True or False"),
        ({"n_latents": 0}, r"n_latents: expected a positive int"),
    ],
)
def test_bad_configs(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashsae.create("jumprelu", **{"d_in": 8, "n_latents": 32, **kwargs})


def test_k_is_not_a_jumprelu_field():
    with pytest.raises(TypeError, match="unexpected config field"):
        flashsae.create("jumprelu", d_in=8, n_latents=32, k=4)


def test_bad_dead_mask():
    sae = make_sae()
    x = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dead_mask: expected a bool tensor \[n_latents=90\]"):
        sae(x, dead_mask=torch.ones(90))
    with pytest.raises(TypeError, match=r"dead_mask: expected a torch\.Tensor"):
        sae(x, dead_mask=[True] * 90)


def test_save_load_round_trip(tmp_path):
    sae = make_sae(dtype=torch.float32, sparsity_loss="tanh", l0_warmup_steps=10)
    x = torch.randn(30, 16)
    for _ in range(3):
        sae(x).loss.backward()
    sae.save(tmp_path / "jump")
    loaded = flashsae.load(tmp_path / "jump")
    assert type(loaded) is JumpReLUSAE and loaded.config == sae.config
    assert int(loaded.num_steps) == 3
    assert torch.equal(loaded.log_threshold, sae.log_threshold)
    assert torch.equal(loaded(x).loss, sae(x).loss)
    assert flashsae.load(tmp_path / "jump", dtype=torch.bfloat16).log_threshold.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_other_dtypes(dtype):
    sae = make_sae(dtype=dtype)
    x = torch.randn(40, 16, dtype=dtype)
    out = sae(x)
    out.loss.backward()
    assert out.x_hat.dtype == dtype and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert torch.isfinite(sae.log_threshold.grad).all()
    if dtype == torch.float32:
        params = {n: p.detach().double() for n, p in sae.named_parameters()}
        expected, _ = reference_objective(params, x.double(), sae.config)
        assert_close(out.x_hat, expected["x_hat"], dtype, "x_hat")
        assert_close(out.loss, expected["loss"], dtype, "loss")
