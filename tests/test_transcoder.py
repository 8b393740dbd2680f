"""Transcoders and skip transcoders: objective (FVU against the target) and gradients against a
float64 reference, the y / x arguments, init, configs, checkpoints."""

import pytest
import torch

import flashsae
from flashsae import Transcoder, TranscoderConfig
from helpers import assert_close


def make_transcoder(dtype=torch.float64, d_in=13, d_out=21, **options):
    torch.manual_seed(19)
    tc = Transcoder(d_in, 75, 6, d_out=d_out, aux_k=8, dtype=dtype, **options)
    with torch.no_grad():  # the zero init would make most gradients vanish: give every weight a value
        tc.W_dec.normal_(0, d_out**-0.5)
        tc.b_enc.normal_(0, 0.2)
        tc.b_dec.normal_(0, 0.2)
        if tc.config.skip:
            tc.W_skip.normal_(0, d_in**-0.5)
    return tc


def reference_objective(params, x, y, k, aux_k, auxk_alpha, dead_mask=None):
    """TopK on x (no pre-encoder bias), prediction of y (+ skip), FVU and AuxK against var(y)."""
    act = (x @ params["W_enc"].T + params["b_enc"]).relu()
    top = torch.sort(act, dim=1, descending=True, stable=True)
    f = torch.zeros_like(act).scatter(1, top.indices[:, :k], top.values[:, :k])
    y_hat = f @ params["W_dec"] + params["b_dec"]
    if "W_skip" in params:
        y_hat = y_hat + x @ params["W_skip"].T
    variance = (y - y.mean(0)).pow(2).sum()
    sse = (y_hat - y).pow(2).sum()
    auxk = torch.zeros((), dtype=x.dtype)
    if dead_mask is not None:
        dead = torch.sort(act.masked_fill(~dead_mask, float("-inf")), dim=1, descending=True, stable=True)
        aux_f = torch.zeros_like(act).scatter(1, dead.indices[:, :aux_k], dead.values[:, :aux_k].clamp_min(0))
        auxk = (aux_f @ params["W_dec"] - (y - y_hat).detach()).pow(2).sum() / variance
        auxk = auxk * min(int(dead_mask.sum()) / aux_k, 1.0)
    fvu = sse / variance
    return {"x_hat": y_hat, "fvu": fvu, "mse": sse / y.numel(), "auxk_loss": auxk, "loss": fvu + auxk_alpha * auxk}


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_forward_and_gradients_match_reference_float64(skip, with_dead):
    tc = make_transcoder(skip=skip, auxk_alpha=0.5)
    x = torch.randn(2, 20, 13, dtype=torch.float64)
    y = torch.randn(2, 20, 21, dtype=torch.float64) * 3 + 1
    dead = torch.rand(75) < 0.3 if with_dead else None
    out = tc(x, y, dead_mask=dead)
    out.loss.backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in tc.named_parameters()}
    expected = reference_objective(params, x.reshape(-1, 13), y.reshape(-1, 21), 6, 8, 0.5, dead)
    expected["loss"].backward()
    assert out.x_hat.shape == (2, 20, 21) and out.latents.values.shape == (2, 20, 6)
    assert_close(out.x_hat, expected["x_hat"].reshape(2, 20, 21), torch.float64, "y_hat")
    for field in ("fvu", "mse", "auxk_loss", "loss"):
        assert_close(getattr(out, field), expected[field], torch.float64, field)
    if with_dead:
        assert out.auxk_loss > 0
    for name, p in tc.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float64, f"grad {name}")


def test_encode_decode_and_the_input_argument():
    tc = make_transcoder(skip=True)
    x = torch.randn(7, 13, dtype=torch.float64)
    out = tc(x, torch.randn(7, 21, dtype=torch.float64))
    latents = tc.encode(x)
    assert torch.equal(latents.indices, out.latents.indices)
    assert_close(tc.decode(latents, x), out.x_hat, torch.float64, "decode(encode(x), x)")
    with pytest.raises(ValueError, match="x: a skip transcoder's decode needs the input"):
        tc.decode(latents)
    plain = make_transcoder()
    assert_close(plain.decode(plain.encode(x)), plain(x, torch.zeros(7, 21, dtype=torch.float64)).x_hat,
                 torch.float64, "plain decode")  # fmt: skip


def test_target_defaults_to_the_input_only_when_widths_match():
    square = make_transcoder(d_out=13)
    x = torch.randn(9, 13, dtype=torch.float64)
    assert torch.equal(square(x).loss, square(x, x).loss)
    with pytest.raises(ValueError, match=r"y: required when d_out \(21\) != d_in \(13\)"):
        make_transcoder()(x)
    with pytest.raises(ValueError, match=r"y: expected shape \[9, 21\]"):
        make_transcoder()(x, torch.randn(8, 21, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"y: expected shape \[\.\.\., d_out=21\]"):
        make_transcoder()(x, torch.randn(9, 20, dtype=torch.float64))


def test_init_follows_sparsify():
    tc = Transcoder(12, 40, 3, d_out=20, skip=True)
    torch.testing.assert_close(tc.W_enc.norm(dim=1), torch.ones(40))
    assert not tc.W_dec.any() and not tc.W_skip.any() and not tc.b_enc.any() and not tc.b_dec.any()
    assert tc.W_dec.shape == (40, 20) and tc.W_skip.shape == (20, 12) and tc.aux_k == 10
    assert not hasattr(Transcoder(12, 40, 3), "W_skip")
    tc.normalize_decoder_()  # zero rows stay zero
    assert not tc.W_dec.any()
    y = torch.randn(100, 20) + 5
    tc.init_b_dec_(y, method="mean")
    torch.testing.assert_close(tc.b_dec, y.mean(0))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"k": 41}, r"k: expected 1 <= k <= n_latents"),
        ({"d_out": 0}, r"d_out: expected a positive int"),
        ({"aux_k": 41}, r"aux_k: expected 1 <= aux_k <= n_latents"),
        ({"auxk_alpha": -1}, r"auxk_alpha: expected a number >= 0"),
        ({"skip": "no"}, r"skip: expected True or False"),
    ],
)
def test_bad_configs(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashsae.create("transcoder", **{"d_in": 8, "n_latents": 40, "k": 3, **kwargs})


def test_save_load_round_trip(tmp_path):
    tc = make_transcoder(dtype=torch.float32, skip=True)
    tc.metadata = {"hookpoint_in": "layers.2.mlp.input", "hookpoint_out": "layers.2.mlp.output"}
    tc.save(tmp_path / "tc")
    loaded = flashsae.load(tmp_path / "tc")
    assert type(loaded) is Transcoder and loaded.metadata == tc.metadata
    assert loaded.config == tc.config == TranscoderConfig(d_in=13, n_latents=75, d_out=21, k=6, aux_k=8, skip=True)
    x, y = torch.randn(10, 13), torch.randn(10, 21)
    assert torch.equal(loaded(x, y).x_hat, tc(x, y).x_hat)
