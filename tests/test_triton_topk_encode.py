"""The triton backend's fused encoder + top-k against the float64 reference: selection, exact ties in
every merge path, AuxK (fused and over the dead latents), gradients, memory.

Runs the kernels on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py), on CUDA tensors when
the interpreter is off and a GPU is visible (benchmarks/run_device.sh), and skips otherwise."""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from flashsae.kernels import topk_encode as kernels

from flashsae import _backend
from flashsae.ops import topk_encode, topk_encode_reference
from helpers import SIZE_IDS, SIZES, LargestTensorMode, assert_close, assert_valid_topk, f64, randn, sae_tensors

INTERPRETING = _backend.triton_interpreting()
DEVICE = torch.device("cpu" if INTERPRETING else "cuda")
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(), reason="triton needs a CUDA GPU or TRITON_INTERPRET=1"
)
topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")


def on_device(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: v.to(DEVICE) for name, v in t.items()}


def reference_activations(t: dict[str, torch.Tensor]) -> torch.Tensor:
    r = f64({name: v.cpu() for name, v in t.items()})
    return ((r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]).relu()


@pytest.fixture(params=["sort", "insert", "chunks"])
def merge_path(request, monkeypatch):
    """Drives each exact merge procedure of the kernel: every tile sorted and bitonic-merged, every
    key inserted one at a time, or the default mix with the latents split over 3 chunks (so the
    finishing kernel merges chunk lists)."""
    if request.param == "sort":
        monkeypatch.setattr(kernels, "INSERT_MAX", -1)
    elif request.param == "insert":
        monkeypatch.setattr(kernels, "INSERT_MAX", 1 << 30)
    else:
        monkeypatch.setattr(kernels, "CHUNKS", 3)
    return request.param


def encode(t, k, **kw):
    return topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], backend="triton", **kw)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_matches_reference(dtype, size):
    rows, d, n, k = size
    t = on_device(sae_tensors(rows, d, n, dtype))
    values, indices = encode(t, k)
    assert values.dtype == dtype and values.shape == (rows, k) and values.device.type == DEVICE.type
    assert_valid_topk(reference_activations(t), values.cpu(), indices.cpu(), dtype)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_exact_ties_go_to_the_lower_index(dtype):
    # Small integers: every pre-activation is an exact integer in every dtype (and in the kernel's
    # fp32 dot), so many latents tie exactly and many are relu'd to 0; the order must be the
    # reference's stable sort, across tiles (n = 700: several 128-latent tiles, the last partial).
    rows, d, n, k = 13, 24, 700, 40
    x = torch.randint(-2, 3, (rows, d)).to(dtype)
    W_enc = torch.randint(-1, 2, (n, d)).to(dtype)
    b_enc = torch.randint(-2, 3, (n,)).to(dtype)
    values, indices = topk_encode(x.to(DEVICE), W_enc.to(DEVICE), b_enc.to(DEVICE), k, backend="triton")
    ref_values, ref_indices = topk_encode_reference(x.double(), W_enc.double(), b_enc.double(), k)
    assert torch.equal(indices.cpu(), ref_indices)
    assert torch.equal(values.cpu().double(), ref_values)


def test_every_merge_path_is_exact(merge_path):
    # ties (integers) and a k that is not a power of two; the aux state takes the same path
    rows, d, n, k, aux_k = 9, 16, 300, 11, 6
    x = torch.randint(-2, 3, (rows, d)).float()
    W_enc = torch.randint(-1, 2, (n, d)).float()
    b_enc = torch.randint(-2, 3, (n,)).float()
    dead = torch.rand(n) < 0.5
    out = topk_encode(
        x.to(DEVICE), W_enc.to(DEVICE), b_enc.to(DEVICE), k, dead_mask=dead.to(DEVICE), aux_k=aux_k, backend="triton"
    )
    ref = topk_encode_reference(x.double(), W_enc.double(), b_enc.double(), k, dead_mask=dead, aux_k=aux_k)
    for name, got, expected in zip(["values", "indices", "aux_values", "aux_indices"], out, ref, strict=True):
        assert torch.equal(got.cpu().to(expected.dtype), expected), name


