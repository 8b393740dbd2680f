"""The CUDA top-k select's algorithm, run by its sequential host mirror in flashsae._C (CPU, every CI run).

csrc/cuda/topk_encode_host.cpp runs csrc/cuda/topk_encode.cu's steps (keys, threshold filter,
capacity rule, radix cut, compaction, sort) with the same shared functions (csrc/cuda/topk_keys.h),
with the slice and buffer capacity as parameters so that small inputs go through many merges. The
result must be exactly a stable descending sort's top k: same latents, same float32 values.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashsae import _C

KERNEL_SLICE = 2048  # topk_encode.cu: kSlice and kCapacity
KERNEL_CAPACITY = 2048


def mirror_select(
    scores: torch.Tensor,
    k: int,
    *,
    chunks: list[int] | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    dead: torch.Tensor | None = None,
    aux_k: int = 0,
    slice_: int = 8,
    capacity: int = 8,
):
    """Runs the mirror over float32 scores [rows, n], chunk by chunk (chunk widths in `chunks`), then
    finishes: (values, indices[, aux_values, aux_indices])."""
    rows, n = scores.shape
    scores = scores.float().contiguous()
    state = torch.zeros(rows, k, dtype=torch.int64)
    aux_state = torch.zeros(rows, max(aux_k, 1), dtype=torch.int64)
    bias32 = None if bias is None else bias.float().contiguous()
    dead8 = None if dead is None else dead.to(torch.uint8).contiguous()
    widths = chunks or [n]
    assert sum(widths) == n
    c0 = 0
    for width in widths:
        chunk = scores[:, c0 : c0 + width]  # a strided view: row stride n
        _C.topk_select_host(
            scores=chunk.data_ptr(), ld=n, rows=rows, cols=width, col0=c0,
            bias=0 if bias32 is None else bias32.data_ptr(), relu=relu, state=state.data_ptr(), k=k,
            dead_mask=0 if dead8 is None else dead8.data_ptr(), aux_state=aux_state.data_ptr() if aux_k else 0,
            aux_k=aux_k, slice=slice_, capacity=capacity,
        )  # fmt: skip
        c0 += width
    out = []
    for st_, slots in ((state, k), (aux_state, aux_k)):
        if not slots:
            continue
        values = torch.full((rows, slots), float("nan"))
        indices = torch.full((rows, slots), -(2**31), dtype=torch.int32)
        _C.topk_finish_host(
            state=st_.data_ptr(), rows=rows, k=slots, values=values.data_ptr(), indices=indices.data_ptr()
        )
        out += [values, indices]
    return tuple(out)


def sort_reference(scores, k, *, bias=None, relu=False, dead=None, aux_k=0):
    """Stable descending sort in float32 (the select's own precision): ties go to the lower index."""
    act = scores.float() + (0 if bias is None else bias.float())
    if relu:
        act = act.relu()
    top = torch.sort(act, dim=1, descending=True, stable=True)
    out = (top.values[:, :k], top.indices[:, :k].int())
    if aux_k:
        masked = act.masked_fill(~dead, float("-inf"))
        aux = torch.sort(masked, dim=1, descending=True, stable=True)
        values, indices = aux.values[:, :aux_k], aux.indices[:, :aux_k].int()
        empty = values == float("-inf")
        out += (values.masked_fill(empty, 0.0), indices.masked_fill(empty, -1))
    return out


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), f"first difference at {(a != e).nonzero()[:3].tolist()}"


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("rows", "n", "k"), [(7, 1000, 7), (3, 50, 1), (4, 33, 33), (1, 5000, 64), (2, 2049, 100)])
@pytest.mark.parametrize(("slice_", "capacity"), [(8, 8), (5, 13), (KERNEL_SLICE, KERNEL_CAPACITY)])
def test_matches_a_stable_sort(rows, n, k, relu, slice_, capacity):
    scores = torch.randn(rows, n)
    out = mirror_select(scores, k, relu=relu, slice_=slice_, capacity=capacity)
    assert_same(out, sort_reference(scores, k, relu=relu))


@pytest.mark.parametrize("relu", [False, True])
def test_exact_integer_ties_go_to_the_lower_index(relu):
    # 5 distinct values over 3000 latents: every cut falls inside a run of equal scores, so the
    # radix select must finish on the latent bits (and, with relu, most scores are an exact 0)
    scores = torch.randint(-2, 3, (6, 3000)).float()
    for k in (1, 17, 600, 3000):
        assert_same(mirror_select(scores, k, relu=relu), sort_reference(scores, k, relu=relu))


