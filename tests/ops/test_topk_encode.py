"""topk_encode on every backend against its float64 reference: values, indices, ties, AuxK,
gradients, memory; and what is particular to each backend's kernels (the triton merge procedures,
the cuda select's k limit, the cuda chunking)."""

import importlib

import pytest
import torch

from flashsae import TopKSAE, _backend
from flashsae.ops import topk_encode, topk_encode_reference
from helpers import (
    ALL_BACKENDS,
    GPU_DTYPES,
    SIZE_IDS,
    SIZES,
    LargestTensorMode,
    assert_close,
    assert_valid_topk,
    backends,
    backends_and_dtypes,
    f64,
    on,
    randn,
    sae_tensors,
)

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")
ops_cuda = importlib.import_module("flashsae.ops._cuda")


def reference_activations(t: dict[str, torch.Tensor]) -> torch.Tensor:
    r = f64({name: v.cpu() for name, v in t.items()})
    return ((r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]).relu()


def assert_aux_selection(t, dead, out, n_dead, aux_k, dtype):
    """The main top-k and the AuxK selection among the dead latents, checked against the activations."""
    values, indices, aux_values, aux_indices = (o.cpu() for o in out)
    act = reference_activations(t)
    assert_valid_topk(act, values, indices, dtype)
    filled = min(n_dead, aux_k)
    # slots beyond the dead count are empty: value 0, index -1
    assert (aux_indices[:, filled:] == -1).all() and (aux_values[:, filled:] == 0).all()
    if filled:
        assert dead[aux_indices[:, :filled].long()].all(), "aux selected a live latent"
        dead_act = act.masked_fill(~dead, float("-inf"))
        assert_valid_topk(dead_act, aux_values[:, :filled], aux_indices[:, :filled], dtype, "aux")


def encode(be, t, k, **kw):
    return topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], backend=be.name, **kw)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize(("be", "dtype"), backends_and_dtypes(), indirect=["be"])
def test_matches_reference(be, dtype, size, chunks):
    rows, d, n, k = size
    t = on(be.device, sae_tensors(rows, d, n, dtype))
    values, indices = encode(be, t, k)
    assert values.dtype == dtype and values.shape == (rows, k) and values.device.type == be.device.type
    assert_valid_topk(reference_activations(t), values.cpu(), indices.cpu(), dtype)
    if dtype == torch.float64:  # no rounding: the selection itself must be the reference's
        r = f64(t)
        ref_values, ref_indices = topk_encode_reference(r["x"], r["W_enc"], r["b_enc"], k, r["b_dec"])
        assert torch.equal(indices, ref_indices)
        assert_close(values, ref_values, dtype)


@pytest.mark.parametrize(("be", "dtype"), backends_and_dtypes(), indirect=["be"])
def test_exact_ties_go_to_the_lower_index(be, dtype, chunks):
    # Small integers: every pre-activation is an exact integer in every dtype (and in fp32 GEMMs and
    # dots), so many latents tie exactly (and many are relu'd to 0); the order must be the
    # reference's stable sort, across tiles and chunks (n = 700: the last one partial).
    rows, d, n, k = 13, 24, 700, 40
    x = torch.randint(-2, 3, (rows, d)).to(dtype)
    W_enc = torch.randint(-1, 2, (n, d)).to(dtype)
    b_enc = torch.randint(-2, 3, (n,)).to(dtype)
    values, indices = topk_encode(x.to(be.device), W_enc.to(be.device), b_enc.to(be.device), k, backend=be.name)
    ref_values, ref_indices = topk_encode_reference(x.double(), W_enc.double(), b_enc.double(), k)
    assert torch.equal(indices.cpu(), ref_indices)
    assert torch.equal(values.cpu().double(), ref_values)


