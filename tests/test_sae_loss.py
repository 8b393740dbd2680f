"""sae_loss (fused decoder + MSE/FVU + AuxK) against its float64 reference."""

import pytest
import torch

from flashsae.ops import sae_loss, sae_loss_reference, topk_encode
from helpers import CPU_BACKENDS, DTYPES, SIZE_IDS, SIZES, LargestTensorMode, assert_close, randn, sae_tensors


def encoded(t: dict[str, torch.Tensor], k: int, aux_k: int):
    """Real latents (and aux latents over ~30% dead latents, so some aux slots may be empty)."""
    n = t["W_enc"].shape[0]
    dead = torch.rand(n) < 0.3
    out = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead if aux_k else None, aux_k=aux_k)
    return [o.detach() for o in out] + ([None, None] if not aux_k else [])


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_matches_reference(backend, dtype, size, aux_k):
    rows, d, n, k = size
    rows = max(rows, 2)  # FVU divides by the batch variance, which one row does not have
    t = sae_tensors(rows, d, n, dtype)
    values, indices, aux_values, aux_indices = encoded(t, k, min(aux_k, n))
    out = sae_loss(t["x"], values, indices, t["W_dec"], t["b_dec"], aux_values, aux_indices, backend=backend)
    as64 = [None if v is None else v.double() for v in (aux_values,)]
    ref = sae_loss_reference(
        t["x"].double(), values.double(), indices, t["W_dec"].double(), t["b_dec"].double(), as64[0], aux_indices
    )
    assert out.x_hat.dtype == dtype
    for name in ("x_hat", "mse", "fvu", "auxk_loss"):
        assert_close(getattr(out, name), getattr(ref, name), dtype, name)


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_matches_reference(backend, dtype, aux_k):
    rows, d, n, k = 21, 37, 300, 6
    t = sae_tensors(rows, d, n, dtype)
    values, indices, aux_values, aux_indices = encoded(t, k, aux_k)
    upstream = randn(rows, d, dtype=dtype)  # x_hat also feeds another loss term

    def total(out):
        return out.fvu + 0.7 * out.mse + 0.3 * out.auxk_loss + 1e-2 * (out.x_hat.double() * upstream.double()).sum()

    def leaves(cast):
        tensors = [t["x"], values, t["W_dec"], t["b_dec"]] + ([aux_values] if aux_k else [])
        return [cast(v).clone().requires_grad_() for v in tensors]

    ours = leaves(lambda v: v)
    out = sae_loss(ours[0], ours[1], indices, ours[2], ours[3], *(ours[4:] or [None]), aux_indices, backend=backend)
    grads = torch.autograd.grad(total(out), ours)
    refs = leaves(torch.Tensor.double)
    ref = sae_loss_reference(refs[0], refs[1], indices, refs[2], refs[3], *(refs[4:] or [None]), aux_indices)
    ref_grads = torch.autograd.grad(total(ref), refs)
    names = ["dx", "d_values", "dW_dec", "db_dec", "d_aux_values"]
    for name, g, rg in zip(names, grads, ref_grads, strict=False):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_auxk_target_is_constant(backend):
    # The AuxK term must not push the main latents: its target x - x_hat is held constant.
    t = sae_tensors(15, 20, 200, torch.float64)
    values, indices, aux_values, aux_indices = encoded(t, 4, 6)
    values.requires_grad_()
    W_dec = t["W_dec"].clone().requires_grad_()
    out = sae_loss(
        t["x"], values, indices, W_dec, t["b_dec"], aux_values.requires_grad_(), aux_indices, backend=backend
    )
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_never_materializes_batch_by_latents(backend):
    rows, d, n, k = 512, 16, 8192, 8
    t = sae_tensors(rows, d, n, torch.float32)
    values, indices, aux_values, aux_indices = encoded(t, k, 8)
    W_dec = t["W_dec"].requires_grad_()
    with LargestTensorMode() as mode:
        out = sae_loss(t["x"], values.requires_grad_(), indices, W_dec, t["b_dec"], aux_values, aux_indices,
                       backend=backend)  # fmt: skip
        (out.fvu + out.auxk_loss).backward()
    assert mode.largest <= n * d < rows * n, f"{mode.largest} elements from {mode.largest_op}"
