"""sparse_decode: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec, with a sparse backward.

Forward and backward are O(batch * k * d): no [batch, n_latents] tensor exists anywhere.
Backward: d_values[b, j] = g[b] . W_dec[indices[b, j]];
dW_dec[i] = sum over slots with indices = i of values * g[b]; db_dec = sum_b g[b].

Backends: ``cpu`` (flashsae._C, latent-bucketed race-free dW_dec), ``cuda`` (flashsae._C_cuda,
csrc/cuda/sparse_rows.cu: row gather with 16-byte loads, warp row dots, dW_dec by a segment reduce
over slots sorted by latent, no atomics), ``triton`` (flashsae.kernels.sparse_decode: gather-combine,
row dots, dW_dec by a segment reduce over slots sorted by latent, no atomics), ``torch``
(embedding_bag + index_add, row-blocked). See flashsae._backend.
"""

import torch

from .. import _backend, _checks
from .._checks import INDEX_DTYPES, check_finite, check_tensor, narrow_indices
from .._native import _C, addr, dtype_code, new_output
from . import _autocast, _common, _row_grads

# --------------------------------------------------------------------------------------- reference


def sparse_decode_reference(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """The definition, in plain differentiable torch (gathers [batch, k, d]; use float64 to check).
    An index of -1 marks an empty slot."""
    valid = indices >= 0
    rows = W_dec[indices.clamp_min(0).long()]  # [batch, k, d]
    out = ((values * valid).unsqueeze(-1) * rows).sum(1)
    return out if b_dec is None else out + b_dec


# ----------------------------------------------------------------------------------------- backends


def _raise_on_index_flag(name: str, flag: torch.Tensor, n: int) -> None:
    """The cuda / triton kernels skip out-of-range indices and raise a flag on the device, read back
    here (one sync; skipped with FLASHSAE_VALUE_CHECKS=0 together with the other value checks)."""
    if _checks.VALUE_CHECKS and bool(flag.item()):
        raise ValueError(f"{name}: some index is out of range; expected a latent in [0, {n}) or -1")


def _forward(values, indices, W_dec, b_dec, backend: str) -> torch.Tensor:
    impl = _backend.resolve("sparse_decode", values.device, backend, values.dtype)
    n, d = W_dec.shape
    check_finite("values", values)
    indices = narrow_indices("indices", indices, n)
    rows, k = values.shape
    if impl == "torch":
        return _common.gather_rows(values, indices, W_dec, b_dec).to(values.dtype)
    out = new_output((rows, d), values.dtype, values.device)
    if impl == "triton":
        from ..kernels import sparse_decode as kernels

        _raise_on_index_flag("indices", kernels.gather_rows(values, indices, W_dec, b_dec, out), n)
        return out
    if impl == "cpu":
        _C.sparse_decode_forward(
            values=addr(values), indices=addr(indices), rows=rows, k=k, W_dec=addr(W_dec), n_latents=n, d=d,
            b_dec=addr(b_dec), x_hat=addr(out), dtype=dtype_code(values),
        )  # fmt: skip
        return out
    # cuda: out-of-range indices are skipped and raise a flag on the device
    from . import _cuda

    flag = _cuda.new_flag(values.device)
    _cuda.gather_rows(values, indices, W_dec, out, flag, bias=b_dec)
    _raise_on_index_flag("indices", flag, n)
    return out


def _backward(grad, values, indices, W_dec, need_db_dec: bool, backend: str):
    impl = _backend.resolve("sparse_decode_backward", values.device, backend, values.dtype)
    n, d = W_dec.shape
    rows, k = values.shape
    indices = narrow_indices("indices", indices, n)
    if impl == "triton":
        from ..kernels import sparse_decode as kernels

        d_values = new_output((rows, k), values.dtype, values.device)
        dW_dec = new_output((n, d), W_dec.dtype, W_dec.device)
        kernels.dot_rows(grad, indices, W_dec, d_values)
        kernels.segment_rows(values, indices, grad, dW_dec)
        db_dec = grad.sum(0, dtype=torch.float32).to(W_dec.dtype) if need_db_dec else grad.new_empty(0)
        return d_values, dW_dec, db_dec
    if impl == "cuda":
        from . import _cuda

        d_values = new_output((rows, k), values.dtype, values.device)
        dW_dec = new_output((n, d), W_dec.dtype, W_dec.device)
        # the forward read these indices and raised on any out of range: the flag is not read back
        _cuda.dot_rows(grad, indices, W_dec, d_values, _cuda.new_flag(values.device))
        _cuda.scatter_rows(values, indices, grad, dW_dec)
        db_dec = grad.sum(0, dtype=torch.float32).to(W_dec.dtype) if need_db_dec else grad.new_empty(0)
        return d_values, dW_dec, db_dec
    if impl == "torch":
        d_values = _common.dot_rows(grad, indices, W_dec)
        dW_dec, _ = _common.scatter_rows(values, indices, grad, n)
        db_dec = grad.to(d_values.dtype).sum(0) if need_db_dec else grad.new_empty(0)
        return d_values.to(values.dtype), dW_dec.to(W_dec.dtype), db_dec.to(W_dec.dtype)
    d_values = new_output((rows, k), values.dtype, values.device)
    dW_dec = new_output((n, d), W_dec.dtype, W_dec.device)
    db_dec = new_output((d,) if need_db_dec else (0,), W_dec.dtype, W_dec.device)
    _C.sparse_decode_backward(
        grad=addr(grad), values=addr(values), indices=addr(indices), rows=rows, k=k, W_dec=addr(W_dec), n_latents=n,
        d=d, d_values=addr(d_values), dW_dec=addr(dW_dec), db_dec=addr(db_dec) if need_db_dec else 0,
        dtype=dtype_code(values),
    )  # fmt: skip
    return d_values, dW_dec, db_dec


# ------------------------------------------------------------------------------------ torch.library


@torch.library.custom_op("flashsae::sparse_decode", mutates_args=())
def _sparse_decode_op(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None, backend: str
) -> torch.Tensor:
    return _forward(values, indices, W_dec, b_dec, backend)


@_sparse_decode_op.register_fake
def _(values, indices, W_dec, b_dec, backend):
    return values.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("flashsae::sparse_decode_backward", mutates_args=())
def _sparse_decode_backward_op(
    grad: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    need_db_dec: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad, values, indices, W_dec, need_db_dec, backend)


@_sparse_decode_backward_op.register_fake
def _(grad, values, indices, W_dec, need_db_dec, backend):
    return (
        values.new_empty(values.shape),
        W_dec.new_empty(W_dec.shape),
        W_dec.new_empty(W_dec.shape[1] if need_db_dec else 0),
    )


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec, backend = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_b_dec = b_dec is not None
    ctx.backend = backend
    ctx.row_grads = _row_grads.row_grads_of(W_dec)  # opt-in row-sparse dW_dec (see ops/_row_grads.py)


def _autograd_backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    need_values, _, need_W_dec, need_b_dec, _ = ctx.needs_input_grad
    need_b_dec = ctx.has_b_dec and need_b_dec
    sink = ctx.row_grads if need_W_dec else None
    if sink is not None:
        # the same backward on the touched rows only: dW_dec [m, d] goes to the collector
        rows, touched, (indices,) = _row_grads.compact_indices(indices)
        W_dec = W_dec.index_select(0, rows)
    d_values, dW_dec, db_dec = _sparse_decode_backward_op(
        grad.contiguous(), values, indices, W_dec, need_b_dec, ctx.backend
    )
    if sink is not None:
        W_dec = None  # the gathered rows: freed before the gradient is handed over
        if touched:
            keep = _row_grads.contributing([indices], [values], rows.numel())
            _row_grads.add_contributing(sink, rows, dW_dec, keep)
        dW_dec = None
    return (
        d_values if need_values else None,
        None,
        dW_dec if need_W_dec else None,
        db_dec if need_b_dec else None,
        None,
    )


_sparse_decode_op.register_autograd(_autograd_backward, setup_context=_setup_context)

# autocast (see ops/_autocast.py): the decoder reads values and the parameters in the autocast dtype
_autocast.register(torch.ops.flashsae.sparse_decode.default, cast=("values", "W_dec", "b_dec"))
_autocast.register(torch.ops.flashsae.sparse_decode_backward.default)


# ------------------------------------------------------------------------------------------- public


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decodes sparse latents: ``x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec``.

    Args:
        values: [batch, k] latent activations, same dtype as W_dec (float32/float64/bfloat16/float16).
        indices: [batch, k] int32 or int64 latent ids in [0, n_latents); -1 marks an empty slot.
        W_dec: [n_latents, d] decoder, one row per latent.
        b_dec: optional [d] decoder bias.
        backend: "auto" (default, or FLASHSAE_BACKEND), "cpu", "cuda", "triton" or "torch".

    Returns:
        x_hat [batch, d] in W_dec's dtype, accumulated in float32 (float64 for float64).
        Differentiable in values, W_dec and b_dec with a sparse backward (no [batch, n] tensor).

    Under ``torch.autocast(device_type, dtype)``: values, W_dec and b_dec are cast to ``dtype``
    (float32/bfloat16/float16 tensors on that device type; float64 stays); x_hat comes back in
    ``dtype``, summed in float32; gradients reach each input in its own dtype. See ops/_autocast.py.
    """
    values, W_dec, b_dec = _autocast.cast_operands(values, W_dec, b_dec)
    check_tensor("W_dec", W_dec, shape={"n_latents": None, "d": None})
    d = W_dec.shape[1]
    check_tensor("values", values, shape={"batch": None, "k": None}, like=("W_dec", W_dec))
    rows, k = values.shape
    check_tensor("indices", indices, shape={"batch": rows, "k": k}, dtype=INDEX_DTYPES, like=("values", values))
    if b_dec is not None:
        check_tensor("b_dec", b_dec, shape={"d": d}, like=("W_dec", W_dec))
    requested = _backend.requested_backend(backend)
    return _sparse_decode_op(values, indices, W_dec, b_dec, requested)
