"""sparse_decode on every backend against its float64 reference: forward, sparse backward, empty
slots, index checks, determinism, memory."""

import pytest
import torch

from flashsae import _checks
from flashsae.ops import sparse_decode, sparse_decode_reference
from helpers import (
    ALL_BACKENDS,
    GPU_DTYPES,
    SIZE_IDS,
    SIZES,
    LargestTensorMode,
    assert_close,
    backends,
    backends_and_dtypes,
    randn,
)


def latents(rows: int, k: int, n: int, dtype: torch.dtype, empty_fraction: float = 0.2):
    """Non-negative values with some empty (-1) slots and a repeated latent within a row; and the
    mask of the empty slots."""
    values = randn(rows, k).abs().to(dtype)
    indices = torch.randint(0, n, (rows, k), dtype=torch.int32)
    indices[torch.rand(rows, k) < empty_fraction] = -1
    if k > 1:
        indices[0, 1] = indices[0, 0].clamp_min(0)  # a repeated latent in one row
    return values, indices, indices < 0


def optional(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def reference_grads(values, indices, W_dec, b_dec, upstream):
    leaves = [v.detach().cpu().double().requires_grad_() for v in (values, W_dec, b_dec)]
    out = sparse_decode_reference(leaves[0], indices.cpu(), leaves[1], leaves[2])
    return out, torch.autograd.grad((out * upstream.cpu().double()).sum(), leaves)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize(("be", "dtype"), backends_and_dtypes(), indirect=["be"])
def test_forward_matches_reference(be, dtype, size, with_bias):
    rows, d, n, k = size
    values, indices, empty = latents(rows, k, n, dtype)
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, scale=0.1, dtype=dtype) if with_bias else None
    x_hat = sparse_decode(
        values.to(be.device), indices.to(be.device), W_dec.to(be.device), optional(b_dec, be.device), backend=be.name
    )
    ref = sparse_decode_reference(values.double(), indices, W_dec.double(), None if b_dec is None else b_dec.double())
    assert x_hat.dtype == dtype
    assert_close(x_hat.cpu(), ref, dtype, "x_hat")
    if be.name == "triton":
        # an empty slot's value is never read: NaN there (which the op's finite check refuses)
        # goes through the kernel directly
        from flashsae.kernels import sparse_rows

        direct = torch.full_like(x_hat, float("nan"))
        flag = torch.zeros(1, dtype=torch.int32, device=be.device)
        values_nan = values.masked_fill(empty, float("nan")).to(be.device)
        sparse_rows.gather_rows(values_nan, indices.to(be.device), W_dec.to(be.device), direct, flag,
                                bias=optional(b_dec, be.device))  # fmt: skip
        assert torch.equal(direct, x_hat)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize(("be", "dtype"), backends_and_dtypes(), indirect=["be"])
def test_backward_matches_reference(be, dtype, size):
    rows, d, n, k = size
    values, indices, _ = latents(rows, k, n, dtype)
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, scale=0.1, dtype=dtype)
    upstream = randn(rows, d, dtype=dtype)
    leaves = [v.to(be.device).requires_grad_() for v in (values, W_dec, b_dec)]
    x_hat = sparse_decode(leaves[0], indices.to(be.device), leaves[1], leaves[2], backend=be.name)
    grads = torch.autograd.grad((x_hat * upstream.to(be.device)).sum(), leaves)
    _, ref_grads = reference_grads(values, indices, W_dec, b_dec, upstream)
    for name, g, rg in zip(["d_values", "dW_dec", "db_dec"], grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g.cpu(), rg, dtype, name)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(
    ("rows", "d", "n", "k"), [(37, 97, 1000, 7), (64, 768, 4096, 32), (3, 8, 5, 5), (2, 16, 9, 300)]
)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("be", backends("cuda_fake", "cuda"), indirect=True)
def test_cuda_kernel_paths(be, dtype, rows, d, n, k, with_bias):
    # d = 97 takes the CUDA kernels' scalar path, d = 768 / 8 / 16 the 16-byte one; k = 300 > 256
    # staged slots; indices anywhere in [-1, n)
    values = randn(rows, k).abs().to(dtype)
    indices = torch.randint(-1, n, (rows, k), dtype=torch.int32)
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, dtype=dtype) if with_bias else None
    leaves = [v.to(be.device).requires_grad_() for v in (values, W_dec)]
    bias_leaf = b_dec.to(be.device).requires_grad_() if with_bias else None
    x_hat = sparse_decode(leaves[0], indices.to(be.device), leaves[1], bias_leaf, backend=be.name)
    ref_leaves = [v.double().requires_grad_() for v in (values, W_dec)]
    ref_bias = b_dec.double().requires_grad_() if with_bias else None
    ref = sparse_decode_reference(ref_leaves[0], indices, ref_leaves[1], ref_bias)
    assert_close(x_hat.cpu(), ref, dtype, "x_hat")
    upstream = randn(rows, d)
    grads = torch.autograd.grad((x_hat.double() * upstream.to(be.device)).sum(), [*leaves, *([bias_leaf] * with_bias)])
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [*ref_leaves, *([ref_bias] * with_bias)])
    for name, g, rg in zip(["d_values", "dW_dec", "db_dec"], grads, ref_grads, strict=False):
        assert_close(g.cpu(), rg, dtype, name)


