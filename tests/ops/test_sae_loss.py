"""sae_loss (fused decoder + MSE/FVU + AuxK) on every backend against its float64 reference."""

import pytest
import torch

from flashsae.ops import sae_loss, sae_loss_reference, topk_encode
from helpers import (
    ALL_BACKENDS,
    GPU_DTYPES,
    SIZE_IDS,
    SIZES,
    LargestTensorMode,
    assert_close,
    backends,
    backends_and_dtypes,
    on,
    randn,
    sae_tensors,
)

GPU_BACKENDS = ("triton", "cuda", "cuda_fake")


def encoded(t: dict[str, torch.Tensor], k: int, aux_k: int, device: torch.device = torch.device("cpu")):
    """Real latents from the cpu backend (and aux latents over ~30% dead latents, so some aux slots
    may be empty), on `device`. Random latents reconstruct so badly that the loss gradients cancel
    below bf16 resolution."""
    n = t["W_enc"].shape[0]
    dead = torch.rand(n) < 0.3
    out = topk_encode(
        t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead if aux_k else None, aux_k=aux_k, backend="cpu"
    )
    return [o.detach().to(device) for o in out] + ([None, None] if not aux_k else [])


def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize(("be", "dtype"), backends_and_dtypes(), indirect=["be"])
def test_forward_matches_reference(be, dtype, size, aux_k):
    rows, d, n, k = size
    rows = max(rows, 2)  # FVU divides by the batch variance, which one row does not have
    t = sae_tensors(rows, d, n, dtype)
    values, indices, aux_values, aux_indices = encoded(t, k, min(aux_k, n), be.device)
    x, W_dec, b_dec = (t[name].to(be.device) for name in ("x", "W_dec", "b_dec"))
    out = sae_loss(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend=be.name)
    ref = sae_loss_reference(
        t["x"].double(), values.cpu().double(), indices.cpu(), t["W_dec"].double(), t["b_dec"].double(),
        None if aux_values is None else aux_values.cpu().double(), cpu(aux_indices),
    )  # fmt: skip
    assert out.x_hat.dtype == dtype
    for name in ("x_hat", "mse", "fvu", "auxk_loss"):
        assert_close(getattr(out, name).cpu(), getattr(ref, name), dtype, name)


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize(("be", "dtype"), backends_and_dtypes(), indirect=["be"])
def test_backward_matches_reference(be, dtype, aux_k):
    rows, d, n, k = 21, 37, 300, 6
    t = sae_tensors(rows, d, n, dtype)
    values, indices, aux_values, aux_indices = encoded(t, k, aux_k, be.device)
    upstream = randn(rows, d, dtype=dtype)  # x_hat also feeds another loss term

    def total(out):
        x_hat_term = (out.x_hat.cpu().double() * upstream.double()).sum()
        return (out.fvu + 0.7 * out.mse + 0.3 * out.auxk_loss).cpu() + 1e-2 * x_hat_term

    tensors = [t["x"], values, t["W_dec"], t["b_dec"]] + ([aux_values] if aux_k else [])
    ours = [v.to(be.device).clone().requires_grad_() for v in tensors]
    out = sae_loss(ours[0], ours[1], indices, ours[2], ours[3], *(ours[4:] or [None]), aux_indices, backend=be.name)
    grads = torch.autograd.grad(total(out), ours)
    refs = [v.cpu().double().clone().requires_grad_() for v in tensors]
    ref = sae_loss_reference(refs[0], refs[1], indices.cpu(), refs[2], refs[3], *(refs[4:] or [None]), cpu(aux_indices))
    ref_grads = torch.autograd.grad(total(ref), refs)
    names = ["dx", "d_values", "dW_dec", "db_dec", "d_aux_values"]
    for name, g, rg in zip(names, grads, ref_grads, strict=False):
        assert g.dtype == dtype
        assert_close(g.cpu(), rg, dtype, name)


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize(("rows", "d", "n", "k"), [(37, 97, 1000, 7), (16, 64, 300, 12)])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("be", backends("cuda_fake", "cuda"), indirect=True)
def test_cuda_forward_and_backward_with_empty_main_slots(be, dtype, rows, d, n, k, aux_k):
    t = sae_tensors(rows, d, n, dtype)
    values, indices, aux_values, aux_indices = encoded(t, k, aux_k)
    indices = indices.clone()
    indices[::3, 0] = -1
    names = ["x", "values", "W_dec", "b_dec"] + (["aux_values"] if aux_k else [])
    src = {"x": t["x"], "values": values, "W_dec": t["W_dec"], "b_dec": t["b_dec"], "aux_values": aux_values}
    leaves = {name: src[name].to(be.device).requires_grad_() for name in names}
    ref_leaves = {name: src[name].double().requires_grad_() for name in names}

    def run(v, idx, aux_idx, **kw):
        fn = sae_loss if kw else sae_loss_reference
        return fn(v["x"], v["values"], idx, v["W_dec"], v["b_dec"], v.get("aux_values"), aux_idx, **kw)

    out = run(leaves, indices.to(be.device), aux_indices.to(be.device) if aux_k else None, backend=be.name)
    ref = run(ref_leaves, indices, aux_indices)
    assert_close(out.x_hat.cpu(), ref.x_hat, dtype, "x_hat")
    for name in ("mse", "fvu", "auxk_loss"):
        assert_close(getattr(out, name).cpu(), getattr(ref, name), dtype, name)
    # every output gets an upstream gradient: x_hat too (the grad_x_hat path)
    w = randn(rows, d)
    loss = out.fvu + 0.7 * out.mse + 0.3 * out.auxk_loss + 0.01 * (out.x_hat.double() * w.to(be.device)).sum()
    ref_loss = ref.fvu + 0.7 * ref.mse + 0.3 * ref.auxk_loss + 0.01 * (ref.x_hat * w).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_grads = torch.autograd.grad(ref_loss, list(ref_leaves.values()))
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close(g.cpu(), rg, dtype, f"d{name}")


