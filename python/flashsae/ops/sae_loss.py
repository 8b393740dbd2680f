"""sae_loss: sparse decoder + reconstruction loss (MSE / FVU) + AuxK loss, fused.

Per row, in one pass over the k (+ aux_k) selected decoder rows:
    x_hat = b_dec + sum_j values[j] W_dec[idx[j]]            (the reconstruction)
    sse   = |x_hat - x|^2
    e_hat = sum_j aux_values[j] W_dec[aux_idx[j]]            (AuxK: the dead latents' guess of
    aux_sse = |e_hat - stopgrad(x - x_hat)|^2                 the residual, Gao et al. 2024)
x_hat - x is never stored; the backward recomputes x_hat and e_hat from the inputs (the same
k + aux_k row gathers) rather than keeping two [batch, d] tensors alive for autograd.

The ``cuda`` (flashsae._C_cuda, csrc/cuda/sae_loss.cu) and ``triton`` (flashsae.kernels.sae_loss)
backends share one structure, orchestrated here: a forward row kernel (x_hat, per-row SSE and AuxK
SSE), a backward row kernel (recomputes x_hat and e_hat, writes the fp32 residual gradients G, H and
dx), then the sparse_rows kernels: dot_rows for d_values and scatter_rows (a latent segment reduce)
for dW_dec. :data:`DISPATCH` maps each stage to its backends.

The scalar losses follow sparsify: mse = sum sse / (batch * d); fvu = sum sse / total variance
with total variance = sum_b |x_b - mean_b(x)|^2; auxk_loss = sum aux_sse / total variance (the
caller scales it, e.g. by min(n_dead / aux_k, 1)).
"""

from functools import partial
from typing import NamedTuple

import torch

from .. import _backend
from .._checks import INDEX_DTYPES, check_finite, check_tensor, narrow_indices
from .._native import _C, addr, dtype_code, new_output, recycled_output
from . import _autocast, _common, _functorch, _row_grads, _sparse_rows
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


def _aux_k(aux_values: torch.Tensor | None) -> int:
    return 0 if aux_values is None else aux_values.shape[1]


def _loss_torch(x, values, indices, W_dec, b_dec, aux_values, aux_indices):
    x_hat = _sparse_rows.gather_rows(values, indices, W_dec, b_dec)
    residual = x_hat - x.to(x_hat.dtype)
    sse = residual.pow(2).sum(1)
    if _aux_k(aux_values):
        aux_sse = (_sparse_rows.gather_rows(aux_values, aux_indices, W_dec) + residual).pow(2).sum(1)
    else:
        aux_sse = sse.new_empty(0)
    return x_hat.to(x.dtype), sse, aux_sse


def _loss_outputs(x):
    rows = x.shape[0]
    acc = _common.acc_dtype(x.dtype)
    return new_output(x.shape, x.dtype, x.device), new_output((rows,), acc, x.device)


def _loss_cpu(x, values, indices, W_dec, b_dec, aux_values, aux_indices):
    n, d = W_dec.shape
    rows, k = values.shape
    aux_k = _aux_k(aux_values)
    x_hat, sse = _loss_outputs(x)
    aux_sse = new_output((rows,) if aux_k else (0,), sse.dtype, x.device)
    _C.sae_loss_forward(
        x=addr(x), values=addr(values), indices=addr(indices), k=k, aux_values=addr(aux_values),
        aux_indices=addr(aux_indices), aux_k=aux_k, W_dec=addr(W_dec), b_dec=addr(b_dec), rows=rows, n_latents=n,
        d=d, x_hat=addr(x_hat), sse=addr(sse), aux_sse=addr(aux_sse) if aux_k else 0, dtype=dtype_code(x),
    )  # fmt: skip
    return x_hat, sse, aux_sse


def _loss_gpu(backend, x, values, indices, W_dec, b_dec, aux_values, aux_indices):
    """triton / cuda: one row kernel; out-of-range indices raise flags on the device, read back here."""
    aux_k = _aux_k(aux_values)
    x_hat, sse = _loss_outputs(x)
    aux_sse = new_output((x.shape[0],) if aux_k else (0,), sse.dtype, x.device)
    flags = _sparse_rows.new_flag(x.device, 2)
    _common.gpu_launchers(backend, "sae_loss").loss_forward(
        x, values, indices, aux_values if aux_k else None, aux_indices if aux_k else None, W_dec, b_dec,
        x_hat, sse, aux_sse, flags,
    )  # fmt: skip
    _sparse_rows.raise_on_index_flags(flags, W_dec.shape[0], "indices", "aux_indices")
    return x_hat, sse, aux_sse


