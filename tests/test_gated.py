"""Gated SAE: objective and gradients against a float64 reference (tied gate/magnitude weights,
frozen-decoder auxiliary loss), sparse inference, configs, checkpoints."""

import pytest
import torch

import flashsae
from flashsae import GatedConfig, GatedSAE
from helpers import assert_close
from sae_helpers import check_against_reference


def make_sae(dtype=torch.float64, **options):
    torch.manual_seed(17)
    sae = GatedSAE(15, 80, dtype=dtype, **options)
    with torch.no_grad():
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
        sae.r_mag.normal_(0, 0.3)
        sae.b_mag.normal_(0, 0.3)
    return sae


def reference_objective(params, x, cfg: GatedConfig, num_steps=0):
    """The paper's loss: L_reconstruct + lambda |relu(pi_gate)|_1 + L_aux with a frozen decoder."""
    W_gate, b_gate, W_dec, b_dec = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    centered = x - b_dec
    pi_gate = centered @ W_gate.T + b_gate
    W_mag = params["r_mag"].exp().unsqueeze(1) * W_gate
    pi_mag = centered @ W_mag.T + params["b_mag"]
    f = (pi_gate > 0).double() * pi_mag.relu()
    x_hat = f @ W_dec + b_dec
    sse = (x_hat - x).pow(2).sum()
    gate = pi_gate.relu()
    via_gate = gate @ W_dec.detach() + b_dec.detach()
    aux = (via_gate - x).pow(2).sum() / x.shape[0]
    ramp = 1.0 if cfg.l1_warmup_steps == 0 else min(1.0, num_steps / cfg.l1_warmup_steps)
    loss = sse / x.shape[0] + cfg.l1_coefficient * ramp * gate.sum(1).mean() + aux
    variance = (x - x.mean(0)).pow(2).sum()
    return {"x_hat": x_hat, "fvu": sse / variance, "mse": sse / x.numel(), "loss": loss}, f


def test_forward_and_gradients_match_reference_float64():
    sae = make_sae(l1_coefficient=0.4)
    check_against_reference(sae, torch.randn(3, 13, 15, dtype=torch.float64), reference_objective)


def test_auxiliary_loss_does_not_train_the_decoder():
    sae = make_sae()
    x = torch.randn(20, 15, dtype=torch.float64)
    sae(x).loss.backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    expected, _ = reference_objective(params, x, sae.config)
    (frozen,) = torch.autograd.grad(expected["loss"], params["W_dec"])
    # the same auxiliary term through a live decoder would move W_dec noticeably
    gate = ((x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]).relu()
    (live,) = torch.autograd.grad((gate @ params["W_dec"] + params["b_dec"] - x).pow(2).sum() / 20, params["W_dec"])
    assert live.abs().max() > 0.1 * frozen.abs().max()
    assert_close(sae.W_dec.grad, frozen, torch.float64, "W_dec grad")


def test_warmup_and_step_counter():
    sae = make_sae(l1_coefficient=1.0, l1_warmup_steps=2)
    x = torch.randn(10, 15, dtype=torch.float64)
    for step in range(4):
        expected, _ = reference_objective(dict(sae.named_parameters()), x, sae.config, num_steps=step)
        assert_close(sae(x).loss, expected["loss"], torch.float64, f"loss at step {step}")
    assert int(sae.num_steps) == 4


def test_sparse_encode_gives_the_training_latents():
    sae = make_sae()
    x = torch.randn(2, 17, 15, dtype=torch.float64)
    out = sae(x)
    latents = sae.encode(x)
    assert torch.equal(latents.indices, out.latents.indices)
    assert_close(latents.values, out.latents.values, torch.float64, "values")
    assert_close(sae.decode(latents), out.x_hat, torch.float64, "decode(encode(x))")
    # open gates with a negative magnitude give f = 0: not an active latent
    pi_mag = sae.r_mag.exp() * ((x - sae.b_dec) @ sae.W_enc.T) + sae.b_mag
    pi_gate = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    assert ((pi_gate > 0) & (pi_mag <= 0)).any(), "the check needs gates open on a negative magnitude"
    assert int((latents.indices >= 0).sum()) == int(((pi_gate > 0) & (pi_mag > 0)).sum())


def test_init_and_parameters():
    sae = GatedSAE(10, 30)
    assert {n for n, _ in sae.named_parameters()} == {"W_enc", "b_enc", "r_mag", "b_mag", "W_dec", "b_dec"}
    assert not sae.r_mag.any() and not sae.b_mag.any() and sae.unit_norm_decoder
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(30))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"l1_coefficient": -0.1}, r"l1_coefficient: expected a number >= 0"),
        ({"l1_warmup_steps": -1}, r"l1_warmup_steps: expected an int >= 0"),
        ({"n_latents": -3}, r"n_latents: expected a positive int"),
    ],
)
def test_bad_configs(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashsae.create("gated", **{"d_in": 8, "n_latents": 32, **kwargs})


def test_save_load_round_trip(tmp_path):
    sae = make_sae(dtype=torch.float32)
    x = torch.randn(25, 15)
    sae(x).loss.backward()
    sae.save(tmp_path / "gated")
    loaded = flashsae.load(tmp_path / "gated")
    assert type(loaded) is GatedSAE and loaded.config == sae.config and int(loaded.num_steps) == 1
    assert torch.equal(loaded.r_mag, sae.r_mag) and torch.equal(loaded.b_mag, sae.b_mag)
    assert torch.equal(loaded(x).loss, sae(x).loss)


def test_float32_matches_reference_and_bfloat16_runs():
    sae = make_sae(dtype=torch.float32)
    x = torch.randn(40, 15)
    out = sae(x)
    expected, _ = reference_objective(
        {n: p.detach().double() for n, p in sae.named_parameters()}, x.double(), sae.config
    )
    assert_close(out.loss, expected["loss"], torch.float32, "loss")
    low = make_sae(dtype=torch.bfloat16)
    out = low(x.bfloat16())
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in low.parameters())
