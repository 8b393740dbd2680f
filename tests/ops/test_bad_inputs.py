"""Bad input raises TypeError/ValueError naming the argument (first, so a user knows which one to
fix) and what was expected."""

import pytest
import torch

from flashsae import BackendUnavailableError, TopKSAE
from flashsae._checks import check_finite
from flashsae.ops import sae_loss, sparse_decode, topk_encode

ROWS, D, N, K = 5, 8, 20, 3


def base() -> dict:
    return {
        "x": torch.randn(ROWS, D),
        "W_enc": torch.randn(N, D),
        "b_enc": torch.randn(N),
        "b_dec": torch.randn(D),
        "W_dec": torch.randn(N, D),
        "values": torch.rand(ROWS, K),
        "indices": torch.randint(0, N, (ROWS, K), dtype=torch.int32),
        "k": K,
    }


def nan_at(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = value
    return t


def strided(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous().T


def call_encode(a, **kw):
    return topk_encode(a["x"], a["W_enc"], a["b_enc"], a["k"], a["b_dec"], **kw)


def call_decode(a, **kw):
    return sparse_decode(a["values"], a["indices"], a["W_dec"], a["b_dec"], **kw)


def call_loss(a, **kw):
    return sae_loss(a["x"], a["values"], a["indices"], a["W_dec"], a["b_dec"], **kw)


CASES = [
    # (op, field overrides, extra kwargs, exception, message pattern)
    (call_encode, {"x": torch.randn(ROWS, D + 1)}, {}, ValueError, r"x: expected shape \[batch, d=8\], got \[5, 9\]"),
    (call_encode, {"x": torch.randn(2, ROWS, D)}, {}, ValueError, r"x: expected shape \[batch, d=8\]"),
    (call_encode, {"x": torch.randn(ROWS, D).double()}, {}, TypeError, r"x: expected dtype float32 \(the dtype of W_enc\)"),
    (call_encode, {"x": torch.ones(ROWS, D, dtype=torch.int64)}, {}, TypeError, r"x: expected dtype float32"),
    (call_encode, {"x": torch.randn(ROWS, D, device="meta")}, {}, ValueError, r"x: expected a tensor on cpu \(the device of W_enc\), got meta"),
    (call_encode, {"x": nan_at(torch.randn(ROWS, D))}, {}, ValueError, r"x: contains 1 NaN or Inf"),
    (call_encode, {"x": nan_at(torch.randn(ROWS, D), float("inf"))}, {}, ValueError, r"x: contains 1 NaN or Inf"),
    (call_encode, {"x": torch.randn(0, D)}, {}, ValueError, r"x: expected a non-empty tensor"),
    (call_encode, {"x": strided(torch.randn(ROWS, D))}, {}, ValueError, r"x: expected a contiguous tensor"),
    (call_encode, {"x": [[0.0] * D] * ROWS}, {}, TypeError, r"x: expected a torch.Tensor, got list"),
    (call_encode, {"k": 0}, {}, ValueError, r"k: expected 1 <= k <= n_latents \(20\), got 0"),
    (call_encode, {"k": -2}, {}, ValueError, r"k: expected 1 <= k <= n_latents \(20\), got -2"),
    (call_encode, {"k": N + 1}, {}, ValueError, r"k: expected 1 <= k <= n_latents \(20\), got 21"),
    (call_encode, {"k": 2.0}, {}, TypeError, r"k: expected an int, got float"),
    (call_encode, {"b_enc": torch.randn(N + 1)}, {}, ValueError, r"b_enc: expected shape \[n_latents=20\]"),
    (call_encode, {"b_dec": torch.randn(D).half()}, {}, TypeError, r"b_dec: expected dtype float32"),
    (call_encode, {"W_enc": torch.randn(D, N)}, {}, ValueError, r"x: expected shape \[batch, d=20\]"),
    (call_encode, {"W_enc": strided(torch.randn(N, D))}, {}, ValueError, r"W_enc: expected a contiguous tensor"),
    (call_encode, {}, {"aux_k": 2}, ValueError, r"dead_mask: required when aux_k > 0"),
    (call_encode, {}, {"dead_mask": torch.zeros(N, dtype=torch.bool)}, ValueError, r"aux_k: dead_mask was given"),
    (call_encode, {}, {"dead_mask": torch.zeros(N), "aux_k": 2}, TypeError, r"dead_mask: expected dtype bool"),
    (call_encode, {}, {"dead_mask": torch.zeros(N - 1, dtype=torch.bool), "aux_k": 2}, ValueError, r"dead_mask: expected shape"),
    (call_encode, {}, {"dead_mask": torch.zeros(N, dtype=torch.bool), "aux_k": N + 1}, ValueError, r"aux_k: expected 0 <= aux_k"),
    (call_encode, {}, {"backend": "gpu"}, ValueError, r"backend: expected one of auto, cuda, triton, cpu, torch, got 'gpu'"),
    (call_encode, {}, {"backend": "cuda"}, BackendUnavailableError, r"backend 'cuda' cannot run topk_encode: it runs on cuda tensors"),
    (call_encode, {k: base()[k].double() for k in ("x", "W_enc", "b_enc", "b_dec")}, {"backend": "triton"}, BackendUnavailableError, r"backend 'triton' cannot run topk_encode: (its kernels take float32, bfloat16 or float16 tensors and these are float64|triton is not installed|it runs on cuda tensors)"),
    (call_decode, {"values": torch.rand(ROWS, K + 1)}, {}, ValueError, r"indices: expected shape \[batch=5, k=4\], got \[5, 3\]"),
    (call_decode, {"indices": torch.rand(ROWS, K)}, {}, TypeError, r"indices: expected dtype int32 or int64, got torch.float32"),
    (call_decode, {"values": torch.rand(ROWS, K).double()}, {}, TypeError, r"values: expected dtype float32 \(the dtype of W_dec\)"),
    (call_decode, {"values": nan_at(torch.rand(ROWS, K))}, {}, ValueError, r"values: contains 1 NaN or Inf"),
    (call_decode, {"values": strided(torch.rand(K, ROWS).T.contiguous())}, {}, ValueError, r"values: expected a contiguous"),
    (call_decode, {"values": torch.rand(0, K), "indices": torch.zeros(0, K, dtype=torch.int32)}, {}, ValueError, r"values: expected a non-empty"),
    (call_decode, {"b_dec": torch.randn(D - 1)}, {}, ValueError, r"b_dec: expected shape \[d=8\], got \[7\]"),
    (call_decode, {"W_dec": torch.randn(N, D, dtype=torch.float16)}, {}, TypeError, r"values: expected dtype float16 \(the dtype of W_dec\)"),
    (call_decode, {}, {"backend": "cuda"}, BackendUnavailableError, r"backend 'cuda' cannot run sparse_decode"),
    (call_loss, {"x": torch.randn(ROWS + 1, D)}, {}, ValueError, r"values: expected shape \[batch=6, k\], got \[5, 3\]"),
    (call_loss, {"x": nan_at(torch.randn(ROWS, D))}, {}, ValueError, r"x: contains 1 NaN or Inf"),
    (call_loss, {}, {"aux_values": torch.rand(ROWS, 2)}, ValueError, r"aux_values, aux_indices: pass both or neither"),
    (call_loss, {}, {"aux_values": torch.rand(ROWS, 2), "aux_indices": torch.zeros(ROWS, 3, dtype=torch.int32)}, ValueError, r"aux_indices: expected shape \[batch=5, aux_k=2\]"),
    (call_loss, {"indices": torch.full((ROWS, K), N, dtype=torch.int32)}, {}, ValueError, r"indices: index 20 at \[0, 0\] is out of range"),
]  # fmt: skip


@pytest.mark.parametrize(("op", "overrides", "kwargs", "error", "pattern"), CASES)
def test_bad_input_is_named(op, overrides, kwargs, error, pattern):
    args = {**base(), **overrides}
    with pytest.raises(error, match=pattern):
        op(args, **kwargs)


def test_valid_base_inputs_pass():
    # the table above is only meaningful if its unmodified inputs are accepted
    a = base()
    assert call_encode(a)[0].shape == (ROWS, K)
    assert call_decode(a).shape == (ROWS, D)
    assert call_loss(a).x_hat.shape == (ROWS, D)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"d_in": 0, "n_latents": 10, "k": 2}, ValueError, r"d_in: expected a positive int, got 0"),
        ({"d_in": 8, "n_latents": 10, "k": 11}, ValueError, r"k: expected 1 <= k <= n_latents \(10\), got 11"),
        ({"d_in": 8, "n_latents": 10, "k": 0}, ValueError, r"k: expected a positive int, got 0"),
        ({"d_in": 8.0, "n_latents": 10, "k": 2}, ValueError, r"d_in: expected a positive int, got 8.0"),
        ({"d_in": 8, "n_latents": 10, "k": 2, "aux_k": 11}, ValueError, r"aux_k: expected 1 <= aux_k <= n_latents"),
        ({"d_in": 8, "n_latents": 10, "k": 2, "dtype": torch.int32}, TypeError, r"dtype: expected one of float32"),
        ({"d_in": 8, "n_latents": 10, "k": 2, "backend": "fast"}, ValueError, r"backend: expected one of"),
    ],
)
def test_topk_sae_constructor_rejects_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        TopKSAE(**kwargs)


def test_topk_sae_rejects_wrong_input_width():
    sae = TopKSAE(8, 20, 3)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., d_in=8\], got \[4, 7\]"):
        sae(torch.randn(4, 7))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got ndarray"):
        sae.encode(torch.randn(4, 8).numpy())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_anywhere(dtype, bad):
    x = torch.randn(37, 13, dtype=torch.float64)
    x[0, 0] = torch.finfo(dtype).max  # extremes are finite: no false alarm
    x[1, 1] = torch.finfo(dtype).min
    check_finite("x", x.to(dtype))
    for position in [(0, 0), (36, 12), (17, 5)]:
        y = x.clone()
        y[position] = bad
        with pytest.raises(ValueError, match=r"x: contains 1 NaN or Inf"):
            check_finite("x", y.to(dtype))
    check_finite("x", torch.empty(0, 13, dtype=dtype))  # nothing to check
