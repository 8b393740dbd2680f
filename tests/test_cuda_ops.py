"""The cuda backend of every op (forward and backward) against the float64 references.

Every test runs in two environments:
- ``gpu``: CUDA tensors through flashsae._C_cuda's kernels (skipped without a GPU);
- ``fake``: CPU tensors through tests/cuda_fake.py, which stands in for the kernels with torch (and
  the select's host mirror), so CI checks the ops' cuda glue (argument order, sizes, strides, chunking,
  select state, segment sorting, gradients plumbing) on every run.
GPU-only cases (wide rows, the kernel's merge schedule, large k, streams) are in test_cuda_select.py.
Outputs are NaN-poisoned (tests/conftest.py), so an unwritten element fails.
"""

import importlib

import pytest
import torch

import cuda_fake
from flashsae import _native
from flashsae.ops import (
    _cuda,
    sae_loss,
    sae_loss_reference,
    sparse_decode,
    sparse_decode_reference,
    topk_encode,
    topk_encode_reference,
)
from helpers import (
    SIZE_IDS,
    SIZES,
    LargestTensorMode,
    assert_close,
    assert_valid_topk,
    binding_params,
    f64,
    randn,
    sae_tensors,
)

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")

CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gpu_ready() -> bool:
    return torch.cuda.is_available() and _native.cuda_module_available()


@pytest.fixture(
    params=[
        "fake",
        pytest.param(
            "gpu", marks=[pytest.mark.cuda, pytest.mark.skipif(not gpu_ready(), reason="needs a CUDA GPU + _C_cuda")]
        ),
    ]
)
def device(request, monkeypatch) -> torch.device:
    if request.param == "fake":
        cuda_fake.install(monkeypatch)
        return torch.device("cpu")
    return torch.device("cuda")


@pytest.fixture(params=["one_chunk", "many_chunks"])
def chunks(request, monkeypatch):
    """The encoder in one latent chunk, and in chunks of 256 latents (partial last chunk), so the
    select state carries over between launches."""
    if request.param == "many_chunks":
        monkeypatch.setattr(topk_encode_module, "CUDA_CHUNK_ELEMENTS", 1)
    return request.param


def on(device, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in t.items()}


def reference_activations(t: dict[str, torch.Tensor]) -> torch.Tensor:
    r = {k: v.detach().double().cpu() for k, v in t.items()}
    return ((r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]).relu()


# ------------------------------------------------------------------------------------ topk_encode


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_topk_encode_matches_reference(device, dtype, size, chunks):
    rows, d, n, k = size
    t = on(device, sae_tensors(rows, d, n, dtype))
    values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], backend="cuda")
    assert values.dtype == dtype and values.shape == (rows, k) and values.device.type == device.type
    assert_valid_topk(reference_activations(t), values.cpu(), indices.cpu(), dtype)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_topk_encode_exact_ties_go_to_the_lower_index(device, dtype, chunks):
    # small integers: every pre-activation is an exact integer (fp32 GEMM output), many tie exactly
    rows, d, n, k = 13, 24, 700, 40
    x = torch.randint(-2, 3, (rows, d)).to(dtype)
    W_enc = torch.randint(-1, 2, (n, d)).to(dtype)
    b_enc = torch.randint(-2, 3, (n,)).to(dtype)
    values, indices = topk_encode(x.to(device), W_enc.to(device), b_enc.to(device), k, backend="cuda")
    ref_values, ref_indices = topk_encode_reference(x.double(), W_enc.double(), b_enc.double(), k)
    assert torch.equal(indices.cpu(), ref_indices)
    assert torch.equal(values.cpu().double(), ref_values)


@pytest.mark.parametrize("k", [1, 1000])
def test_topk_encode_k_one_and_k_n(device, k):
    t = on(device, sae_tensors(5, 40, 1000, torch.float32))
    values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], backend="cuda")
    assert_valid_topk(reference_activations(t), values.cpu(), indices.cpu(), torch.float32)