def test_chunks_carry_the_state():
    # the encoder feeds a row chunk by chunk (one launch per chunk): same result as one pass
    scores = torch.randn(5, 1001)
    bias = torch.randn(1001)
    expected = sort_reference(scores, 40, bias=bias, relu=True)
    for chunks in ([1001], [256, 256, 256, 233], [1, 999, 1], [40, 961]):
        assert_same(mirror_select(scores, 40, chunks=chunks, bias=bias, relu=True), expected)


@pytest.mark.parametrize("n_dead", [0, 3, 40, 1000])
def test_aux_selection_over_dead_latents(n_dead):
    rows, n, k, aux_k = 4, 1000, 9, 20
    scores = torch.randn(rows, n)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    out = mirror_select(scores, k, relu=True, dead=dead, aux_k=aux_k, chunks=[300, 300, 400])
    expected = sort_reference(scores, k, relu=True, dead=dead, aux_k=aux_k)
    assert_same(out, expected)
    # fewer dead latents than slots: the rest are value 0, index -1
    assert (out[3][:, min(n_dead, aux_k) :] == -1).all() and (out[2][:, min(n_dead, aux_k) :] == 0).all()


def test_special_values_order_like_floats():
    # -inf < -1 < -0 < +0 < denormal < 1 < inf; the key decodes back to the same bits
    special = torch.tensor([float("-inf"), -1.0, -0.0, 0.0, 1e-45, 1.0, float("inf"), -3e38, 3e38])
    latents = torch.arange(special.numel(), dtype=torch.int32)
    keys = torch.empty(special.numel(), dtype=torch.int64)
    _C.topk_make_keys_host(
        values=special.data_ptr(), latents=latents.data_ptr(), count=special.numel(), keys=keys.data_ptr()
    )
    as_unsigned = [k % 2**64 for k in keys.tolist()]
    order = sorted(range(special.numel()), key=lambda i: as_unsigned[i])
    expected = torch.tensor([float("-inf"), -3e38, -1.0, -0.0, 0.0, 1e-45, 1.0, 3e38, float("inf")])
    assert torch.equal(special[order], expected)
    assert math.copysign(1, special[order[3]].item()) == -1  # -0 below +0
    assert all(k != 0 for k in as_unsigned), "a real key must never be the empty key 0"
    values, indices = mirror_select(special[None], special.numel())
    assert torch.equal(values[0].view(torch.int32), special[order[::-1]].view(torch.int32))
    assert indices[0].tolist() == order[::-1]


def test_equal_scores_tie_by_latent_across_the_whole_row():
    scores = torch.full((2, 777), 0.5)
    values, indices = mirror_select(scores, 100, chunks=[100, 677])
    assert indices.tolist() == [list(range(100))] * 2 and (values == 0.5).all()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    data=st.data(),
    slice_=st.integers(1, 40),
    extra=st.integers(0, 40),
    relu=st.booleans(),
    levels=st.sampled_from([3, 50, 0]),
)
def test_property_any_shape_any_schedule(n, data, slice_, extra, relu, levels):
    k = data.draw(st.integers(1, n))
    rows = data.draw(st.integers(1, 3))
    # few levels: heavy ties; 0: continuous scores
    scores = torch.randint(-levels, levels + 1, (rows, n)).float() if levels else torch.randn(rows, n)
    cut = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True))) if n > 1 else []
    chunks = [b - a for a, b in zip([0, *cut], [*cut, n], strict=True)]
    dead = torch.rand(n) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    aux_k = data.draw(st.integers(0, n))
    out = mirror_select(
        scores, k, chunks=chunks, relu=relu, dead=dead, aux_k=aux_k, slice_=slice_, capacity=slice_ + extra
    )
    assert_same(out, sort_reference(scores, k, relu=relu, dead=dead, aux_k=aux_k))


def test_bad_arguments_are_refused():
    state = torch.zeros(1, 2, dtype=torch.int64)
    scores = torch.zeros(1, 4)
    args = {
        "scores": scores.data_ptr(), "ld": 4, "rows": 1, "cols": 4, "col0": 0, "bias": 0, "relu": False,
        "state": state.data_ptr(), "k": 2, "dead_mask": 0, "aux_state": 0, "aux_k": 0, "slice": 8, "capacity": 8,
    }  # fmt: skip
    with pytest.raises(ValueError, match="slice, capacity"):
        _C.topk_select_host(**args | {"capacity": 4})
    with pytest.raises(ValueError, match="dead_mask, aux_state"):
        _C.topk_select_host(**args | {"aux_k": 1})
    with pytest.raises(ValueError, match="ld >= cols"):
        _C.topk_select_host(**args | {"ld": 3})
