"""sae_loss: sparse decoder + reconstruction loss (MSE / FVU) + AuxK loss, fused.

Per row, in one pass over the k (+ aux_k) selected decoder rows:
    x_hat = b_dec + sum_j values[j] W_dec[idx[j]]            (the reconstruction)
    sse   = |x_hat - x|^2
    e_hat = sum_j aux_values[j] W_dec[aux_idx[j]]            (AuxK: the dead latents' guess of
    aux_sse = |e_hat - stopgrad(x - x_hat)|^2                 the residual, Gao et al. 2024)
x_hat - x is never stored; the backward recomputes x_hat and e_hat from the inputs (the same
k + aux_k row gathers) rather than keeping two [batch, d] tensors alive for autograd.

The ``cuda`` backend (flashsae._C_cuda, csrc/cuda/sae_loss.cu) has the same structure: a forward row
kernel (x_hat, per-row SSE and AuxK SSE), a backward row kernel (recomputes x_hat and e_hat, writes
the fp32 residual gradients G, H and dx), then the sparse decoder's row-dot and latent segment-reduce
kernels (csrc/cuda/sparse_rows.cu).

The ``triton`` backend (flashsae.kernels.sae_loss) runs the forward as one kernel over row blocks
and the backward as one row kernel (G, H, dx) followed by the sparse decoder's row-dot and latent
segment-reduce kernels.

The scalar losses follow sparsify: mse = sum sse / (batch * d); fvu = sum sse / total variance
with total variance = sum_b |x_b - mean_b(x)|^2; auxk_loss = sum aux_sse / total variance (the
caller scales it, e.g. by min(n_dead / aux_k, 1)).
"""

from typing import NamedTuple

import torch

from .. import _backend, _checks
from .._checks import INDEX_DTYPES, check_finite, check_tensor, narrow_indices
from .._native import _C, addr, dtype_code, new_output
from . import _autocast, _common, _row_grads
from .sparse_decode import sparse_decode_reference


class SaeLossOutput(NamedTuple):
    """What :func:`sae_loss` returns."""

    x_hat: torch.Tensor
    """[batch, d] reconstruction b_dec + sum_j values W_dec[indices], in x's dtype."""
    mse: torch.Tensor
    """Scalar mean squared error over batch and features (float32; float64 for float64 input)."""
    fvu: torch.Tensor
    """Scalar fraction of variance unexplained: sum |x_hat - x|^2 / sum |x - mean_batch(x)|^2."""
    auxk_loss: torch.Tensor
    """Scalar sum |e_hat - (x - x_hat)|^2 / total variance, with the target held constant; 0 when no
    aux latents were given. Gradients reach aux_values and W_dec only."""


# --------------------------------------------------------------------------------------- reference


def sae_loss_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    aux_values: torch.Tensor | None = None,
    aux_indices: torch.Tensor | None = None,
) -> SaeLossOutput:
    """The definition, in plain differentiable torch (use float64 to check)."""
    x_hat = sparse_decode_reference(values, indices, W_dec, b_dec)
    total_variance = (x - x.mean(0)).pow(2).sum()
    sse = (x_hat - x).pow(2).sum()
    if aux_values is None:
        auxk = sse.new_zeros(())
    else:
        e_hat = sparse_decode_reference(aux_values, aux_indices, W_dec)
        auxk = (e_hat - (x - x_hat).detach()).pow(2).sum() / total_variance
    return SaeLossOutput(x_hat, sse / x.numel(), sse / total_variance, auxk)


# ----------------------------------------------------------------------------------------- backends


