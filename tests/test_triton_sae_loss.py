"""The triton backend's fused decoder + MSE/FVU + AuxK loss against the float64 reference. Device
selection as in test_triton_topk_encode.py."""

import pytest
import torch

pytest.importorskip("triton")

from flashsae import _backend
from flashsae.ops import sae_loss, sae_loss_reference, topk_encode
from helpers import SIZE_IDS, SIZES, LargestTensorMode, assert_close, randn, sae_tensors

INTERPRETING = _backend.triton_interpreting()
DEVICE = torch.device("cpu" if INTERPRETING else "cuda")
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(), reason="triton needs a CUDA GPU or TRITON_INTERPRET=1"
)


def encoded(t: dict[str, torch.Tensor], k: int, aux_k: int):
    """Real latents from the cpu backend (and aux latents over ~30% dead latents, so some aux slots
    may be empty), moved to DEVICE."""
    n = t["W_enc"].shape[0]
    dead = torch.rand(n) < 0.3
    out = topk_encode(
        t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead if aux_k else None, aux_k=aux_k, backend="cpu"
    )
    out = [o.detach().to(DEVICE) for o in out]
    return out + ([None, None] if not aux_k else [])


def to_device(*tensors):
    return [None if v is None else v.to(DEVICE) for v in tensors]


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_forward_matches_reference(dtype, size, aux_k):
    rows, d, n, k = size
    rows = max(rows, 2)  # FVU divides by the batch variance, which one row does not have
    t = sae_tensors(rows, d, n, dtype)
    values, indices, aux_values, aux_indices = encoded(t, k, min(aux_k, n))
    x, W_dec, b_dec = to_device(t["x"], t["W_dec"], t["b_dec"])
    out = sae_loss(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend="triton")
    ref = sae_loss_reference(
        t["x"].double(), values.cpu().double(), indices.cpu(), t["W_dec"].double(), t["b_dec"].double(),
        None if aux_values is None else aux_values.cpu().double(), None if aux_indices is None else aux_indices.cpu(),
    )  # fmt: skip
    assert out.x_hat.dtype == dtype
    for name in ("x_hat", "mse", "fvu", "auxk_loss"):
        assert_close(getattr(out, name).cpu(), getattr(ref, name), dtype, name)


@pytest.mark.parametrize("aux_k", [0, 5])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_backward_matches_reference(dtype, aux_k):
    rows, d, n, k = 21, 37, 300, 6
    t = sae_tensors(rows, d, n, dtype)
    values, indices, aux_values, aux_indices = encoded(t, k, aux_k)
    upstream = randn(rows, d, dtype=dtype)  # x_hat also feeds another loss term

    def total(out):
        x_hat_term = (out.x_hat.cpu().double() * upstream.double()).sum()
        return (out.fvu + 0.7 * out.mse + 0.3 * out.auxk_loss).cpu() + 1e-2 * x_hat_term

    tensors = [t["x"], values, t["W_dec"], t["b_dec"]] + ([aux_values] if aux_k else [])
    ours = [v.to(DEVICE).clone().requires_grad_() for v in tensors]
    out = sae_loss(ours[0], ours[1], indices, ours[2], ours[3], *(ours[4:] or [None]), aux_indices, backend="triton")
    grads = torch.autograd.grad(total(out), ours)
    refs = [v.cpu().double().clone().requires_grad_() for v in tensors]
    ref = sae_loss_reference(
        refs[0], refs[1], indices.cpu(), refs[2], refs[3], *(refs[4:] or [None]),
        None if aux_indices is None else aux_indices.cpu(),
    )  # fmt: skip
    ref_grads = torch.autograd.grad(total(ref), refs)
    names = ["dx", "d_values", "dW_dec", "db_dec", "d_aux_values"]
    for name, g, rg in zip(names, grads, ref_grads, strict=False):
        assert g.dtype == dtype
        assert_close(g.cpu(), rg, dtype, name)


def test_auxk_target_is_constant():
    # The AuxK term must not push the main latents: its target x - x_hat is held constant.
    t = sae_tensors(15, 20, 200, torch.float32)
    values, indices, aux_values, aux_indices = encoded(t, 4, 6)
    values.requires_grad_()
    aux_values.requires_grad_()
    x, W_dec, b_dec = to_device(t["x"], t["W_dec"], t["b_dec"])
    out = sae_loss(x, values, indices, W_dec.requires_grad_(), b_dec, aux_values, aux_indices, backend="triton")
    d_values, d_aux = torch.autograd.grad(out.auxk_loss, [values, aux_values])
    assert torch.count_nonzero(d_values) == 0
    assert torch.count_nonzero(d_aux) > 0


@pytest.mark.parametrize("which", ["indices", "aux_indices"])
def test_out_of_range_indices_are_named(which):
    t = sae_tensors(6, 8, 30, torch.float32)
    values, indices, aux_values, aux_indices = encoded(t, 3, 4)
    bad = {"indices": indices.clone(), "aux_indices": aux_indices.clone()}
    bad[which][2, 1] = 30
    x, W_dec, b_dec = to_device(t["x"], t["W_dec"], t["b_dec"])
    with pytest.raises(ValueError, match=rf"{which}: some index is out of range; expected a latent in \[0, 30\) or -1"):
        sae_loss(x, values, bad["indices"], W_dec, b_dec, aux_values, bad["aux_indices"], backend="triton")


def test_never_materializes_batch_by_latents():
    rows, d, n, k = 64, 8, 4096, 8
    t = sae_tensors(rows, d, n, torch.float32)
    values, indices, aux_values, aux_indices = encoded(t, k, 8)
    x, W_dec, b_dec = to_device(t["x"], t["W_dec"], t["b_dec"])
    W_dec.requires_grad_()
    with LargestTensorMode() as mode:
        out = sae_loss(x, values.requires_grad_(), indices, W_dec, b_dec, aux_values, aux_indices, backend="triton")
        (out.fvu + out.auxk_loss).backward()
    assert mode.largest <= n * d < rows * n, f"{mode.largest} elements from {mode.largest_op}"