@pytest.mark.parametrize("n_dead", [0, 5, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_topk_encode_aux_over_dead_latents(device, dtype, n_dead, chunks):
    rows, d, n, k, aux_k = 11, 40, 900, 6, 20
    t = on(device, sae_tensors(rows, d, n, dtype))
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    values, indices, aux_values, aux_indices = (
        o.cpu()
        for o in topk_encode(
            t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead.to(device), aux_k=aux_k, backend="cuda"
        )
    )
    act = reference_activations(t)
    assert_valid_topk(act, values, indices, dtype)
    filled = min(n_dead, aux_k)
    # slots beyond the dead count are empty: value 0, index -1
    assert (aux_indices[:, filled:] == -1).all() and (aux_values[:, filled:] == 0).all()
    if filled:
        assert dead[aux_indices[:, :filled].long()].all(), "aux selected a live latent"
        assert_valid_topk(act.masked_fill(~dead, float("-inf")), aux_values[:, :filled], aux_indices[:, :filled], dtype)


def test_topk_encode_past_the_select_kernels_k(device, monkeypatch):
    # k and aux_k above the kernel's sort capacity take the documented torch paths (shrunk to 4 here)
    monkeypatch.setattr(_cuda, "topk_max_k", lambda: 4)
    t = on(device, sae_tensors(9, 30, 500, torch.float32))
    dead = (torch.rand(500) < 0.1).to(device)
    for k, aux_k in ((7, 3), (3, 9), (7, 9)):
        out = [o.cpu() for o in topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead, aux_k=aux_k,
                                            backend="cuda")]  # fmt: skip
        act = reference_activations(t)
        assert_valid_topk(act, out[0], out[1], torch.float32)
        filled = min(int(dead.sum()), aux_k)
        assert_valid_topk(act.masked_fill(~dead.cpu(), float("-inf")), out[2][:, :filled], out[3][:, :filled],
                          torch.float32)  # fmt: skip
        assert (out[3][:, filled:] == -1).all()


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_topk_encode_gradients(device, dtype, with_aux, chunks):
    rows, d, n, k, aux_k = 23, 48, 400, 9, 6
    t = sae_tensors(rows, d, n, dtype)
    leaves = {name: t[name].to(device).requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    dead = torch.rand(n) < 0.2
    extra = {"dead_mask": dead.to(device), "aux_k": aux_k} if with_aux else {}
    out = topk_encode(leaves["x"], leaves["W_enc"], leaves["b_enc"], k, leaves["b_dec"], backend="cuda", **extra)
    weights = [randn(rows, o.shape[1]) for o in out[::2]]
    loss = sum((o.double() * w.to(device)).sum() for o, w in zip(out[::2], weights, strict=True))
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
        assert g.dtype == dtype and g.device.type == device.type
        assert_close(g.cpu(), rg, dtype, f"d{name}")


def test_topk_encode_never_materializes_batch_by_latents(device, monkeypatch):
    rows, d, n, k = 512, 32, 8192, 16
    monkeypatch.setattr(topk_encode_module, "CUDA_CHUNK_ELEMENTS", 1 << 17)  # 256-latent chunks
    t = on(device, sae_tensors(rows, d, n, torch.float32))
    leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
    with LargestTensorMode() as mode:
        values, _ = topk_encode(leaves["x"], leaves["W_enc"], leaves["b_enc"], k, leaves["b_dec"], backend="cuda")
        values.sum().backward()
    # the largest tensors are the [n, d] gradients (n*d = rows*k*d: the fake's own [rows, k, d]
    # gathers are as large) and the [rows, 256] score chunks
    assert mode.largest <= max(n * d, rows * k * d, rows * 256), f"{mode.largest} elements from {mode.largest_op}"


# ---------------------------------------------------------------------------------- sparse_decode


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(
    ("rows", "d", "n", "k"), [(37, 97, 1000, 7), (64, 768, 4096, 32), (3, 8, 5, 5), (2, 16, 9, 300)]
)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_sparse_decode_forward_and_backward(device, dtype, rows, d, n, k, with_bias):
    # d = 97 takes the scalar path, d = 768 / 8 / 16 the 16-byte one; k = 300 > 256 staged slots
    values = randn(rows, k).abs().to(dtype)
    indices = torch.randint(-1, n, (rows, k), dtype=torch.int32)
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype)
    b_dec = randn(d, dtype=dtype) if with_bias else None
    leaves = [v.to(device).requires_grad_() for v in (values, W_dec)]
    bias_leaf = b_dec.to(device).requires_grad_() if with_bias else None
    x_hat = sparse_decode(leaves[0], indices.to(device), leaves[1], bias_leaf, backend="cuda")
    ref_leaves = [v.double().requires_grad_() for v in (values, W_dec)]
    ref_bias = b_dec.double().requires_grad_() if with_bias else None
    ref = sparse_decode_reference(ref_leaves[0], indices, ref_leaves[1], ref_bias)
    assert_close(x_hat.cpu(), ref, dtype, "x_hat")
    upstream = randn(rows, d)
    grads = torch.autograd.grad((x_hat.double() * upstream.to(device)).sum(), [*leaves, *([bias_leaf] * with_bias)])
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [*ref_leaves, *([ref_bias] * with_bias)])
    for name, g, rg in zip(["d_values", "dW_dec", "db_dec"], grads, ref_grads, strict=False):
        assert_close(g.cpu(), rg, dtype, name)


def test_sparse_decode_reports_out_of_range_indices(device):
    indices = torch.zeros(4, 2, dtype=torch.int32)
    indices[2, 1] = 50
    with pytest.raises(ValueError, match="indices: some index is out of range"):
        sparse_decode(torch.rand(4, 2, device=device), indices.to(device), torch.randn(50, 8, device=device),
                      backend="cuda")  # fmt: skip