@pytest.mark.parametrize("be", backends(*ALL_BACKENDS), indirect=True)
def test_auxk_target_is_constant(be):
    # The AuxK term must not push the main latents: its target x - x_hat is held constant.
    dtype = torch.float64 if be.name in ("cpu", "torch") else torch.float32
    t = sae_tensors(15, 20, 200, dtype)
    values, indices, aux_values, aux_indices = encoded(t, 4, 6, be.device)
    values.requires_grad_()
    aux_values.requires_grad_()
    x, W_dec, b_dec = (t[name].to(be.device) for name in ("x", "W_dec", "b_dec"))
    out = sae_loss(x, values, indices, W_dec.requires_grad_(), b_dec, aux_values, aux_indices, backend=be.name)
    d_values, d_aux = torch.autograd.grad(out.auxk_loss, [values, aux_values])
    assert torch.count_nonzero(d_values) == 0
    assert torch.count_nonzero(d_aux) > 0


def test_gradcheck_cpu_without_aux():
    t = sae_tensors(6, 5, 30, torch.float64)
    values, indices, _, _ = encoded(t, 3, 0)

    def fn(x, v, w, b):
        out = sae_loss(x, v, indices, w, b, backend="cpu")
        return out.fvu, out.mse, out.x_hat

    inputs = [t["x"], values, t["W_dec"], t["b_dec"]]
    assert torch.autograd.gradcheck(fn, [v.clone().requires_grad_() for v in inputs])


@pytest.mark.parametrize("which", ["indices", "aux_indices"])
@pytest.mark.parametrize("be", backends(*GPU_BACKENDS), indirect=True)
def test_out_of_range_indices_are_named(be, which):
    t = sae_tensors(6, 8, 30, torch.float32)
    values, indices, aux_values, aux_indices = encoded(t, 3, 4, be.device)
    bad = {"indices": indices.clone(), "aux_indices": aux_indices.clone()}
    bad[which][2, 1] = 30
    x, W_dec, b_dec = (t[name].to(be.device) for name in ("x", "W_dec", "b_dec"))
    with pytest.raises(ValueError, match=rf"{which}: some index is out of range; expected a latent in \[0, 30\) or -1"):
        sae_loss(x, values, bad["indices"], W_dec, b_dec, aux_values, bad["aux_indices"], backend=be.name)


@pytest.mark.parametrize("be", backends(*GPU_BACKENDS), indirect=True)
def test_out_of_range_aux_and_negative_indices_are_named(be):
    t = on(be.device, sae_tensors(4, 8, 20, torch.float32))
    values, indices = torch.rand(4, 2, device=be.device), torch.zeros(4, 2, dtype=torch.int32, device=be.device)
    aux_indices = torch.zeros(4, 3, dtype=torch.int32, device=be.device)
    aux_indices[1, 2] = 20
    with pytest.raises(ValueError, match="aux_indices: some index is out of range"):
        sae_loss(t["x"], values, indices, t["W_dec"], t["b_dec"], torch.rand(4, 3, device=be.device), aux_indices,
                 backend=be.name)  # fmt: skip
    bad = indices.clone()
    bad[3, 0] = -2
    with pytest.raises(ValueError, match=r"^indices: some index is out of range"):
        sae_loss(t["x"], values, bad, t["W_dec"], t["b_dec"], backend=be.name)


@pytest.mark.parametrize("be", backends(*ALL_BACKENDS), indirect=True)
def test_never_materializes_batch_by_latents(be):
    rows, d, n, k = 512, 16, 8192, 8
    t = sae_tensors(rows, d, n, torch.float32)
    values, indices, aux_values, aux_indices = encoded(t, k, 8, be.device)
    x, W_dec, b_dec = (t[name].to(be.device) for name in ("x", "W_dec", "b_dec"))
    W_dec.requires_grad_()
    with LargestTensorMode() as mode:
        out = sae_loss(x, values.requires_grad_(), indices, W_dec, b_dec, aux_values, aux_indices, backend=be.name)
        (out.fvu + out.auxk_loss).backward()
    assert mode.largest <= n * d < rows * n, f"{mode.largest} elements from {mode.largest_op}"