def _forward(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend):
    impl = _backend.resolve("sae_loss", x.device, backend, x.dtype)
    check_finite("x", x)
    n, d = W_dec.shape
    rows, k = values.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    indices = narrow_indices("indices", indices, n)
    if aux_k:
        aux_indices = narrow_indices("aux_indices", aux_indices, n)
    acc = _common.acc_dtype(x.dtype)
    if impl == "torch":
        x_hat = _common.gather_rows(values, indices, W_dec, b_dec)
        residual = x_hat - x.to(acc)
        sse = residual.pow(2).sum(1)
        if aux_k:
            aux_sse = (_common.gather_rows(aux_values, aux_indices, W_dec) + residual).pow(2).sum(1)
        else:
            aux_sse = sse.new_empty(0)
        return x_hat.to(x.dtype), sse, aux_sse
    x_hat = new_output((rows, d), x.dtype, x.device)
    sse = new_output((rows,), acc, x.device)
    aux_sse = new_output((rows,) if aux_k else (0,), acc, x.device)
    if impl == "cuda":
        from . import _cuda

        flags = _cuda.new_flag(x.device, 2)
        _cuda.loss_forward(
            x, values, indices, aux_values if aux_k else None, aux_indices if aux_k else None, W_dec, b_dec,
            x_hat, sse, aux_sse, flags,
        )  # fmt: skip
        if _checks.VALUE_CHECKS and bool(flags.any()):
            name = "indices" if bool(flags[0]) else "aux_indices"
            raise ValueError(f"{name}: some index is out of range; expected a latent in [0, {n}) or -1")
        return x_hat, sse, aux_sse
    if impl == "triton":
        from ..kernels import sae_loss as kernels

        flags = kernels.sae_loss_forward(
            x, values, indices, aux_values if aux_k else None, aux_indices if aux_k else None, W_dec, b_dec,
            x_hat, sse, aux_sse,
        )  # fmt: skip
        if _checks.VALUE_CHECKS and bool(flags.any()):
            name = "indices" if bool(flags[0]) else "aux_indices"
            raise ValueError(f"{name}: some index is out of range; expected a latent in [0, {n}) or -1")
        return x_hat, sse, aux_sse
    _C.sae_loss_forward(
        x=addr(x), values=addr(values), indices=addr(indices), k=k, aux_values=addr(aux_values),
        aux_indices=addr(aux_indices), aux_k=aux_k, W_dec=addr(W_dec), b_dec=addr(b_dec), rows=rows, n_latents=n,
        d=d, x_hat=addr(x_hat), sse=addr(sse), aux_sse=addr(aux_sse) if aux_k else 0, dtype=dtype_code(x),
    )  # fmt: skip
    return x_hat, sse, aux_sse


def _backward(grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values, aux_indices,
              need_dx, backend):  # fmt: skip
    impl = _backend.resolve("sae_loss_backward", x.device, backend, x.dtype)
    n, d = W_dec.shape
    rows, k = values.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    indices = narrow_indices("indices", indices, n)
    if aux_k:
        aux_indices = narrow_indices("aux_indices", aux_indices, n)
    acc = _common.acc_dtype(x.dtype)
    grad_sse = grad_sse.to(acc).contiguous()
    grad_aux_sse = grad_aux_sse.to(acc).contiguous() if aux_k else None
    if impl == "torch":
        residual = _common.gather_rows(values, indices, W_dec, b_dec) - x.to(acc)
        G = 2 * grad_sse.unsqueeze(1) * residual
        if grad_x_hat is not None:
            G = G + grad_x_hat.to(acc)
        d_values = _common.dot_rows(G, indices, W_dec)
        dW_dec, _ = _common.scatter_rows(values, indices, G, n)
        d_aux_values = x.new_empty(0)
        if aux_k:
            e_hat = _common.gather_rows(aux_values, aux_indices, W_dec)
            H = 2 * grad_aux_sse.unsqueeze(1) * (e_hat + residual)
            d_aux_values = _common.dot_rows(H, aux_indices, W_dec).to(x.dtype)
            dW_dec += _common.scatter_rows(aux_values, aux_indices, H, n)[0]
        dx = (-2 * grad_sse.unsqueeze(1) * residual).to(x.dtype) if need_dx else x.new_empty(0)
        return d_values.to(x.dtype), d_aux_values, dW_dec.to(W_dec.dtype), G.sum(0).to(W_dec.dtype), dx
    d_values = new_output((rows, k), x.dtype, x.device)
    d_aux_values = new_output((rows, aux_k) if aux_k else (0,), x.dtype, x.device)
    dW_dec = new_output((n, d), W_dec.dtype, x.device)
    db_dec = new_output((d,), W_dec.dtype, x.device)
    dx = new_output((rows, d) if need_dx else (0,), x.dtype, x.device)
    if impl == "cuda":
        from . import _cuda

        # R[0] = G, R[1] = H: fp32 residual gradients (module docstring); indices were checked by the
        # forward, so the flags are not read back
        R = new_output((2 if aux_k else 1, rows, d), torch.float32, x.device)
        flags = _cuda.new_flag(x.device, 2)
        _cuda.loss_backward_rows(
            grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, aux_values if aux_k else None,
            aux_indices if aux_k else None, W_dec, b_dec, R[0], R[1] if aux_k else None, dx if need_dx else None,
            flags,
        )  # fmt: skip
        _cuda.dot_rows(R[0], indices, W_dec, d_values, flags)
        if aux_k:
            _cuda.dot_rows(R[1], aux_indices, W_dec, d_aux_values, flags)
            # one segment reduce over main and aux slots: slot columns j >= k read R[1]
            _cuda.scatter_rows(
                torch.cat([values, aux_values], dim=1), torch.cat([indices, aux_indices], dim=1), R[0], dW_dec,
                R2=R[1], main_slots=k,
            )  # fmt: skip
        else:
            _cuda.scatter_rows(values, indices, R[0], dW_dec)
        return d_values, d_aux_values, dW_dec, R[0].sum(0).to(W_dec.dtype), dx
    if impl == "triton":
        from ..kernels import sae_loss as kernels

        db_dec32 = kernels.sae_loss_backward(
            grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values if aux_k else None,
            aux_indices if aux_k else None, d_values, d_aux_values, dW_dec, dx if need_dx else None,
        )  # fmt: skip
        return d_values, d_aux_values, dW_dec, db_dec32.to(W_dec.dtype), dx
    _C.sae_loss_backward(
        grad_x_hat=addr(grad_x_hat), grad_sse=addr(grad_sse), grad_aux_sse=addr(grad_aux_sse), x=addr(x),
        values=addr(values), indices=addr(indices), k=k, aux_values=addr(aux_values), aux_indices=addr(aux_indices),
        aux_k=aux_k, W_dec=addr(W_dec), b_dec=addr(b_dec), rows=rows, n_latents=n, d=d, d_values=addr(d_values),
        d_aux_values=addr(d_aux_values) if aux_k else 0, dW_dec=addr(dW_dec), db_dec=addr(db_dec),
        dx=addr(dx) if need_dx else 0, dtype=dtype_code(x),
    )  # fmt: skip
    return d_values, d_aux_values, dW_dec, db_dec, dx


