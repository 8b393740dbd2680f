"""threshold_encode (JumpReLU's per-latent thresholds) against its dense definition: every retry
path, the dense fallback, nothing active, gradients, bad inputs, memory."""

import importlib

import pytest
import torch

from helpers import SIZE_IDS, SIZES, LargestTensorMode, assert_close, f64, sae_tensors

#: The composite whose DENSE_FRACTION the ``path`` fixture (tests/ops/conftest.py) sets.
composite_module = importlib.import_module("flashsae.ops.threshold_encode")
topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")
threshold_encode = composite_module.threshold_encode
threshold_encode_reference = composite_module.threshold_encode_reference


def thresholds(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-latent thresholds around the pre-activations' scale, a few <= 0 (plain ReLU there)."""
    return (torch.rand(n, dtype=torch.float64) * 1.5 - 0.2).to(dtype)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(("rows", "d", "n", "k"), SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("candidates", [1, None, 100_000], ids=["retry", "default", "all"])
def test_op_matches_dense_definition_float64(rows, d, n, k, candidates, backend, path):
    t = sae_tensors(rows, d, n, torch.float64)
    theta = thresholds(n, torch.float64)
    args = (t["x"], t["W_enc"], t["b_enc"], theta, t["b_dec"])
    values, indices = threshold_encode(*args, candidates=candidates, backend=backend)
    ref_values, ref_indices = threshold_encode_reference(*args)
    assert indices.dtype == torch.int32 and values.is_contiguous() and indices.is_contiguous()
    assert torch.equal(indices, ref_indices)
    assert_close(values, ref_values, torch.float64, "values")
    active = indices >= 0
    assert (values[active] > 0).all() and (values[~active] == 0).all()
    assert (values[:, :-1] >= values[:, 1:]).all(), "rows not sorted by value"


def test_op_without_b_dec_and_nothing_active(path):
    t = sae_tensors(7, 12, 40, torch.float64)
    values, indices = threshold_encode(t["x"], t["W_enc"], t["b_enc"], torch.full((40,), 1e6, dtype=torch.float64))
    assert values.shape == (7, 1) and (indices == -1).all() and (values == 0).all()
    values, indices = threshold_encode(t["x"], t["W_enc"], t["b_enc"], torch.zeros(40, dtype=torch.float64))
    ref_values, ref_indices = threshold_encode_reference(t["x"], t["W_enc"], t["b_enc"], torch.zeros(40).double())
    assert torch.equal(indices, ref_indices)
    assert_close(values, ref_values, torch.float64, "relu values")


def test_op_gradients_match_reference(path):
    t = sae_tensors(23, 31, 200, torch.float64)
    theta = thresholds(200, torch.float64)
    ours, ref = f64(t, requires_grad=True), f64(t, requires_grad=True)
    values, _ = threshold_encode(ours["x"], ours["W_enc"], ours["b_enc"], theta, ours["b_dec"], candidates=3)
    expected, _ = threshold_encode_reference(ref["x"], ref["W_enc"], ref["b_enc"], theta, ref["b_dec"])
    g = torch.randn(expected.shape, dtype=torch.float64)
    (values * g).sum().backward()
    (expected * g).sum().backward()
    for name in ("x", "W_enc", "b_enc", "b_dec"):
        assert_close(ours[name].grad, ref[name].grad, torch.float64, f"grad {name}")


@pytest.mark.parametrize(
    ("threshold", "kwargs", "error", "pattern"),
    [
        (torch.zeros(39), {}, ValueError, r"threshold: expected shape \[n_latents=40\]"),
        (torch.zeros(40, dtype=torch.float64), {}, TypeError, r"threshold: expected dtype float32"),
        (torch.full((40,), float("nan")), {}, ValueError, r"threshold: contains 40 NaN"),
        (torch.zeros(40), {"candidates": 0}, ValueError, r"candidates: expected a positive int"),
        ([0.0] * 40, {}, TypeError, r"threshold: expected a torch.Tensor"),
    ],
)
def test_op_bad_inputs(threshold, kwargs, error, pattern):
    t = sae_tensors(4, 8, 40, torch.float32)
    with pytest.raises(error, match=pattern):
        threshold_encode(t["x"], t["W_enc"], t["b_enc"], threshold, t["b_dec"], **kwargs)


@pytest.mark.parametrize("candidates", [4, None], ids=["retry", "default"])
def test_op_never_materializes_batch_by_latents(candidates, monkeypatch):
    rows, d, n = 512, 32, 8192
    monkeypatch.setattr(topk_encode_module, "TILE_ELEMENTS", 1 << 17)  # 256-latent tiles
    t = sae_tensors(rows, d, n, torch.float32)
    theta = torch.full((n,), 2.5)  # about 20 active latents per row
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    with LargestTensorMode() as mode:
        values, _ = threshold_encode(
            leaves["x"], leaves["W_enc"], leaves["b_enc"], theta, leaves["b_dec"], candidates=candidates
        )
        values.sum().backward()
    m = values.shape[1]
    assert candidates is None or m > candidates, "the retry path did not run"
    assert mode.largest <= max(n * d, rows * (256 + 2 * m)), f"{mode.largest} from {mode.largest_op}"
    assert mode.largest < rows * n // 4
