"""The CUDA top-k select kernel on wide rows, and the cuda backend at GPU sizes (skipped without a GPU).

The select is exact: its keys are the scores' own bits (csrc/cuda/topk_keys.h), so its output must
equal a stable descending sort's top k of the same scores, latent for latent and bit for bit. The
cases drive the kernel's paths: partial last slice, several slices, merges when 2048 candidates
pile up, runs of equal scores (the radix select finishing on latent bits), the scalar load path
(unaligned rows), state carried across launches, the aux selection, k up to 2048 (80 KiB of shared
memory, above the 48 KiB default), and a side stream.
"""

import pytest
import torch

from flashsae import _native
from flashsae.ops import _cuda, sparse_decode, topk_encode
from helpers import assert_valid_topk, sae_tensors

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _native.cuda_module_available()), reason="needs a CUDA GPU + _C_cuda"
    ),
]

SCORE_DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def sort_reference(scores, k, *, relu=False, bias=None, dead=None, aux_k=0):
    """Stable descending sort of the fp32 scores (+ bias, relu'd) on the CPU: (values, int32 indices)
    and with aux_k the same over dead latents (empty slots value 0, index -1)."""
    act = scores.float().cpu() + (0 if bias is None else bias.float().cpu())
    if relu:
        act = act.relu()
    top = torch.sort(act, dim=1, descending=True, stable=True)
    out = [top.values[:, :k], top.indices[:, :k].int()]
    if aux_k:
        aux = torch.sort(act.masked_fill(~dead.cpu(), float("-inf")), dim=1, descending=True, stable=True)
        values, indices = aux.values[:, :aux_k], aux.indices[:, :aux_k].int()
        empty = values == float("-inf")
        out += [values.masked_fill(empty, 0.0), indices.masked_fill(empty, -1)]
    return out


def run_select(scores, k, *, relu=False, bias=None, dead=None, aux_k=0, chunks=None):
    """The kernel over scores [rows, n], one launch per chunk width in `chunks`, then the finish."""
    rows, n = scores.shape
    state = _cuda.select_state(rows, k, scores.device)
    aux_state = _cuda.select_state(rows, aux_k, scores.device) if aux_k else None
    dead8 = dead.view(torch.uint8) if aux_k else None
    c0 = 0
    for width in chunks or [n]:
        _cuda.topk_select(scores[:, c0 : c0 + width], state, col0=c0, bias=bias, relu=relu, dead_mask=dead8,
                          aux_state=aux_state)  # fmt: skip
        c0 += width
    out = []
    for st, slots in ((state, k), (aux_state, aux_k)):
        if slots:
            values = _native.new_output((rows, slots), torch.float32, scores.device)
            indices = _native.new_output((rows, slots), torch.int32, scores.device)
            _cuda.topk_finish(st, values, indices)
            out += [values.cpu(), indices.cpu()]
    return out


def assert_exact(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        bad = (a != e).nonzero()
        assert bad.numel() == 0, f"{bad.shape[0]} differences, first at {bad[:3].tolist()}"


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(37, 1000, 7), (5, 2048, 64), (3, 2049, 1), (4, 20000, 256), (2, 131072, 512), (64, 16384, 32), (9, 1000, 1000)],
)
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
def test_select_equals_a_stable_sort(dtype, rows, n, k, relu):
    scores = torch.randn(rows, n, device="cuda").to(dtype)
    assert_exact(run_select(scores, k, relu=relu), sort_reference(scores, k, relu=relu))


@pytest.mark.parametrize("k", [1, 100, 2000, 2048])
def test_select_ties_and_large_k(k):
    # 5 distinct values over 40000 latents: every cut falls in a run of equal scores
    scores = torch.randint(-2, 3, (6, 40000), device="cuda").to(torch.bfloat16)
    assert_exact(run_select(scores, k), sort_reference(scores, k))
    assert_exact(run_select(scores, k, relu=True), sort_reference(scores, k, relu=True))


