"""TopKSAE: init, shapes and dtypes, agreement with the dense PyTorch baseline, training helpers."""

import copy

import pytest
import torch

from flashsae import ForwardOutput, SparseLatents, TopKSAE
from flashsae.bench import DenseTopKSAE, SparsifyStyleTopKSAE
from flashsae.bench.train_step import make_optimizer, train_step
from flashsae.modules import geometric_median
from helpers import DTYPES, RTOL, assert_close


def test_init_follows_gao_et_al():
    sae = TopKSAE(40, 300, 5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(300))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr(), "encoder and decoder must not share storage"
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.aux_k == 20  # d_in // 2
    assert [name for name, _ in sae.named_parameters()] == ["W_enc", "b_enc", "W_dec", "b_dec"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_dtypes_and_leading_dims(dtype):
    sae = TopKSAE(24, 200, 6, dtype=dtype)
    x = torch.randn(3, 4, 24, dtype=dtype)
    out = sae(x, dead_mask=torch.rand(200) < 0.5)
    assert isinstance(out, ForwardOutput) and isinstance(out.latents, SparseLatents)
    assert out.x_hat.shape == (3, 4, 24) and out.x_hat.dtype == dtype
    assert out.latents.values.shape == (3, 4, 6) and out.latents.indices.dtype == torch.int32
    for loss in (out.fvu, out.mse, out.auxk_loss):
        assert loss.shape == () and torch.isfinite(loss)
    latents = sae.encode(x)
    assert torch.equal(latents.indices, out.latents.indices)
    assert_close(sae.decode(latents), out.x_hat.double(), dtype, "decode(encode(x))")
    dense = latents.to_dense(200)
    assert dense.shape == (3, 4, 200) and (dense != 0).sum(-1).max() <= 6


def test_input_is_cast_to_the_sae_dtype():
    sae = TopKSAE(16, 64, 4)
    x = torch.randn(10, 16, dtype=torch.float64)
    assert torch.equal(sae(x).x_hat, sae(x.float()).x_hat)


def clones(dtype=torch.float64):
    torch.manual_seed(3)
    sae = TopKSAE(20, 160, 6, aux_k=9, dtype=dtype, backend="cpu")
    with torch.no_grad():  # non-trivial biases and untied weights
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)
    dense = DenseTopKSAE(20, 160, 6, aux_k=9, dtype=dtype)
    sparse = SparsifyStyleTopKSAE(20, 160, 6, aux_k=9, dtype=dtype)
    for twin in (dense, sparse):
        twin.load_state_dict(sae.state_dict())
    return sae, dense, sparse


@pytest.mark.parametrize("with_dead", [False, True])
def test_matches_dense_baseline_float64(with_dead):
    sae, dense, sparse = clones()
    x = torch.randn(48, 20, dtype=torch.float64)
    dead = torch.rand(160) < 0.25 if with_dead else None
    results = []
    for model in (sae, dense, sparse):
        out = model(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours, our_grads), *baselines = results
    for out, grads in baselines:
        for field in ("x_hat", "fvu", "mse", "auxk_loss"):
            assert_close(getattr(ours, field), getattr(out, field), torch.float64, field)
        assert torch.equal(ours.latents.indices, out.latents.indices)
        for name, g in our_grads.items():
            assert_close(g, grads[name], torch.float64, f"grad {name}")


def test_training_steps_match_dense_baseline_float64():
    sae, dense, _ = clones()
    x = torch.randn(64, 20, dtype=torch.float64)
    opts = [make_optimizer("adam", m.parameters(), lr=1e-2) for m in (sae, dense)]
    for _ in range(5):
        for model, opt in zip((sae, dense), opts, strict=True):
            train_step(model, opt, x)
    for (name, p), q in zip(sae.named_parameters(), dense.parameters(), strict=True):
        assert_close(p, q, torch.float64, name)


def test_training_reduces_fvu():
    # Data from a sparse dictionary of 64 directions: a 256-latent TopK SAE must learn it well.
    torch.manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(64, 32), dim=1)
    codes = torch.rand(4096, 64) * (torch.rand(4096, 64) < 0.06)
    data = codes @ dictionary
    sae = TopKSAE(32, 256, 8)
    sae.init_b_dec_(data[:512])
    opt = make_optimizer("adam", sae.parameters(), lr=3e-3)
    first = sae(data).fvu.item()
    for step in range(150):
        batch = data[(step * 256) % 4096 :][:256]
        out = sae(batch)
        out.fvu.backward()
        sae.remove_decoder_parallel_grads_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
    last = sae(data).fvu.item()
    assert last < 0.25 * first, f"fvu {first:.3f} -> {last:.3f}"


def test_geometric_median_resists_outliers():
    line = torch.tensor([0.0, 1.0, 2.0, 3.0, 1000.0]).unsqueeze(1) * torch.ones(1, 6)
    assert_close(geometric_median(line), torch.full((6,), 2.0, dtype=torch.float64), torch.float32)
    sae = TopKSAE(6, 20, 2)
    sae.init_b_dec_(line)
    assert (sae.b_dec - 2.0).abs().max() < 1e-3
    sae.init_b_dec_(line, method="mean")
    torch.testing.assert_close(sae.b_dec, torch.full((6,), 201.2))
    with pytest.raises(ValueError, match="method: expected 'geometric_median' or 'mean'"):
        sae.init_b_dec_(line, method="median")


def test_normalize_decoder_and_parallel_grad_removal():
    sae = TopKSAE(12, 50, 3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(50, 1) * 3 + 0.1)
    sae.W_dec.grad = torch.randn(50, 12)
    original = sae.W_dec.grad.clone()
    sae.remove_decoder_parallel_grads_()
    rows = sae.W_dec.detach()
    assert torch.linalg.vecdot(sae.W_dec.grad, rows).abs().max() < 1e-5
    # what was removed is parallel to each row
    removed = original - sae.W_dec.grad
    cosine = torch.nn.functional.cosine_similarity(removed, rows, dim=1).abs()
    assert (cosine > 1 - 1e-5).all()
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(50))
    without_grad = TopKSAE(12, 50, 3)
    without_grad.remove_decoder_parallel_grads_()  # no grad yet: nothing to do, no error
    assert without_grad.W_dec.grad is None


def test_deepcopy_and_state_dict_round_trip():
    sae = TopKSAE(8, 32, 2, dtype=torch.bfloat16)
    twin = copy.deepcopy(sae)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    assert torch.equal(twin(x).x_hat, sae(x).x_hat)
    assert RTOL[torch.bfloat16] > 0  # tolerance table covers every dtype the module accepts