@pytest.mark.parametrize("n_dead", [0, 5, 300])
@pytest.mark.parametrize(
    ("be", "dtype"), backends_and_dtypes(dtypes=[torch.float64, torch.float32, torch.bfloat16]), indirect=["be"]
)
def test_aux_topk_over_dead_latents(be, dtype, n_dead, chunks):
    rows, d, n, k, aux_k = 11, 40, 900, 6, 20
    t = on(be.device, sae_tensors(rows, d, n, dtype))
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    out = encode(be, t, k, dead_mask=dead.to(be.device), aux_k=aux_k)
    assert_aux_selection(t, dead, out, n_dead, aux_k, dtype)
    aux_values, aux_indices = out[2], out[3]
    if dtype == torch.float64:
        r = f64(t)
        ref = topk_encode_reference(r["x"], r["W_enc"], r["b_enc"], k, r["b_dec"], dead_mask=dead, aux_k=aux_k)
        assert torch.equal(aux_indices, ref[3])
        assert_close(aux_values, ref[2], dtype)


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("be", backends("cpu", "torch"), indirect=True)
def test_gradients_match_reference_float64(be, with_aux, chunks):
    rows, d, n, k, aux_k = 19, 31, 500, 5, 8
    t = f64(sae_tensors(rows, d, n, torch.float64), requires_grad=True)
    dead = torch.rand(n) < 0.1 if with_aux else None
    extra = {"dead_mask": dead, "aux_k": aux_k} if with_aux else {}
    names = ["x", "W_enc", "b_enc", "b_dec"]
    args = [t[name] for name in names]
    out = topk_encode(args[0], args[1], args[2], k, args[3], backend=be.name, **extra)
    ref = topk_encode_reference(args[0], args[1], args[2], k, args[3], **extra)
    weights = [randn(*o.shape) for o in out[::2]]  # upstream grads for values (and aux_values)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out[::2], weights, strict=True)), args)
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref[::2], weights, strict=True)), args)
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float64, f"d{name}")


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("be", backends(*ALL_BACKENDS), indirect=True)
def test_gradients_at_the_selection(be, dtype, with_aux, chunks):
    if be.name == "triton" and with_aux and dtype != torch.float32:
        pytest.skip("AuxK gradients share the main slots' kernels; float32 covers them")
    rows, d, n, k, aux_k = 23, 48, 400, 9, 6
    t = sae_tensors(rows, d, n, dtype)
    leaves = {name: t[name].to(be.device).requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    dead = torch.rand(n) < 0.2
    extra = {"dead_mask": dead.to(be.device), "aux_k": aux_k} if with_aux else {}
    out = encode(be, leaves, k, **extra)
    weights = [randn(rows, o.shape[1]) for o in out[::2]]
    loss = sum((o.cpu().double() * w).sum() for o, w in zip(out[::2], weights, strict=True))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    # float64 reference at the kernel's own selection (low precision may pick differently at near-ties)
    r = f64(t, requires_grad=True)
    pre = (r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]
    ref_loss = sum(
        (pre.gather(1, idx.cpu().long().clamp_min(0)).relu() * (idx.cpu() >= 0) * w).sum()
        for idx, w in zip(out[1::2], weights, strict=True)
    )
    ref_grads = torch.autograd.grad(ref_loss, [r[name] for name in leaves])
    for name, g, rg in zip(leaves, grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.device.type == be.device.type
        assert_close(g.cpu(), rg, dtype, f"d{name}")


def test_gradcheck_cpu():
    t = f64(sae_tensors(7, 6, 40, torch.float64), requires_grad=True)

    def fn(x, W_enc, b_enc, b_dec):
        return topk_encode(x, W_enc, b_enc, 4, b_dec, backend="cpu")[0]

    assert torch.autograd.gradcheck(fn, (t["x"], t["W_enc"], t["b_enc"], t["b_dec"]))


@pytest.mark.parametrize("be", backends(*ALL_BACKENDS), indirect=True)
def test_never_materializes_batch_by_latents(be, monkeypatch):
    # triton needs no tiles at all (smaller, so the interpreter stays quick)
    rows, d, n, k = (64, 16, 4096, 8) if be.name == "triton" else (512, 32, 8192, 16)
    monkeypatch.setattr(topk_encode_module, "TILE_ELEMENTS", 1 << 17)  # 256-latent tiles
    monkeypatch.setattr(topk_encode_module, "CUDA_CHUNK_ELEMENTS", 1 << 17)  # 256-latent chunks
    t = on(be.device, sae_tensors(rows, d, n, torch.float32))
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    with LargestTensorMode() as mode:
        values, _ = encode(be, leaves, k)
        values.sum().backward()
    # the largest tensors are the [n, d] gradients and: the [rows, 256 + k] tiles of cpu / torch;
    # the [rows, 256] score chunks of cuda (and the fake's own [rows, k, d] gathers); nothing for triton
    bound = {
        "cpu": max(n * d, rows * (256 + k)),
        "torch": max(n * d, rows * (256 + k)),
        "triton": n * d,
        "cuda": max(n * d, rows * k * d, rows * 256),
    }[be.name]
    assert mode.largest <= bound, f"{mode.largest} elements from {mode.largest_op}"
    with LargestTensorMode() as dense:  # the check can fail: the dense reference trips it
        topk_encode_reference(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"])
    assert dense.largest >= rows * n


@pytest.mark.parametrize("be", backends(*ALL_BACKENDS), indirect=True)
def test_dx_and_db_dec_only_when_needed(be, monkeypatch):
    asked = []
    original = topk_encode_module._backward

    def spy(*args):
        asked.append(args[6:8])  # (need_dx, need_db_dec)
        return original(*args)

    monkeypatch.setattr(topk_encode_module, "_backward", spy)
    t = on(be.device, sae_tensors(8, 12, 60, torch.float32))
    W_enc = t["W_enc"].requires_grad_()
    topk_encode(t["x"], W_enc, t["b_enc"], 3, t["b_dec"], backend=be.name)[0].sum().backward()
    assert W_enc.grad is not None and t["x"].grad is None and t["b_dec"].grad is None
    x = t["x"].requires_grad_()
    b_dec = t["b_dec"].requires_grad_()
    topk_encode(x, W_enc, t["b_enc"], 3, b_dec, backend=be.name)[0].sum().backward()
    assert asked == [(False, False), (True, True)]
    assert x.grad is not None and b_dec.grad is not None and t["b_enc"].grad is None


@pytest.mark.parametrize("be", backends("cpu"), indirect=True)
def test_backends_agree_exactly_in_float64(be, chunks):
    t = sae_tensors(29, 50, 777, torch.float64)
    dead = torch.rand(777) < 0.2
    cpu = topk_encode(t["x"], t["W_enc"], t["b_enc"], 11, t["b_dec"], dead_mask=dead, aux_k=13, backend="cpu")
    ref = topk_encode(t["x"], t["W_enc"], t["b_enc"], 11, t["b_dec"], dead_mask=dead, aux_k=13, backend="torch")
    for a, b in zip(cpu, ref, strict=True):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ triton


@pytest.fixture(params=["sort", "insert", "chunks"])
def merge_path(request, monkeypatch):
    """Drives each exact merge procedure of the triton kernel: every tile sorted and bitonic-merged,
    every key inserted one at a time, or the default mix with the latents split over 3 chunks (so
    the finishing kernel merges chunk lists)."""
    from flashsae.kernels import topk_encode as kernels

    if request.param == "sort":
        monkeypatch.setattr(kernels, "INSERT_MAX", -1)
    elif request.param == "insert":
        monkeypatch.setattr(kernels, "INSERT_MAX", 1 << 30)
    else:
        monkeypatch.setattr(kernels, "CHUNKS", 3)
    return request.param


@pytest.mark.parametrize("be", backends("triton"), indirect=True)
def test_every_triton_merge_path_is_exact(be, merge_path):
    # ties (integers) and a k that is not a power of two; the aux state takes the same path
    rows, d, n, k, aux_k = 9, 16, 300, 11, 6
    x = torch.randint(-2, 3, (rows, d)).float()
    W_enc = torch.randint(-1, 2, (n, d)).float()
    b_enc = torch.randint(-2, 3, (n,)).float()
    dead = torch.rand(n) < 0.5
    out = topk_encode(
        x.to(be.device), W_enc.to(be.device), b_enc.to(be.device), k, dead_mask=dead.to(be.device), aux_k=aux_k,
        backend="triton",
    )  # fmt: skip
    ref = topk_encode_reference(x.double(), W_enc.double(), b_enc.double(), k, dead_mask=dead, aux_k=aux_k)
    for name, got, expected in zip(["values", "indices", "aux_values", "aux_indices"], out, ref, strict=True):
        assert torch.equal(got.cpu().to(expected.dtype), expected), name


@pytest.mark.parametrize("n_dead", [0, 5, 300])
@pytest.mark.parametrize("be", backends("triton"), indirect=True)
def test_triton_aux_k_past_the_fused_selection(be, n_dead):
    # aux_k = 200 > FUSED_AUX_MAX: the aux selection runs over the dead latents only
    aux_k = 200
    assert aux_k > topk_encode_module.FUSED_AUX_MAX
    rows, d, n, k = 11, 40, 900, 6
    dtype = torch.bfloat16 if n_dead == 300 else torch.float32
    t = on(be.device, sae_tensors(rows, d, n, dtype))
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    assert_aux_selection(t, dead, encode(be, t, k, dead_mask=dead.to(be.device), aux_k=aux_k), n_dead, aux_k, dtype)


@pytest.mark.parametrize("be", backends("triton"), indirect=True)
def test_triton_refuses_float64_with_a_reason(be):
    t = on(be.device, sae_tensors(4, 8, 20, torch.float64))
    with pytest.raises(
        _backend.BackendUnavailableError, match="take float32, bfloat16 or float16 tensors and these are float64"
    ):
        encode(be, t, 2)


# -------------------------------------------------------------------------------------------- cuda


@pytest.mark.parametrize("k", [1, 1000])
@pytest.mark.parametrize("be", backends("cuda_fake", "cuda"), indirect=True)
def test_cuda_k_one_and_k_n(be, k):
    t = on(be.device, sae_tensors(5, 40, 1000, torch.float32))
    values, indices = encode(be, t, k)
    assert_valid_topk(reference_activations(t), values.cpu(), indices.cpu(), torch.float32)


@pytest.mark.parametrize("be", backends("cuda_fake", "cuda"), indirect=True)
def test_cuda_past_the_select_kernels_k(be, monkeypatch):
    # k and aux_k above the kernel's sort capacity take the documented torch paths (shrunk to 4 here)
    monkeypatch.setattr(ops_cuda, "topk_max_k", lambda: 4)
    t = on(be.device, sae_tensors(9, 30, 500, torch.float32))
    dead = (torch.rand(500) < 0.1).to(be.device)
    for k, aux_k in ((7, 3), (3, 9), (7, 9)):
        out = [o.cpu() for o in encode(be, t, k, dead_mask=dead, aux_k=aux_k)]
        act = reference_activations(t)
        assert_valid_topk(act, out[0], out[1], torch.float32)
        filled = min(int(dead.sum()), aux_k)
        assert_valid_topk(act.masked_fill(~dead.cpu(), float("-inf")), out[2][:, :filled], out[3][:, :filled],
                          torch.float32)  # fmt: skip
        assert (out[3][:, filled:] == -1).all()


def test_cuda_chunk_columns():
    f = topk_encode_module.cuda_chunk_columns
    assert f(16384, 131072) == 4096  # 2^26 fp32 scores per chunk
    assert f(1, 1000) == 1000 and f(10**9, 5000) == 256
    for rows in (1, 37, 1000, 16384, 10**6):
        cols = f(rows, 1 << 30)
        assert cols % 256 == 0 and cols >= 256
        assert cols == 256 or rows * cols <= topk_encode_module.CUDA_CHUNK_ELEMENTS


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_topk_sae_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = TopKSAE(64, 512, 8)
    gpu = TopKSAE(64, 512, 8, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(128, 64)
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    out_cpu.fvu.backward()
    out_gpu.fvu.backward()
    torch.testing.assert_close(out_gpu.x_hat.cpu(), out_cpu.x_hat, rtol=1e-4, atol=1e-5)
    for p, q in zip(gpu.parameters(), cpu.parameters(), strict=True):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-5)
