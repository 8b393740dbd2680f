"""Matryoshka BatchTopK: the nested-prefix objective against a float64 reference, widths
validation, BatchTopK behaviour it inherits, checkpoints."""

import pytest
import torch

import flashsae
from flashsae import BatchTopKSAE, MatryoshkaConfig, MatryoshkaSAE
from helpers import assert_close
from sae_helpers import auxk_reference, batch_topk_activations


def make_sae(dtype=torch.float64, **options):
    torch.manual_seed(11)
    sae = MatryoshkaSAE(18, 96, 5, aux_k=7, dtype=dtype, **options)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)
    return sae


def reference_objective(params, x, k, widths, aux_k, auxk_alpha, dead_mask=None):
    """One BatchTopK selection over all latents; the sum over prefixes of the FVU of the
    reconstruction from the selected latents below each width; AuxK on the full reconstruction."""
    W_dec, b_dec = params["W_dec"], params["b_dec"]
    act, f = batch_topk_activations(params, x, k)
    variance = (x - x.mean(0)).pow(2).sum()
    total = 0
    for width in widths:
        x_hat = f[:, :width] @ W_dec[:width] + b_dec
        total = total + (x_hat - x).pow(2).sum() / variance
    fvu = (x_hat - x).pow(2).sum() / variance  # the last width is n_latents: the full reconstruction
    auxk = torch.zeros((), dtype=x.dtype)
    if dead_mask is not None:
        auxk = auxk_reference(act, dead_mask, aux_k, W_dec, x - x_hat) / variance
    return {"x_hat": x_hat, "fvu": fvu, "auxk_loss": auxk, "loss": total + auxk_alpha * auxk}


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("widths", [None, [7, 40], [1]], ids=["default", "two", "one"])
def test_forward_and_gradients_match_reference_float64(widths, with_dead):
    sae = make_sae(matryoshka_widths=widths, auxk_alpha=0.5)
    x = torch.randn(45, 18, dtype=torch.float64)
    dead = torch.rand(96) < 0.3 if with_dead else None
    out = sae(x, dead_mask=dead)
    out.loss.backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    expected = reference_objective(params, x, 5, sae.matryoshka_widths, 7, 0.5, dead)
    expected["loss"].backward()
    for field in ("x_hat", "fvu", "auxk_loss", "loss"):
        assert_close(getattr(out, field), expected[field], torch.float64, field)
    assert out.loss > out.fvu  # the inner prefixes add their own (larger) FVUs
    for name, p in sae.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float64, f"grad {name}")


def test_widths_default_and_normalization():
    assert MatryoshkaConfig(d_in=8, n_latents=64, k=2).matryoshka_widths == [8, 16, 32, 64]
    assert MatryoshkaConfig(d_in=8, n_latents=3, k=2).matryoshka_widths == [1, 3]
    assert MatryoshkaConfig(d_in=8, n_latents=64, k=2, matryoshka_widths=[10, 64]).matryoshka_widths == [10, 64]
    assert MatryoshkaConfig(d_in=8, n_latents=64, k=2, matryoshka_widths=[10]).matryoshka_widths == [10, 64]


@pytest.mark.parametrize(
    ("widths", "pattern"),
    [
        ([0, 10], r"matryoshka_widths: expected a list of ints in \[1, n_latents=64\]"),
        ([10, 65], r"matryoshka_widths: expected a list of ints"),
        ([10, 10], r"matryoshka_widths: expected strictly increasing widths"),
        ([20, 10], r"matryoshka_widths: expected strictly increasing widths"),
        ([2.5], r"matryoshka_widths: expected a list of ints"),
        ("16", r"matryoshka_widths: expected a list of ints"),
    ],
)
def test_bad_widths(widths, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashsae.create("matryoshka", d_in=8, n_latents=64, k=2, matryoshka_widths=widths)


def test_bad_batchtopk_fields_are_checked_too():
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= n_latents"):
        flashsae.create("matryoshka", d_in=8, n_latents=64, k=65)
    with pytest.raises(ValueError, match=r"threshold_beta"):
        flashsae.create("matryoshka", d_in=8, n_latents=64, k=2, threshold_beta=-0.5)


def test_it_is_a_batchtopk_sae():
    sae = make_sae()
    assert isinstance(sae, BatchTopKSAE) and sae.unit_norm_decoder
    x = torch.randn(30, 18, dtype=torch.float64)
    plain = BatchTopKSAE(18, 96, 5, aux_k=7, dtype=torch.float64)
    plain.load_state_dict(sae.state_dict())
    # the same selection and reconstruction; only the objective differs
    ours, theirs = sae(x), plain(x)
    assert torch.equal(ours.latents.indices, theirs.latents.indices)
    assert_close(ours.x_hat, theirs.x_hat, torch.float64, "x_hat")
    assert ours.loss > theirs.loss


def test_save_load_round_trip(tmp_path):
    sae = make_sae(dtype=torch.float32, matryoshka_widths=[12, 48], threshold_start_step=0)
    x = torch.randn(40, 18)
    sae(x).loss.backward()
    sae.save(tmp_path / "m")
    loaded = flashsae.load(tmp_path / "m")
    assert type(loaded) is MatryoshkaSAE and loaded.config == sae.config
    assert loaded.matryoshka_widths == [12, 48, 96]
    assert int(loaded.num_steps) == 1 and float(loaded.threshold) == float(sae.threshold)
    assert torch.equal(loaded(x).loss, sae(x).loss)