# --------------------------------------------------------------------------------------- sae_loss


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize(("rows", "d", "n", "k"), [(37, 97, 1000, 7), (16, 64, 300, 12)])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_sae_loss_forward_and_backward(device, dtype, rows, d, n, k, aux_k):
    t = sae_tensors(rows, d, n, dtype)
    # real latents (as in test_sae_loss.py: random ones reconstruct so badly that the loss gradients
    # cancel below bf16 resolution), aux ones over ~30% dead latents, and some empty main slots
    dead = torch.rand(n) < 0.3
    enc = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead if aux_k else None, aux_k=aux_k,
                      backend="cpu")  # fmt: skip
    values, indices = enc[0], enc[1].clone()
    indices[::3, 0] = -1
    aux_values, aux_indices = (enc[2], enc[3]) if aux_k else (None, None)
    names = ["x", "values", "W_dec", "b_dec"] + (["aux_values"] if aux_k else [])
    src = {"x": t["x"], "values": values, "W_dec": t["W_dec"], "b_dec": t["b_dec"], "aux_values": aux_values}
    leaves = {name: src[name].to(device).requires_grad_() for name in names}
    ref_leaves = {name: src[name].double().requires_grad_() for name in names}

    def run(v, idx, aux_idx, **kw):
        fn = sae_loss if kw else sae_loss_reference
        return fn(v["x"], v["values"], idx, v["W_dec"], v["b_dec"], v.get("aux_values"), aux_idx, **kw)

    out = run(leaves, indices.to(device), aux_indices.to(device) if aux_k else None, backend="cuda")
    ref = run(ref_leaves, indices, aux_indices)
    assert_close(out.x_hat.cpu(), ref.x_hat, dtype, "x_hat")
    for name in ("mse", "fvu", "auxk_loss"):
        assert_close(getattr(out, name).cpu(), getattr(ref, name), dtype, name)
    # every output gets an upstream gradient: x_hat too (the grad_x_hat path)
    w = randn(rows, d)
    loss = out.fvu + 0.7 * out.mse + 0.3 * out.auxk_loss + 0.01 * (out.x_hat.double() * w.to(device)).sum()
    ref_loss = ref.fvu + 0.7 * ref.mse + 0.3 * ref.auxk_loss + 0.01 * (ref.x_hat * w).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_grads = torch.autograd.grad(ref_loss, list(ref_leaves.values()))
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close(g.cpu(), rg, dtype, f"d{name}")


def test_sae_loss_reports_out_of_range_aux_indices(device):
    t = on(device, sae_tensors(4, 8, 20, torch.float32))
    values, indices = torch.rand(4, 2, device=device), torch.zeros(4, 2, dtype=torch.int32, device=device)
    aux_indices = torch.zeros(4, 3, dtype=torch.int32, device=device)
    aux_indices[1, 2] = 20
    with pytest.raises(ValueError, match="aux_indices: some index is out of range"):
        sae_loss(t["x"], values, indices, t["W_dec"], t["b_dec"], torch.rand(4, 3, device=device), aux_indices,
                 backend="cuda")  # fmt: skip
    bad = indices.clone()
    bad[3, 0] = -2
    with pytest.raises(ValueError, match=r"^indices: some index is out of range"):
        sae_loss(t["x"], values, bad, t["W_dec"], t["b_dec"], backend="cuda")


# ------------------------------------------------------------------------------------ the harness


def test_the_fake_has_the_real_modules_bindings():
    # the fake is only a check of the glue if its bindings take what the real ones take
    if not _native.cuda_module_available():
        pytest.skip("flashsae was built without its CUDA module")
    real = _native.cuda_module()
    import inspect

    for name in cuda_fake.BINDINGS:
        fake = inspect.signature(getattr(cuda_fake.FakeCudaModule, name)).parameters.values()
        fake_names = [p.name for p in fake if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert binding_params(getattr(real, name)) == fake_names, name
    queries = {"device_count", "runtime_version"}
    kernels = {name for name, fn in vars(real).items() if callable(fn) and name not in queries}
    assert kernels == set(cuda_fake.BINDINGS)
    for name in ("TOPK_MAX_K", "TOPK_SLICE", "TOPK_CAPACITY"):
        assert getattr(real, name) == getattr(cuda_fake.FakeCudaModule, name)


def test_cuda_chunk_columns():
    f = topk_encode_module.cuda_chunk_columns
    assert f(16384, 131072) == 4096  # 2^26 fp32 scores per chunk
    assert f(1, 1000) == 1000 and f(10**9, 5000) == 256
    for rows in (1, 37, 1000, 16384, 10**6):
        cols = f(rows, 1 << 30)
        assert cols % 256 == 0 and cols >= 256
        assert cols == 256 or rows * cols <= topk_encode_module.CUDA_CHUNK_ELEMENTS
