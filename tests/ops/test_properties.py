"""Property tests: the CPU kernels agree with the float64 references over random sizes."""

import importlib

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashsae.ops import sparse_decode, sparse_decode_reference, topk_encode, topk_encode_reference
from helpers import assert_close, assert_valid_topk

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw):
    rows, d, n = draw(st.integers(1, 24)), draw(st.integers(1, 48)), draw(st.integers(1, 700))
    k, aux_k = draw(st.integers(1, n)), draw(st.integers(0, n))
    return rows, d, n, k, aux_k, draw(st.floats(0.0, 1.0)), draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(problem=problems(), many_tiles=st.booleans())
def test_topk_encode_cpu(problem, many_tiles, monkeypatch):
    rows, d, n, k, aux_k, dead_fraction, seed = problem
    monkeypatch.setattr(topk_encode_module, "TILE_ELEMENTS", 1 if many_tiles else 1 << 22)
    g = torch.Generator().manual_seed(seed)
    x, W, b, bd = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(rows, d), (n, d), (n,), (d,)])
    dead = torch.rand(n, generator=g) < dead_fraction
    extra = {"dead_mask": dead, "aux_k": aux_k} if aux_k else {}
    got = topk_encode(x, W, b, k, bd, backend="cpu", **extra)
    ref = topk_encode_reference(x, W, b, k, bd, **extra)
    for a, r in zip(got, ref, strict=True):
        assert torch.equal(a, r) if not a.is_floating_point() else torch.allclose(a, r, rtol=1e-12, atol=1e-12)
    # float32: same selection up to rounding
    values, indices = topk_encode(x.float(), W.float(), b.float(), k, bd.float(), backend="cpu")
    act = ((x.float().double() - bd.float().double()) @ W.float().double().T + b.float().double()).relu()
    assert_valid_topk(act, values, indices, torch.float32)


@SETTINGS
@given(problem=problems())
def test_sparse_decode_cpu_with_empty_slots(problem):
    rows, d, n, k, _, empty_fraction, seed = problem
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(rows, k, generator=g, dtype=torch.float64)
    indices = torch.randint(0, n, (rows, k), generator=g, dtype=torch.int32)
    indices[torch.rand(rows, k, generator=g) < empty_fraction] = -1
    W_dec = torch.randn(n, d, generator=g, dtype=torch.float64)
    x_hat = sparse_decode(values, indices, W_dec, backend="cpu")
    assert_close(x_hat, sparse_decode_reference(values, indices, W_dec), torch.float64)
