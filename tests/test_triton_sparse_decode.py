"""The triton backend's sparse decoder (gather-combine forward; row-dot and latent segment-reduce
backward) against the float64 reference. Device selection as in test_triton_topk_encode.py."""

import pytest
import torch

pytest.importorskip("triton")

from flashsae import _backend, _checks
from flashsae.ops import sparse_decode, sparse_decode_reference
from helpers import SIZE_IDS, SIZES, LargestTensorMode, assert_close, randn

INTERPRETING = _backend.triton_interpreting()
DEVICE = torch.device("cpu" if INTERPRETING else "cuda")
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(), reason="triton needs a CUDA GPU or TRITON_INTERPRET=1"
)


def latents(rows: int, k: int, n: int, dtype: torch.dtype, empty_fraction: float = 0.2):
    """Non-negative values with some empty (-1) slots holding NaN (ignored by definition) and a
    repeated latent within a row."""
    values = randn(rows, k).abs().to(dtype)
    indices = torch.randint(0, n, (rows, k), dtype=torch.int32)
    indices[torch.rand(rows, k) < empty_fraction] = -1
    if k > 1:
        indices[0, 1] = indices[0, 0].clamp_min(0)
    return values, indices, indices < 0


def reference_grads(values, indices, W_dec, b_dec, upstream):
    leaves = [v.detach().cpu().double().requires_grad_() for v in (values, W_dec, b_dec)]
    out = sparse_decode_reference(leaves[0], indices.cpu(), leaves[1], leaves[2])
    return out, torch.autograd.grad((out * upstream.cpu().double()).sum(), leaves)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_forward_matches_reference(dtype, size, with_bias):
    rows, d, n, k = size
    values, indices, empty = latents(rows, k, n, dtype)
    values_nan = values.masked_fill(empty, float("nan"))  # an empty slot's value is never read
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, scale=0.1, dtype=dtype) if with_bias else None
    # NaN in a value trips the finite check, so the empty-slot NaN goes through the kernel directly
    x_hat = sparse_decode(values.to(DEVICE), indices.to(DEVICE), W_dec.to(DEVICE),
                          None if b_dec is None else b_dec.to(DEVICE), backend="triton")  # fmt: skip
    ref = sparse_decode_reference(values.double(), indices, W_dec.double(), None if b_dec is None else b_dec.double())
    assert x_hat.dtype == dtype
    assert_close(x_hat.cpu(), ref, dtype, "x_hat")
    from flashsae.kernels import sparse_rows

    direct = torch.full_like(x_hat, float("nan"))
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    sparse_rows.gather_rows(values_nan.to(DEVICE), indices.to(DEVICE), W_dec.to(DEVICE), direct, flag,
                            bias=None if b_dec is None else b_dec.to(DEVICE))  # fmt: skip
    assert torch.equal(direct, x_hat)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_backward_matches_reference(dtype, size):
    rows, d, n, k = size
    values, indices, _ = latents(rows, k, n, dtype)
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, scale=0.1, dtype=dtype)
    upstream = randn(rows, d, dtype=dtype)
    leaves = [v.to(DEVICE).requires_grad_() for v in (values, W_dec, b_dec)]
    x_hat = sparse_decode(leaves[0], indices.to(DEVICE), leaves[1], leaves[2], backend="triton")
    grads = torch.autograd.grad((x_hat * upstream.to(DEVICE)).sum(), leaves)
    _, ref_grads = reference_grads(values, indices, W_dec, b_dec, upstream)
    for name, g, rg in zip(["d_values", "dW_dec", "db_dec"], grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g.cpu(), rg, dtype, name)


def test_hot_latent_segments_are_exact_and_deterministic():
    # every row selects latents 3 and 5 (segments much longer than a BLOCK_P step), the rest spread
    rows, d, n, k = 150, 20, 40, 4
    values, indices, _ = latents(rows, k, n, torch.float32, empty_fraction=0.1)
    indices[:, 0], indices[:, 2] = 3, 5
    W_dec = randn(n, d, dtype=torch.float32)
    upstream = randn(rows, d, dtype=torch.float32)

    def grads():
        leaves = [values.to(DEVICE).requires_grad_(), W_dec.to(DEVICE).requires_grad_()]
        x_hat = sparse_decode(leaves[0], indices.to(DEVICE), leaves[1], backend="triton")
        return torch.autograd.grad((x_hat * upstream.to(DEVICE)).sum(), leaves)

    first, second = grads(), grads()
    _, ref_grads = reference_grads(values, indices, W_dec, torch.zeros(d), upstream)
    for name, g, again, rg in zip(["d_values", "dW_dec"], first, second, ref_grads, strict=False):
        assert_close(g.cpu(), rg, torch.float32, name)
        assert torch.equal(g, again), f"{name}: not bitwise reproducible"


def test_int64_indices_are_accepted_and_range_checked():
    values, indices, _ = latents(5, 3, 20, torch.float32, empty_fraction=0.0)
    W_dec = randn(20, 8, dtype=torch.float32).to(DEVICE)
    expected = sparse_decode(values.to(DEVICE), indices.to(DEVICE), W_dec, backend="triton")
    assert torch.equal(sparse_decode(values.to(DEVICE), indices.long().to(DEVICE), W_dec, backend="triton"), expected)
    wrapped = indices.long()
    wrapped[2, 1] = 2**32 + 5  # would alias latent 5 if narrowed to int32 without a check
    with pytest.raises(ValueError, match=r"indices: index 4294967301 is out of range"):
        sparse_decode(values.to(DEVICE), wrapped.to(DEVICE), W_dec, backend="triton")


@pytest.mark.parametrize("bad", [20, -2, 1000])
def test_out_of_range_int32_indices_raise_and_are_never_read(bad, monkeypatch):
    values, indices, _ = latents(5, 3, 20, torch.float32, empty_fraction=0.0)
    indices[3, 2] = bad
    W_dec = randn(20, 8, dtype=torch.float32)
    args = (values.to(DEVICE), indices.to(DEVICE), W_dec.to(DEVICE))
    with pytest.raises(ValueError, match=r"indices: some index is out of range; expected a latent in \[0, 20\) or -1"):
        sparse_decode(*args, backend="triton")
    monkeypatch.setattr(_checks, "VALUE_CHECKS", False)  # FLASHSAE_VALUE_CHECKS=0: the slot is skipped
    x_hat = sparse_decode(*args, backend="triton")
    skipped = indices.clone()
    skipped[3, 2] = -1
    assert_close(x_hat.cpu(), sparse_decode_reference(values.double(), skipped, W_dec.double()), torch.float32)


def test_backward_never_materializes_batch_by_latents():
    rows, d, n, k = 64, 8, 4096, 8
    values, indices, _ = latents(rows, k, n, torch.float32)
    values = values.to(DEVICE).requires_grad_()
    W_dec = randn(n, d, dtype=torch.float32).to(DEVICE).requires_grad_()
    with LargestTensorMode() as mode:
        sparse_decode(values, indices.to(DEVICE), W_dec, backend="triton").sum().backward()
    assert mode.largest <= n * d < rows * n, f"{mode.largest} elements from {mode.largest_op}"