@pytest.mark.parametrize("aux_k", [20, 200], ids=["fused", "over_dead_latents"])
@pytest.mark.parametrize("n_dead", [0, 5, 300])
def test_aux_topk_over_dead_latents(n_dead, aux_k):
    # aux_k = 200 > FUSED_AUX_MAX: the aux selection runs over the dead latents only
    assert (aux_k > topk_encode_module.FUSED_AUX_MAX) == (aux_k == 200)
    rows, d, n, k = 11, 40, 900, 6
    dtype = torch.bfloat16 if n_dead == 300 else torch.float32
    t = on_device(sae_tensors(rows, d, n, dtype))
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    values, indices, aux_values, aux_indices = encode(t, k, dead_mask=dead.to(DEVICE), aux_k=aux_k)
    aux_values, aux_indices = aux_values.cpu(), aux_indices.cpu()
    act = reference_activations(t)
    assert_valid_topk(act, values.cpu(), indices.cpu(), dtype)
    filled = min(n_dead, aux_k)
    # slots beyond the dead count are empty: value 0, index -1
    assert (aux_indices[:, filled:] == -1).all() and (aux_values[:, filled:] == 0).all()
    if filled:
        assert dead[aux_indices[:, :filled].long()].all(), "aux selected a live latent"
        assert_valid_topk(act.masked_fill(~dead, float("-inf")), aux_values[:, :filled], aux_indices[:, :filled], dtype)


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_gradients(dtype, with_aux):
    if with_aux and dtype != torch.float32:
        pytest.skip("AuxK gradients share the main slots' kernels; float32 covers them")
    rows, d, n, k, aux_k = 23, 48, 400, 9, 8
    t = on_device(sae_tensors(rows, d, n, dtype))
    dead = (torch.rand(n) < 0.2).to(DEVICE)
    extra = {"dead_mask": dead, "aux_k": aux_k} if with_aux else {}
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    out = topk_encode(leaves["x"], leaves["W_enc"], leaves["b_enc"], k, leaves["b_dec"], backend="triton", **extra)
    upstream = [randn(*o.shape) for o in out[::2]]
    total = sum((o.cpu().double() * w).sum() for o, w in zip(out[::2], upstream, strict=True))
    grads = torch.autograd.grad(total, list(leaves.values()))
    # float64 reference at the kernel's own selection (low precision may pick differently at near-ties)
    r = f64({name: v.cpu() for name, v in t.items()}, requires_grad=True)
    pre = (r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]
    ref_total = sum(
        (pre.gather(1, idx.cpu().long().clamp_min(0)).relu() * (idx.cpu() >= 0) * w).sum()
        for idx, w in zip(out[1::2], upstream, strict=True)
    )
    ref_grads = torch.autograd.grad(ref_total, [r[name] for name in leaves])
    for name, g, rg in zip(leaves, grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g.cpu(), rg, dtype, f"d{name}")


def test_dx_and_db_dec_only_when_needed():
    t = on_device(sae_tensors(8, 12, 60, torch.float32))
    W_enc = t["W_enc"].requires_grad_()
    values, _ = topk_encode(t["x"], W_enc, t["b_enc"], 3, t["b_dec"], backend="triton")
    values.sum().backward()
    assert W_enc.grad is not None and t["x"].grad is None and t["b_dec"].grad is None


def test_never_materializes_batch_by_latents():
    rows, d, n, k = 64, 16, 4096, 8
    t = on_device(sae_tensors(rows, d, n, torch.float32))
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    with LargestTensorMode() as mode:
        values, _ = topk_encode(leaves["x"], leaves["W_enc"], leaves["b_enc"], k, leaves["b_dec"], backend="triton")
        values.sum().backward()
    # the largest tensors are the [n, d] gradients (n * d = rows * n / 4); no [rows, n] at all
    assert mode.largest <= n * d, f"{mode.largest} elements from {mode.largest_op}"
    with LargestTensorMode() as dense:  # the check can fail: the dense reference trips it
        topk_encode_reference(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"])
    assert dense.largest >= rows * n


def test_float64_is_refused_with_a_reason():
    t = on_device(sae_tensors(4, 8, 20, torch.float64))
    with pytest.raises(
        _backend.BackendUnavailableError, match="take float32, bfloat16 or float16 tensors and these are float64"
    ):
        encode(t, 2)