def _loss_backward_torch(grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values,
                         aux_indices, need_dx):  # fmt: skip
    n = W_dec.shape[0]
    residual = _sparse_rows.gather_rows(values, indices, W_dec, b_dec)
    residual -= x.to(residual.dtype)
    G = 2 * grad_sse.unsqueeze(1) * residual
    if grad_x_hat is not None:
        G = G + grad_x_hat.to(G.dtype)
    d_values = _sparse_rows.dot_rows(G, indices, W_dec)
    dW_dec, _ = _sparse_rows.scatter_rows(values, indices, G, n)
    d_aux_values = x.new_empty(0)
    if _aux_k(aux_values):
        e_hat = _sparse_rows.gather_rows(aux_values, aux_indices, W_dec)
        H = 2 * grad_aux_sse.unsqueeze(1) * (e_hat + residual)
        d_aux_values = _sparse_rows.dot_rows(H, aux_indices, W_dec).to(x.dtype)
        dW_dec += _sparse_rows.scatter_rows(aux_values, aux_indices, H, n)[0]
    dx = (-2 * grad_sse.unsqueeze(1) * residual).to(x.dtype) if need_dx else x.new_empty(0)
    return d_values.to(x.dtype), d_aux_values, dW_dec.to(W_dec.dtype), G.sum(0).to(W_dec.dtype), dx


def _loss_gradients(x, values, W_dec, aux_k, need_dx):
    """Outputs of the compiled backward: d_values, d_aux_values, dW_dec, dx."""
    rows, k = values.shape
    return (
        new_output((rows, k), x.dtype, x.device),
        new_output((rows, aux_k) if aux_k else (0,), x.dtype, x.device),
        recycled_output(W_dec.shape, W_dec.dtype, x.device),
        new_output(x.shape if need_dx else (0,), x.dtype, x.device),
    )


def _loss_backward_cpu(grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values,
                       aux_indices, need_dx):  # fmt: skip
    n, d = W_dec.shape
    rows, k = values.shape
    aux_k = _aux_k(aux_values)
    d_values, d_aux_values, dW_dec, dx = _loss_gradients(x, values, W_dec, aux_k, need_dx)
    db_dec = new_output((d,), W_dec.dtype, x.device)
    _C.sae_loss_backward(
        grad_x_hat=addr(grad_x_hat), grad_sse=addr(grad_sse), grad_aux_sse=addr(grad_aux_sse), x=addr(x),
        values=addr(values), indices=addr(indices), k=k, aux_values=addr(aux_values), aux_indices=addr(aux_indices),
        aux_k=aux_k, W_dec=addr(W_dec), b_dec=addr(b_dec), rows=rows, n_latents=n, d=d, d_values=addr(d_values),
        d_aux_values=addr(d_aux_values) if aux_k else 0, dW_dec=addr(dW_dec), db_dec=addr(db_dec),
        dx=addr(dx) if need_dx else 0, dtype=dtype_code(x),
    )  # fmt: skip
    return d_values, d_aux_values, dW_dec, db_dec, dx


def _loss_backward_gpu(backend, grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values,
                       aux_indices, need_dx):  # fmt: skip
    """triton / cuda (module docstring): the loss row kernel writes the fp32 residual gradients G and H,
    then the sparse_rows kernels give d_values = G . W[idx], d_aux_values = H . W[aux_idx] and dW_dec
    (one segment reduce over main and aux slots: slot columns j >= k read H); db_dec = sum_b G[b]."""
    rows_kernels = _sparse_rows.row_kernels(backend)
    rows, k = values.shape
    aux_k = _aux_k(aux_values)
    d_values, d_aux_values, dW_dec, dx = _loss_gradients(x, values, W_dec, aux_k, need_dx)
    G = new_output((rows, W_dec.shape[1]), torch.float32, x.device)
    H = new_output(G.shape, torch.float32, x.device) if aux_k else None
    # the forward checked these indices: the flags are not read back
    flags = _sparse_rows.new_flag(x.device, 2)
    _common.gpu_launchers(backend, "sae_loss").loss_backward_rows(
        grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, aux_values if aux_k else None,
        aux_indices if aux_k else None, W_dec, b_dec, G, H, dx if need_dx else None, flags,
    )  # fmt: skip
    rows_kernels.dot_rows(G, indices, W_dec, d_values, flags)
    if aux_k:
        rows_kernels.dot_rows(H, aux_indices, W_dec, d_aux_values, flags)
        rows_kernels.scatter_rows(
            torch.cat([values, aux_values], dim=1), torch.cat([indices, aux_indices], dim=1), G, dW_dec,
            R2=H, main_slots=k,
        )  # fmt: skip
    else:
        rows_kernels.scatter_rows(values, indices, G, dW_dec)
    return d_values, d_aux_values, dW_dec, G.sum(0).to(W_dec.dtype), dx