@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
def test_select_on_unaligned_rows(dtype):
    # odd row stride and a base address off the 16-byte grid: the element-by-element load path
    base = torch.randn(7, 5003, device="cuda").to(dtype)
    scores = base[:, 1:]  # stride 5003, first element 2 or 4 bytes in
    assert scores.stride(0) == 5003
    assert_exact(run_select(scores, 50), sort_reference(scores, 50))


def test_select_state_carries_across_launches():
    scores = torch.randn(5, 10000, device="cuda")
    bias = torch.randn(10000, device="cuda")
    expected = sort_reference(scores, 300, relu=True, bias=bias)
    for chunks in ([10000], [4096, 4096, 1808], [1, 2047, 2049, 5903], [300, 9700]):
        assert_exact(run_select(scores, 300, relu=True, bias=bias, chunks=chunks), expected)


@pytest.mark.parametrize(
    ("k", "aux_k", "dead_fraction"), [(32, 64, 0.1), (16, 512, 0.002), (2048, 2048, 0.5), (7, 9, 0.0)]
)
def test_select_aux_in_the_same_pass(k, aux_k, dead_fraction):
    # (2048, 2048): both states at the kernel's limit, 80 KiB of dynamic shared memory
    rows, n = 6, 30000
    scores = torch.randn(rows, n, device="cuda")
    dead = torch.rand(n, device="cuda") < dead_fraction
    out = run_select(scores, k, relu=True, dead=dead, aux_k=aux_k, chunks=[8192, 8192, 13616])
    assert_exact(out, sort_reference(scores, k, relu=True, dead=dead, aux_k=aux_k))
    filled = min(int(dead.sum()), aux_k)
    assert (out[3][:, filled:] == -1).all() and (out[2][:, filled:] == 0).all()


def test_topk_rows_matches_torch_topk_up_to_tie_order():
    scores = torch.randn(128, 65536, device="cuda", dtype=torch.bfloat16)
    values, indices = _cuda.topk_rows(scores, 64)
    ref = torch.topk(scores.float(), 64, dim=1)
    assert values.dtype == torch.bfloat16 and indices.dtype == torch.int32
    assert torch.equal(values.float(), ref.values)
    assert torch.equal(scores.gather(1, indices.long()), values)


def test_select_runs_on_the_current_stream():
    scores = torch.randn(64, 50000, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        values, indices = _cuda.topk_rows(scores, 100)
    side.synchronize()
    assert_exact([values.float().cpu(), indices.cpu()], sort_reference(scores, 100))


# ------------------------------------------------------------------ the ops at GPU sizes (bf16)


def test_topk_encode_at_a_realistic_size():
    rows, d, n, k = 2048, 512, 32768, 64
    t = {name: v.cuda() for name, v in sae_tensors(rows, d, n, torch.bfloat16).items()}
    dead = torch.rand(n, device="cuda") < 0.05
    values, indices, aux_values, aux_indices = topk_encode(
        t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead, aux_k=256, backend="cuda"
    )
    act = ((t["x"].double() - t["b_dec"].double()) @ t["W_enc"].double().T + t["b_enc"].double()).relu()
    assert_valid_topk(act.cpu(), values.cpu(), indices.cpu(), torch.bfloat16)
    assert_valid_topk(act.masked_fill(~dead, float("-inf")).cpu(), aux_values.cpu(), aux_indices.cpu(), torch.bfloat16)


def test_backward_is_deterministic():
    # dW by latent-sorted segments: no atomics, so two runs agree bit for bit
    rows, d, n, k = 4096, 256, 4096, 32
    values = torch.rand(rows, k, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(0, 64, (rows, k), device="cuda", dtype=torch.int32)  # hot latents: long segments
    W_dec = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        (g,) = torch.autograd.grad(sparse_decode(values, indices, W_dec, backend="cuda").float().pow(2).sum(), W_dec)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])
