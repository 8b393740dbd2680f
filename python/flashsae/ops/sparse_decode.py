"""sparse_decode: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec, with a sparse backward.

Forward and backward are O(batch * k * d): no [batch, n_latents] tensor exists anywhere.
Backward: d_values[b, j] = g[b] . W_dec[indices[b, j]];
dW_dec[i] = sum over slots with indices = i of values * g[b]; db_dec = sum_b g[b].

The op is the sparse_rows primitives (flashsae.ops._sparse_rows) on the decoder: forward =
``gather_rows``, backward = ``dot_rows`` (d_values) and ``scatter_rows`` (dW_dec). Backends: ``cpu``
(flashsae._C, latent-bucketed race-free dW_dec), ``cuda`` (flashsae._C_cuda, csrc/cuda/sparse_rows.cu:
row gather with 16-byte loads, warp row dots, dW_dec by a segment reduce over slots sorted by latent,
no atomics), ``triton`` (flashsae.kernels.sparse_rows: the same three kernels), ``torch``
(embedding_bag + index_add, row-blocked). :data:`DISPATCH` maps each stage to them; see flashsae._backend.
"""

from functools import partial

import torch

from .. import _backend
from .._checks import INDEX_DTYPES, check_finite, check_tensor, narrow_indices
from .._native import _C, addr, dtype_code, new_output
from . import _autocast, _functorch, _row_grads, _sparse_rows

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


def _decode_torch(values, indices, W_dec, b_dec):
    return _sparse_rows.gather_rows(values, indices, W_dec, b_dec).to(values.dtype)


def _decode_cpu(values, indices, W_dec, b_dec):
    rows, k = values.shape
    n, d = W_dec.shape
    out = new_output((rows, d), values.dtype, values.device)
    _C.sparse_decode_forward(
        values=addr(values), indices=addr(indices), rows=rows, k=k, W_dec=addr(W_dec), n_latents=n, d=d,
        b_dec=addr(b_dec), x_hat=addr(out), dtype=dtype_code(values),
    )  # fmt: skip
    return out


def _decode_gpu(backend, values, indices, W_dec, b_dec):
    """triton / cuda: out-of-range indices are skipped and raise a flag on the device, read back here."""
    out = new_output((values.shape[0], W_dec.shape[1]), values.dtype, values.device)
    flag = _sparse_rows.new_flag(values.device)
    _sparse_rows.row_kernels(backend).gather_rows(values, indices, W_dec, out, flag, bias=b_dec)
    _sparse_rows.raise_on_index_flags(flag, W_dec.shape[0], "indices")
    return out


def _decode_backward_torch(grad, values, indices, W_dec, need_db_dec):
    d_values = _sparse_rows.dot_rows(grad, indices, W_dec)
    dW_dec, _ = _sparse_rows.scatter_rows(values, indices, grad, W_dec.shape[0])
    db_dec = grad.to(d_values.dtype).sum(0) if need_db_dec else grad.new_empty(0)
    return d_values.to(values.dtype), dW_dec.to(W_dec.dtype), db_dec.to(W_dec.dtype)


def _decode_backward_cpu(grad, values, indices, W_dec, need_db_dec, dW_out=None):
    """dW_out: where dW_dec goes ([n, d], e.g. an eager chunk's reused buffer); None: a new tensor."""
    n, d = W_dec.shape
    rows, k = values.shape
    d_values = new_output((rows, k), values.dtype, values.device)
    dW_dec = new_output((n, d), W_dec.dtype, W_dec.device) if dW_out is None else dW_out
    db_dec = new_output((d,) if need_db_dec else (0,), W_dec.dtype, W_dec.device)
    _C.sparse_decode_backward(
        grad=addr(grad), values=addr(values), indices=addr(indices), rows=rows, k=k, W_dec=addr(W_dec), n_latents=n,
        d=d, d_values=addr(d_values), dW_dec=addr(dW_dec), db_dec=addr(db_dec) if need_db_dec else 0,
        dtype=dtype_code(values),
    )  # fmt: skip
    return d_values, dW_dec, db_dec


def _decode_backward_gpu(backend, grad, values, indices, W_dec, need_db_dec):
    launchers = _sparse_rows.row_kernels(backend)
    d_values = new_output(values.shape, values.dtype, values.device)
    dW_dec = new_output(W_dec.shape, W_dec.dtype, W_dec.device)
    # the forward read these indices and raised on any out of range: the flag is not read back
    launchers.dot_rows(grad, indices, W_dec, d_values, _sparse_rows.new_flag(values.device))
    launchers.scatter_rows(values, indices, grad, dW_dec)
    db_dec = grad.sum(0, dtype=torch.float32).to(W_dec.dtype) if need_db_dec else grad.new_empty(0)
    return d_values, dW_dec, db_dec