# ------------------------------------------------------------------------------------ torch.library


@torch.library.custom_op("flashsae::sae_loss", mutates_args=())
def _sae_loss_op(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    aux_values: torch.Tensor | None,
    aux_indices: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend)


@_sae_loss_op.register_fake
def _(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend):
    acc = _common.acc_dtype(x.dtype)
    rows = x.shape[0]
    return x.new_empty(x.shape), x.new_empty(rows, dtype=acc), x.new_empty(0 if aux_values is None else rows, dtype=acc)


@torch.library.custom_op("flashsae::sae_loss_backward", mutates_args=())
def _sae_loss_backward_op(
    grad_x_hat: torch.Tensor | None,
    grad_sse: torch.Tensor,
    grad_aux_sse: torch.Tensor | None,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    aux_values: torch.Tensor | None,
    aux_indices: torch.Tensor | None,
    need_dx: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(
        grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values, aux_indices, need_dx, backend
    )


@_sae_loss_backward_op.register_fake
def _(grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values, aux_indices, need_dx,
      backend):  # fmt: skip
    return (
        values.new_empty(values.shape),
        x.new_empty(0) if aux_values is None else aux_values.new_empty(aux_values.shape),
        W_dec.new_empty(W_dec.shape),
        W_dec.new_empty(W_dec.shape[1]),
        x.new_empty(x.shape if need_dx else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend = inputs
    ctx.save_for_backward(x, values, indices, W_dec, b_dec, aux_values, aux_indices)
    ctx.backend = backend
    ctx.row_grads = _row_grads.row_grads_of(W_dec)  # opt-in row-sparse dW_dec (see ops/_row_grads.py)


def _autograd_backward(ctx, grad_x_hat, grad_sse, grad_aux_sse):
    x, values, indices, W_dec, b_dec, aux_values, aux_indices = ctx.saved_tensors
    need_x, need_values, _, need_W_dec, need_b_dec, need_aux_values, _, _ = ctx.needs_input_grad
    if grad_sse is None:
        grad_sse = x.new_zeros(x.shape[0], dtype=_common.acc_dtype(x.dtype))
    if aux_values is not None and grad_aux_sse is None:
        grad_aux_sse = torch.zeros_like(grad_sse)
    sink = ctx.row_grads if need_W_dec else None
    if sink is not None:
        # the same backward on the touched rows only: dW_dec [m, d] goes to the collector
        slots = (indices,) if aux_values is None else (indices, aux_indices)
        rows, touched, compact = _row_grads.compact_indices(*slots)
        indices = compact[0]
        aux_indices = compact[1] if aux_values is not None else None
        W_dec = W_dec.index_select(0, rows)
    d_values, d_aux_values, dW_dec, db_dec, dx = _sae_loss_backward_op(
        None if grad_x_hat is None else grad_x_hat.contiguous(),
        grad_sse.contiguous(),
        None if aux_values is None else grad_aux_sse.contiguous(),
        x, values, indices, W_dec, b_dec, aux_values, aux_indices, need_x, ctx.backend,
    )  # fmt: skip
    if sink is not None:
        W_dec = None  # the gathered rows: freed before the gradient is handed over
        if touched:
            coefficients = [values] if aux_values is None else [values, aux_values]
            keep = _row_grads.contributing(list(compact), coefficients, rows.numel())
            _row_grads.add_contributing(sink, rows, dW_dec, keep)
        dW_dec = None
    return (
        dx if need_x else None,
        d_values if need_values else None,
        None,
        dW_dec if need_W_dec else None,
        db_dec if need_b_dec else None,
        d_aux_values if (aux_values is not None and need_aux_values) else None,
        None,
        None,
    )


_sae_loss_op.register_autograd(_autograd_backward, setup_context=_setup_context)

# autocast (see ops/_autocast.py): the fused decoder + loss reads every float operand in the autocast
# dtype; the per-row sums (and so the losses) stay float32, as torch's autocast keeps losses
_autocast.register(torch.ops.flashsae.sae_loss.default, cast=("x", "values", "W_dec", "b_dec", "aux_values"))
_autocast.register(torch.ops.flashsae.sae_loss_backward.default)


# ------------------------------------------------------------------------------------------- public


def sae_loss(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    aux_values: torch.Tensor | None = None,
    aux_indices: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> SaeLossOutput:
    """Reconstruction and AuxK losses of sparse latents, fused with the decoder.

    Args:
        x: [batch, d] the reconstruction target (the SAE input; for a transcoder, its output), finite.
        values, indices: [batch, k] latents (e.g. from :func:`topk_encode`); index -1 = empty slot.
        W_dec: [n_latents, d] decoder; b_dec: [d] decoder bias. Same dtype as x.
        aux_values, aux_indices: optional [batch, aux_k] AuxK latents (both or neither).
        backend: "auto" (default, or FLASHSAE_BACKEND), "cpu", "cuda", "triton" or "torch".

    Returns:
        :class:`SaeLossOutput` (x_hat, mse, fvu, auxk_loss). Differentiable in x, values, W_dec,
        b_dec and aux_values; the backward is sparse (no [batch, n_latents] tensor).

    Under ``torch.autocast(device_type, dtype)``: x, values, W_dec, b_dec and aux_values are cast to
    ``dtype`` (float32/bfloat16/float16 tensors on that device type; float64 stays), so the fused
    decoder reads them in ``dtype``; x_hat comes back in ``dtype``, the per-row sums and the scalar
    losses in float32; gradients reach each input in its own dtype. See ops/_autocast.py.
    """
    x, values, W_dec, b_dec, aux_values = _autocast.cast_operands(x, values, W_dec, b_dec, aux_values)
    check_tensor("W_dec", W_dec, shape={"n_latents": None, "d": None})
    d = W_dec.shape[1]
    check_tensor("x", x, shape={"batch": None, "d": d}, like=("W_dec", W_dec))
    rows = x.shape[0]
    check_tensor("values", values, shape={"batch": rows, "k": None}, like=("W_dec", W_dec))
    check_tensor("indices", indices, shape={"batch": rows, "k": values.shape[1]}, dtype=INDEX_DTYPES, like=("x", x))
    check_tensor("b_dec", b_dec, shape={"d": d}, like=("W_dec", W_dec))
    if (aux_values is None) != (aux_indices is None):
        raise ValueError("aux_values, aux_indices: pass both or neither")
    if aux_values is not None:
        check_tensor("aux_values", aux_values, shape={"batch": rows, "aux_k": None}, like=("W_dec", W_dec))
        check_tensor(
            "aux_indices", aux_indices, shape={"batch": rows, "aux_k": aux_values.shape[1]}, dtype=INDEX_DTYPES,
            like=("x", x),
        )  # fmt: skip
    requested = _backend.requested_backend(backend)
    x_hat, sse, aux_sse = _sae_loss_op(x, values, indices, W_dec, b_dec, aux_values, aux_indices, requested)
    x_acc = x.to(sse.dtype)
    total_variance = (x_acc - x_acc.mean(0)).pow(2).sum()
    sse_total = sse.sum()
    auxk = aux_sse.sum() / total_variance if aux_values is not None else sse_total.new_zeros(())
    return SaeLossOutput(x_hat, sse_total / x.numel(), sse_total / total_variance, auxk)
