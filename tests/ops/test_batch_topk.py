"""batch_topk (BatchTopK's exact global selection) against its dense definition: every retry path,
the dense fallback, ties, gradients, the AuxK pair, bad inputs."""

import importlib

import pytest
import torch

from helpers import SIZE_IDS, SIZES, assert_close, f64, sae_tensors

#: The composite whose DENSE_FRACTION the ``path`` fixture (tests/ops/conftest.py) sets.
composite_module = importlib.import_module("flashsae.ops.batch_topk")
batch_topk, batch_topk_reference = composite_module.batch_topk, composite_module.batch_topk_reference


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(("rows", "d", "n", "k"), SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("candidates", [1, None, 10_000], ids=["retry", "default", "all"])
def test_op_matches_dense_definition_float64(rows, d, n, k, candidates, backend, path):
    t = sae_tensors(rows, d, n, torch.float64)
    args = (t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"])
    values, indices, aux_values, aux_indices = batch_topk(*args, candidates=candidates, backend=backend)
    ref_values, ref_indices = batch_topk_reference(*args)
    assert aux_values is None and aux_indices is None
    assert indices.dtype == torch.int32 and values.is_contiguous() and indices.is_contiguous()
    assert torch.equal(indices, ref_indices)
    assert_close(values, ref_values, torch.float64, "values")
    active = indices >= 0
    assert (values[active] > 0).all() and (values[~active] == 0).all()
    assert int(active.sum()) <= rows * k


def test_op_gradients_match_reference(path):
    t = sae_tensors(29, 33, 300, torch.float64)
    ours, ref = f64(t, requires_grad=True), f64(t, requires_grad=True)
    g = torch.randn(29, 300, dtype=torch.float64)
    out = batch_topk(ours["x"], ours["W_enc"], ours["b_enc"], 5, ours["b_dec"], candidates=2)
    expected = batch_topk_reference(ref["x"], ref["W_enc"], ref["b_enc"], 5, ref["b_dec"])
    m = out.values.shape[1]
    (out.values * g[:, :m]).sum().backward()
    (expected[0] * g[:, :m]).sum().backward()
    for name in ("x", "W_enc", "b_enc", "b_dec"):
        assert_close(ours[name].grad, ref[name].grad, torch.float64, f"grad {name}")


def test_op_exact_ties_follow_row_major_order(path):
    # every activation equal: the selection is the first rows * k entries in row-major order
    x = torch.ones(6, 4, dtype=torch.float64)
    W_enc = torch.ones(10, 4, dtype=torch.float64) / 4
    b_enc = torch.zeros(10, dtype=torch.float64)
    for candidates in (1, 3, 10):
        values, indices, _, _ = batch_topk(x, W_enc, b_enc, 3, candidates=candidates)
        ref_values, ref_indices = batch_topk_reference(x, W_enc, b_enc, 3)
        assert torch.equal(indices, ref_indices)
        assert torch.equal(values, ref_values)
        # 18 selected in row-major order: all 10 latents of row 0, then 8 of row 1
        assert (indices[0] >= 0).sum() == 10 and (indices[1] >= 0).sum() == 8 and (indices[2:] < 0).all()


def test_op_fewer_positive_than_budget_and_aux(path):
    t = sae_tensors(12, 16, 80, torch.float64)
    b_enc = torch.full((80,), -2.5, dtype=torch.float64)  # few positive activations
    dead = torch.rand(80) < 0.5
    out = batch_topk(t["x"], t["W_enc"], b_enc, 20, t["b_dec"], candidates=1, dead_mask=dead, aux_k=7)
    ref_values, ref_indices = batch_topk_reference(t["x"], t["W_enc"], b_enc, 20, t["b_dec"])
    assert torch.equal(out.indices, ref_indices)
    assert_close(out.values, ref_values, torch.float64, "values")
    pre = (t["x"] - t["b_dec"]) @ t["W_enc"].T + b_enc
    assert int((out.indices >= 0).sum()) == int((pre > 0).sum()) < 12 * 20
    topk_encode = importlib.import_module("flashsae.ops.topk_encode").topk_encode_reference
    _, _, aux_values, aux_indices = topk_encode(t["x"], t["W_enc"], b_enc, 1, t["b_dec"], dead_mask=dead, aux_k=7)
    assert torch.equal(out.aux_indices, aux_indices)
    assert_close(out.aux_values, aux_values, torch.float64, "aux values")


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"k": 0}, ValueError, r"k: expected 1 <= k"),
        ({"k": 81}, ValueError, r"k: expected 1 <= k"),
        ({"k": 2.0}, TypeError, r"k: expected an int"),
        ({"k": 2, "candidates": 0}, ValueError, r"candidates: expected a positive int"),
        ({"k": 2, "dead_mask": torch.ones(80, dtype=torch.bool)}, ValueError, r"aux_k: dead_mask was given"),
    ],
)
def test_op_bad_inputs(kwargs, error, pattern):
    t = sae_tensors(4, 8, 80, torch.float32)
    k = kwargs.pop("k")
    with pytest.raises(error, match=pattern):
        batch_topk(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], **kwargs)
