"""The C++ running top-k (topk_state_merge) against a stable sort of the same keys, chunk by chunk.

A row whose heap is not yet full of positive keys first takes a floor that at least k of its
disjoint column sets' maxima reach (16-wide groups, or lane-strided sets with AVX-512;
csrc/cpu/topk_encode.cpp): these cases make that floor decide, and not decide:
chunks with at least k groups and with fewer, rows with many exact ties (ties go to the lower
index), rows with few or no positive keys, NaN keys, and a heap that is already full when a chunk
arrives."""

import pytest
import torch

from flashsae._native import DTYPE_CODES, _C, addr
from flashsae.ops import _topk_encode_cpu as cpu_path


def reference(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of relu(keys) per row, ties to the lower index; relu(NaN) is 0, as in the merge."""
    act = keys.nan_to_num(nan=float("-inf")).clamp_min(0.0)
    top = torch.sort(act, dim=1, descending=True, stable=True)
    return top.values[:, :k], top.indices[:, :k].to(torch.int32)


def merge_all(scores: torch.Tensor, bias: torch.Tensor, k: int, widths: list[int]):
    """finish() of the heap after merging `scores` [rows, n] in chunks of `widths` columns."""
    rows, n = scores.shape
    heap, heap_ids = cpu_path.heap_state(rows, k, torch.float32)
    c0 = 0
    for width in widths:
        chunk = scores[:, c0 : c0 + width].contiguous()
        _C.topk_state_merge(
            scores=addr(chunk), ld=width, rows=rows, cols=width, col0=c0, n_latents=n, heap_scores=addr(heap),
            heap_indices=addr(heap_ids), k=k, dead_mask=0, aux_scores=0, aux_indices=0, aux_k=0,
            score_dtype=DTYPE_CODES[torch.float32], chunk_dtype=DTYPE_CODES[scores.dtype], bias=addr(bias),
            row_bound=0, col_bound=0, rel=0.0,
        )  # fmt: skip
        c0 += width
    assert c0 == n
    return cpu_path.finish(heap, heap_ids, rows, k, torch.float32)


def make_keys(rows: int, n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    keys = torch.randn(rows, n, generator=generator)
    if kind == "ties":  # a handful of values: exact ties inside and across groups and chunks
        keys = torch.randint(-2, 4, (rows, n), generator=generator).float() / 2
    elif kind == "few_positive":  # most rows have fewer positive keys than k
        keys = keys - 3.0
        keys[0] = -1.0
    elif kind == "nan":
        keys[torch.rand(rows, n, generator=generator) < 0.05] = float("nan")
    elif kind == "sorted":  # ascending: every key beats the current root, the floor does all the work
        keys = torch.sort(keys, dim=1).values
    return keys


KINDS = ["random", "ties", "few_positive", "nan", "sorted"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "k, widths",
    [(5, [1003]), (7, [96, 907, 1]), (20, [333, 320, 350]), (31, [1003]), (63, [1003]), (1003, [1003])],
    ids=["k5", "k7_narrow_first", "k20_three", "k31", "k63_few_groups", "k_eq_n"],
)
def test_merge_equals_stable_sort(kind, dtype, k, widths):
    generator = torch.Generator().manual_seed(1000 * k + 10 * len(widths) + KINDS.index(kind))
    rows, n = 13, sum(widths)
    keys = make_keys(rows, n, kind, generator)
    bias = torch.randn(n, generator=generator)
    scores = (keys - bias).to(dtype)
    values, indices = merge_all(scores, bias, k, widths)
    # the merge's key is float32(score) + bias in float32, as here
    expected_values, expected_indices = reference(scores.float() + bias, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)