def test_gradcheck_cpu():
    values, indices, _ = latents(6, 4, 30, torch.float64)
    W_dec = randn(30, 5).requires_grad_()
    b_dec = randn(5).requires_grad_()

    def fn(v, w, b):
        return sparse_decode(v, indices, w, b, backend="cpu")

    assert torch.autograd.gradcheck(fn, (values.requires_grad_(), W_dec, b_dec))


@pytest.mark.parametrize("be", backends(*ALL_BACKENDS), indirect=True)
def test_int64_indices_are_accepted_and_range_checked(be):
    values, indices, _ = latents(5, 3, 20, torch.float32, empty_fraction=0.0)
    values, W_dec = values.to(be.device), randn(20, 8, dtype=torch.float32).to(be.device)
    expected = sparse_decode(values, indices.to(be.device), W_dec, backend=be.name)
    assert torch.equal(sparse_decode(values, indices.long().to(be.device), W_dec, backend=be.name), expected)
    wrapped = indices.long()
    wrapped[2, 1] = 2**32 + 5  # would alias latent 5 if narrowed to int32 without a check
    with pytest.raises(ValueError, match=r"indices: index 4294967301 is out of range"):
        sparse_decode(values, wrapped.to(be.device), W_dec, backend=be.name)


@pytest.mark.parametrize("bad", [20, -2, 1000])
def test_cpu_kernel_rejects_out_of_range_indices(bad):
    values, indices, _ = latents(5, 3, 20, torch.float32, empty_fraction=0.0)
    indices[3, 2] = bad
    with pytest.raises(ValueError, match=rf"indices: index {bad} at \[3, 2\] is out of range"):
        sparse_decode(values, indices, randn(20, 8, dtype=torch.float32), backend="cpu")


@pytest.mark.parametrize("bad", [20, -2, 1000])
@pytest.mark.parametrize("be", backends("triton", "cuda", "cuda_fake"), indirect=True)
def test_out_of_range_int32_indices_raise_and_are_never_read(be, bad, monkeypatch):
    # the GPU kernels skip the slot and raise a device flag, which the op reads back
    values, indices, _ = latents(5, 3, 20, torch.float32, empty_fraction=0.0)
    indices[3, 2] = bad
    W_dec = randn(20, 8, dtype=torch.float32)
    args = (values.to(be.device), indices.to(be.device), W_dec.to(be.device))
    with pytest.raises(ValueError, match=r"indices: some index is out of range; expected a latent in \[0, 20\) or -1"):
        sparse_decode(*args, backend=be.name)
    monkeypatch.setattr(_checks, "VALUE_CHECKS", False)  # FLASHSAE_VALUE_CHECKS=0: the slot is skipped
    x_hat = sparse_decode(*args, backend=be.name)
    skipped = indices.clone()
    skipped[3, 2] = -1
    assert_close(x_hat.cpu(), sparse_decode_reference(values.double(), skipped, W_dec.double()), torch.float32)


@pytest.mark.parametrize("be", backends("triton", "cuda", "cuda_fake"), indirect=True)
def test_hot_latent_segments_are_exact_and_deterministic(be):
    # every row selects latents 3 and 5 (segments much longer than a BLOCK_P step), the rest spread
    rows, d, n, k = 150, 20, 40, 4
    values, indices, _ = latents(rows, k, n, torch.float32, empty_fraction=0.1)
    indices[:, 0], indices[:, 2] = 3, 5
    W_dec = randn(n, d, dtype=torch.float32)
    upstream = randn(rows, d, dtype=torch.float32)

    def grads():
        leaves = [values.to(be.device).requires_grad_(), W_dec.to(be.device).requires_grad_()]
        x_hat = sparse_decode(leaves[0], indices.to(be.device), leaves[1], backend=be.name)
        return torch.autograd.grad((x_hat * upstream.to(be.device)).sum(), leaves)

    first, second = grads(), grads()
    _, ref_grads = reference_grads(values, indices, W_dec, torch.zeros(d), upstream)
    for name, g, again, rg in zip(["d_values", "dW_dec"], first, second, ref_grads, strict=False):
        assert_close(g.cpu(), rg, torch.float32, name)
        assert torch.equal(g, again), f"{name}: not bitwise reproducible"


@pytest.mark.parametrize("be", backends(*ALL_BACKENDS), indirect=True)
def test_backward_never_materializes_batch_by_latents(be):
    rows, d, n, k = 256, 16, 8192, 8
    values, indices, _ = latents(rows, k, n, torch.float32)
    values = values.to(be.device).requires_grad_()
    W_dec = randn(n, d, dtype=torch.float32).to(be.device).requires_grad_()
    with LargestTensorMode() as mode:
        sparse_decode(values, indices.to(be.device), W_dec, backend=be.name).sum().backward()
    assert mode.largest <= n * d < rows * n, f"{mode.largest} elements from {mode.largest_op}"


@pytest.mark.parametrize("be", backends("cuda"), indirect=True)
def test_runs_on_the_current_stream(be):
    values = torch.rand(512, 16, device="cuda")
    indices = torch.randint(0, 2048, (512, 16), dtype=torch.int32, device="cuda")
    W_dec = torch.randn(2048, 256, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    with torch.cuda.stream(side):
        x_hat = sparse_decode(values, indices, W_dec, backend="cuda")
    side.synchronize()
    torch.testing.assert_close(x_hat, sparse_decode(values, indices, W_dec, backend="torch"))