DISPATCH = _backend.register(
    {
        "sae_loss": {
            "cpu": _loss_cpu,
            "cuda": partial(_loss_gpu, "cuda"),
            "triton": partial(_loss_gpu, "triton"),
            "torch": _loss_torch,
        },
        "sae_loss_backward": {
            "cpu": _loss_backward_cpu,
            "cuda": partial(_loss_backward_gpu, "cuda"),
            "triton": partial(_loss_backward_gpu, "triton"),
            "torch": _loss_backward_torch,
        },
    }
)


def _narrow_slots(indices, aux_values, aux_indices, n):
    indices = narrow_indices("indices", indices, n)
    if _aux_k(aux_values):
        aux_indices = narrow_indices("aux_indices", aux_indices, n)
    return indices, aux_indices


def _forward(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend):
    run = _backend.dispatch("sae_loss", x.device, backend, x.dtype)
    check_finite("x", x)
    indices, aux_indices = _narrow_slots(indices, aux_values, aux_indices, W_dec.shape[0])
    return run(x, values, indices, W_dec, b_dec, aux_values, aux_indices)


def _backward(grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values, aux_indices,
              need_dx, backend):  # fmt: skip
    run = _backend.dispatch("sae_loss_backward", x.device, backend, x.dtype)
    indices, aux_indices = _narrow_slots(indices, aux_values, aux_indices, W_dec.shape[0])
    acc = _common.acc_dtype(x.dtype)
    grad_sse = grad_sse.to(acc).contiguous()
    grad_aux_sse = grad_aux_sse.to(acc).contiguous() if _aux_k(aux_values) else None
    return run(grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, W_dec, b_dec, aux_values, aux_indices, need_dx)


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
    # with a collector on W_dec: the same backward on the touched rows only, dW_dec [m, d] to it
    slots = (indices,) if aux_values is None else (indices, aux_indices)
    compact = _row_grads.compact_rows(ctx.row_grads if need_W_dec else None, *slots)
    if compact is not None:
        indices = compact.indices[0]
        aux_indices = compact.indices[1] if aux_values is not None else None
        W_dec = compact.gather(W_dec)
    d_values, d_aux_values, dW_dec, db_dec, dx = _functorch.call(
        _sae_loss_backward_op, _SaeLossBackward,
        None if grad_x_hat is None else grad_x_hat.contiguous(),
        grad_sse.contiguous(),
        None if aux_values is None else grad_aux_sse.contiguous(),
        x, values, indices, W_dec, b_dec, aux_values, aux_indices, need_x, ctx.backend,
    )  # fmt: skip
    if compact is not None:
        W_dec = None  # the gathered rows: freed before the gradient is handed over
        dW_dec = compact.hand_over(dW_dec, [values] if aux_values is None else [values, aux_values])
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
# torch.func (see ops/_functorch.py): the public function calls the op through this Function
_SaeLoss = _functorch.autograd_function("_SaeLoss", _sae_loss_op, _setup_context, _autograd_backward)
_functorch.register_vmap(_sae_loss_op, row_args=("x", "values", "indices", "aux_values", "aux_indices"))
_functorch.register_vmap(_sae_loss_backward_op)
_SaeLossBackward = _functorch.backward_function("_SaeLossBackward", _sae_loss_backward_op)

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
    x_hat, sse, aux_sse = _functorch.call(
        _sae_loss_op, _SaeLoss, x, values, indices, W_dec, b_dec, aux_values, aux_indices, requested
    )
    x_acc = x.to(sse.dtype)
    total_variance = (x_acc - x_acc.mean(0)).pow(2).sum()
    sse_total = sse.sum()
    auxk = aux_sse.sum() / total_variance if aux_values is not None else sse_total.new_zeros(())
    return SaeLossOutput(x_hat, sse_total / x.numel(), sse_total / total_variance, auxk)
