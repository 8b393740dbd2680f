"""topk_encode against its float64 reference: values, indices, ties, AuxK, gradients, memory."""

import importlib

import pytest
import torch

from flashsae.ops import topk_encode, topk_encode_reference
from helpers import (
    CPU_BACKENDS,
    DTYPES,
    SIZE_IDS,
    SIZES,
    LargestTensorMode,
    assert_close,
    assert_valid_topk,
    f64,
    randn,
    sae_tensors,
)

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")


def reference_activations(t: dict[str, torch.Tensor]) -> torch.Tensor:
    r = f64(t)
    return ((r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]).relu()


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_reference(backend, dtype, size, tile_elements):
    rows, d, n, k = size
    t = sae_tensors(rows, d, n, dtype)
    values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], backend=backend)
    assert values.dtype == dtype and values.shape == (rows, k)
    assert_valid_topk(reference_activations(t), values, indices, dtype)
    if dtype == torch.float64:  # no rounding: the selection itself must be the reference's
        r = f64(t)
        ref_values, ref_indices = topk_encode_reference(r["x"], r["W_enc"], r["b_enc"], k, r["b_dec"])
        assert torch.equal(indices, ref_indices)
        assert_close(values, ref_values, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_ties_go_to_the_lower_index(backend, dtype, tile_elements):
    # Small integers: every pre-activation is an exact integer in every dtype, so many latents tie
    # exactly (and many are relu'd to 0); the order must be the reference's stable sort.
    rows, d, n, k = 13, 24, 700, 40
    x = torch.randint(-2, 3, (rows, d)).to(dtype)
    W_enc = torch.randint(-1, 2, (n, d)).to(dtype)
    b_enc = torch.randint(-2, 3, (n,)).to(dtype)
    values, indices = topk_encode(x, W_enc, b_enc, k, backend=backend)
    ref_values, ref_indices = topk_encode_reference(x.double(), W_enc.double(), b_enc.double(), k)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values.double(), ref_values)


@pytest.mark.parametrize("n_dead", [0, 5, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_aux_topk_over_dead_latents(backend, dtype, n_dead, tile_elements):
    rows, d, n, k, aux_k = 11, 40, 900, 6, 20
    t = sae_tensors(rows, d, n, dtype)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    values, indices, aux_values, aux_indices = topk_encode(
        t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead, aux_k=aux_k, backend=backend
    )
    act = reference_activations(t)
    assert_valid_topk(act, values, indices, dtype)
    filled = min(n_dead, aux_k)
    # slots beyond the dead count are empty: value 0, index -1
    assert (aux_indices[:, filled:] == -1).all() and (aux_values[:, filled:] == 0).all()
    if filled:
        assert dead[aux_indices[:, :filled].long()].all(), "aux selected a live latent"
        dead_act = act.masked_fill(~dead, float("-inf"))
        assert_valid_topk(dead_act, aux_values[:, :filled], aux_indices[:, :filled], dtype, "aux")
    if dtype == torch.float64:
        r = f64(t)
        ref = topk_encode_reference(r["x"], r["W_enc"], r["b_enc"], k, r["b_dec"], dead_mask=dead, aux_k=aux_k)
        assert torch.equal(aux_indices, ref[3])
        assert_close(aux_values, ref[2], dtype)


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_reference_float64(backend, with_aux, tile_elements):
    rows, d, n, k, aux_k = 19, 31, 500, 5, 8
    t = f64(sae_tensors(rows, d, n, torch.float64), requires_grad=True)
    dead = torch.rand(n) < 0.1 if with_aux else None
    extra = {"dead_mask": dead, "aux_k": aux_k} if with_aux else {}
    names = ["x", "W_enc", "b_enc", "b_dec"]
    args = [t[name] for name in names]
    out = topk_encode(args[0], args[1], args[2], k, args[3], backend=backend, **extra)
    ref = topk_encode_reference(args[0], args[1], args[2], k, args[3], **extra)
    weights = [randn(*o.shape) for o in out[::2]]  # upstream grads for values (and aux_values)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out[::2], weights, strict=True)), args)
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref[::2], weights, strict=True)), args)
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float64, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_low_precision(backend, dtype):
    rows, d, n, k = 23, 48, 400, 9
    t = sae_tensors(rows, d, n, dtype)
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    values, indices = topk_encode(leaves["x"], leaves["W_enc"], leaves["b_enc"], k, leaves["b_dec"], backend=backend)
    upstream = randn(rows, k)
    grads = torch.autograd.grad((values.double() * upstream).sum(), list(leaves.values()))
    # float64 reference at the kernel's own selection (low precision may pick differently at near-ties)
    r = f64(t, requires_grad=True)
    pre = ((r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]).gather(1, indices.long()).relu()
    ref_grads = torch.autograd.grad((pre * upstream).sum(), [r[name] for name in leaves])
    for name, g, rg in zip(leaves, grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, f"d{name}")