DISPATCH = _backend.register(
    {
        "sparse_decode": {
            "cpu": _decode_cpu,
            "cuda": partial(_decode_gpu, "cuda"),
            "triton": partial(_decode_gpu, "triton"),
            "torch": _decode_torch,
        },
        "sparse_decode_backward": {
            "cpu": _decode_backward_cpu,
            "cuda": partial(_decode_backward_gpu, "cuda"),
            "triton": partial(_decode_backward_gpu, "triton"),
            "torch": _decode_backward_torch,
        },
    }
)


def _forward(values, indices, W_dec, b_dec, backend: str) -> torch.Tensor:
    run = _backend.dispatch("sparse_decode", values.device, backend, values.dtype)
    check_finite("values", values)
    return run(values, narrow_indices("indices", indices, W_dec.shape[0]), W_dec, b_dec)


def _backward(grad, values, indices, W_dec, need_db_dec: bool, backend: str):
    run = _backend.dispatch("sparse_decode_backward", values.device, backend, values.dtype)
    return run(grad, values, narrow_indices("indices", indices, W_dec.shape[0]), W_dec, need_db_dec)


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
    if need_W_dec and _row_grads.eager(ctx.row_grads):
        d_values, db_dec = _eager_backward(grad.contiguous(), values, indices, W_dec, need_b_dec, ctx)
        return (d_values if need_values else None, None, None, db_dec if need_b_dec else None, None)
    # with a collector on W_dec: the same backward on the touched rows only, dW_dec [m, d] to it
    compact = _row_grads.compact_rows(ctx.row_grads if need_W_dec else None, indices)
    if compact is not None:
        (indices,) = compact.indices
        W_dec = compact.gather(W_dec)
    d_values, dW_dec, db_dec = _functorch.call(
        _sparse_decode_backward_op, _SparseDecodeBackward,
        grad.contiguous(), values, indices, W_dec, need_b_dec, ctx.backend
    )  # fmt: skip
    if compact is not None:
        W_dec = None  # the gathered rows: freed before the gradient is handed over
        dW_dec = compact.hand_over(dW_dec, [values])
    return (
        d_values if need_values else None,
        None,
        dW_dec if need_W_dec else None,
        db_dec if need_b_dec else None,
        None,
    )


def _eager_backward(grad, values, indices, W_dec, need_b_dec, ctx):
    """The backward a chunk of decoder rows at a time, each chunk's dW_dec handed to the collector's
    consumer (an optimizer updating rows during backward) before the next is computed: the same
    kernels on W_dec[chunk] with the slots remapped into it; d_values sums the chunks' (each slot
    is non-zero in one chunk only, so the sum is exact)."""
    d_values, db_dec = None, None
    flags = _row_grads.contributing_rows(W_dec.shape[0], [indices], [values])
    # the cpu kernel writes each chunk's dW_dec into one reused buffer (_row_grads.chunk_buffer)
    cpu = _backend.dispatch("sparse_decode_backward", values.device, ctx.backend, values.dtype) is _decode_backward_cpu
    for rows, local in _row_grads.eager_chunks(W_dec.shape[0], W_dec.shape[1], indices):
        need_db = need_b_dec and db_dec is None
        if cpu:
            out = _row_grads.chunk_buffer(rows.stop - rows.start, W_dec.shape[1], W_dec.dtype, W_dec.device)
            part, dW_chunk, db = _decode_backward_cpu(grad, values, local, W_dec[rows], need_db, dW_out=out)
        else:
            part, dW_chunk, db = _sparse_decode_backward_op(grad, values, local, W_dec[rows], need_db, ctx.backend)
        d_values = part if d_values is None else d_values.add_(part)
        if db.numel():
            db_dec = db
        _row_grads.hand_over_chunk(ctx.row_grads, rows, dW_chunk, flags)
    return d_values, db_dec


_sparse_decode_op.register_autograd(_autograd_backward, setup_context=_setup_context)
# torch.func (see ops/_functorch.py): the public function calls the op through this Function
_SparseDecode = _functorch.autograd_function("_SparseDecode", _sparse_decode_op, _setup_context, _autograd_backward)
_functorch.register_vmap(_sparse_decode_op, row_args=("values", "indices"))
_functorch.register_vmap(_sparse_decode_backward_op)
_SparseDecodeBackward = _functorch.backward_function("_SparseDecodeBackward", _sparse_decode_backward_op)

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
    return _functorch.call(_sparse_decode_op, _SparseDecode, values, indices, W_dec, b_dec, requested)
