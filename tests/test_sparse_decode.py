"""sparse_decode against its float64 reference: forward, sparse backward, empty slots, index checks."""

import pytest
import torch

from flashsae.ops import sparse_decode, sparse_decode_reference
from helpers import CPU_BACKENDS, DTYPES, SIZE_IDS, SIZES, LargestTensorMode, assert_close, randn


def latents(rows: int, k: int, n: int, dtype: torch.dtype, empty_fraction: float = 0.2):
    """Non-negative values with some empty (-1) slots and repeated latents within a row."""
    values = randn(rows, k).abs().to(dtype)
    indices = torch.randint(0, n, (rows, k), dtype=torch.int32)
    indices[torch.rand(rows, k) < empty_fraction] = -1
    if k > 1:
        indices[0, 1] = indices[0, 0].clamp_min(0)  # a repeated latent in one row
    return values, indices


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_matches_reference(backend, dtype, size, with_bias):
    rows, d, n, k = size
    values, indices = latents(rows, k, n, dtype)
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, scale=0.1, dtype=dtype) if with_bias else None
    x_hat = sparse_decode(values, indices, W_dec, b_dec, backend=backend)
    ref = sparse_decode_reference(values.double(), indices, W_dec.double(), None if b_dec is None else b_dec.double())
    assert x_hat.dtype == dtype
    assert_close(x_hat, ref, dtype, "x_hat")


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_matches_reference(backend, dtype, size):
    rows, d, n, k = size
    values, indices = latents(rows, k, n, dtype)
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, scale=0.1, dtype=dtype)
    upstream = randn(rows, d, dtype=dtype)
    leaves = [values.clone().requires_grad_(), W_dec.clone().requires_grad_(), b_dec.clone().requires_grad_()]
    x_hat = sparse_decode(leaves[0], indices, leaves[1], leaves[2], backend=backend)
    grads = torch.autograd.grad((x_hat * upstream).sum(), leaves)
    refs = [values.double().requires_grad_(), W_dec.double().requires_grad_(), b_dec.double().requires_grad_()]
    ref = sparse_decode_reference(refs[0], indices, refs[1], refs[2])
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), refs)
    for name, g, rg in zip(["d_values", "dW_dec", "db_dec"], grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, name)


def test_gradcheck_cpu():
    values, indices = latents(6, 4, 30, torch.float64)
    W_dec = randn(30, 5).requires_grad_()
    b_dec = randn(5).requires_grad_()

    def fn(v, w, b):
        return sparse_decode(v, indices, w, b, backend="cpu")

    assert torch.autograd.gradcheck(fn, (values.requires_grad_(), W_dec, b_dec))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int64_indices_are_accepted_and_range_checked(backend):
    values, indices = latents(5, 3, 20, torch.float32, empty_fraction=0.0)
    W_dec = randn(20, 8, dtype=torch.float32)
    expected = sparse_decode(values, indices, W_dec, backend=backend)
    assert torch.equal(sparse_decode(values, indices.long(), W_dec, backend=backend), expected)
    wrapped = indices.long()
    wrapped[2, 1] = 2**32 + 5  # would alias latent 5 if narrowed to int32 without a check
    with pytest.raises(ValueError, match=r"indices: index 4294967301 is out of range"):
        sparse_decode(values, wrapped, W_dec, backend=backend)


@pytest.mark.parametrize("bad", [20, -2, 1000])
def test_cpu_kernel_rejects_out_of_range_indices(bad):
    values, indices = latents(5, 3, 20, torch.float32, empty_fraction=0.0)
    indices[3, 2] = bad
    with pytest.raises(ValueError, match=rf"indices: index {bad} at \[3, 2\] is out of range"):
        sparse_decode(values, indices, randn(20, 8, dtype=torch.float32), backend="cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_never_materializes_batch_by_latents(backend):
    rows, d, n, k = 256, 16, 8192, 8
    values, indices = latents(rows, k, n, torch.float32)
    values.requires_grad_()
    W_dec = randn(n, d, dtype=torch.float32).requires_grad_()
    with LargestTensorMode() as mode:
        sparse_decode(values, indices, W_dec, backend=backend).sum().backward()
    assert mode.largest <= n * d < rows * n, f"{mode.largest} elements from {mode.largest_op}"