def test_gradcheck_cpu():
    t = f64(sae_tensors(7, 6, 40, torch.float64), requires_grad=True)

    def fn(x, W_enc, b_enc, b_dec):
        return topk_encode(x, W_enc, b_enc, 4, b_dec, backend="cpu")[0]

    assert torch.autograd.gradcheck(fn, (t["x"], t["W_enc"], t["b_enc"], t["b_dec"]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_never_materializes_batch_by_latents(backend, monkeypatch):
    rows, d, n, k = 512, 32, 8192, 16
    monkeypatch.setattr(topk_encode_module, "TILE_ELEMENTS", 1 << 17)  # 256-latent tiles
    t = sae_tensors(rows, d, n, torch.float32)
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    with LargestTensorMode() as mode:
        values, _ = topk_encode(leaves["x"], leaves["W_enc"], leaves["b_enc"], k, leaves["b_dec"], backend=backend)
        values.sum().backward()
    # the largest tensors are the [n, d] gradients (n*d = rows*n/16) and the [rows, 256 + k] tiles
    assert mode.largest <= max(n * d, rows * (256 + k)), f"{mode.largest} elements from {mode.largest_op}"
    with LargestTensorMode() as dense:  # the check can fail: the dense reference trips it
        topk_encode_reference(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"])
    assert dense.largest >= rows * n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dx_and_db_dec_only_when_needed(backend, monkeypatch):
    asked = []
    original = topk_encode_module._backward

    def spy(*args):
        asked.append(args[6:8])  # (need_dx, need_db_dec)
        return original(*args)

    monkeypatch.setattr(topk_encode_module, "_backward", spy)
    t = sae_tensors(8, 12, 60, torch.float32)
    W_enc = t["W_enc"].requires_grad_()
    topk_encode(t["x"], W_enc, t["b_enc"], 3, t["b_dec"], backend=backend)[0].sum().backward()
    x = t["x"].requires_grad_()
    b_dec = t["b_dec"].requires_grad_()
    topk_encode(x, W_enc, t["b_enc"], 3, b_dec, backend=backend)[0].sum().backward()
    assert asked == [(False, False), (True, True)]
    assert x.grad is not None and b_dec.grad is not None and t["b_enc"].grad is None


def test_backends_agree_exactly_in_float64(tile_elements):
    t = sae_tensors(29, 50, 777, torch.float64)
    dead = torch.rand(777) < 0.2
    cpu = topk_encode(t["x"], t["W_enc"], t["b_enc"], 11, t["b_dec"], dead_mask=dead, aux_k=13, backend="cpu")
    ref = topk_encode(t["x"], t["W_enc"], t["b_enc"], 11, t["b_dec"], dead_mask=dead, aux_k=13, backend="torch")
    for a, b in zip(cpu, ref, strict=True):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-12, atol=1e-12)
