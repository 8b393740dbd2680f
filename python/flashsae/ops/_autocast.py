"""Autocast for the ops: torch's mixed-precision conventions, registered on the dispatcher.

Under ``torch.autocast(device_type, dtype)`` torch runs its matmul-like ops (mm, linear, ...) in the
autocast dtype: each floating input on that device type except float64 is cast to ``dtype``, the op
runs with autocast off, and autograd carries the gradients back through the casts, so a float32
parameter receives a float32 gradient. flashsae's ops do the same. The kernels accumulate in float32
whatever they read (see ``_common.acc_dtype``), so bf16 / fp16 operands give float32 accumulation:

==================  =====================================  ===============================================
op                  cast to the autocast dtype             outputs under autocast
==================  =====================================  ===============================================
topk_encode         x, W_enc, b_enc, b_dec                 values, aux_values: autocast dtype (selected in
                    (dead_mask: bool, as is)               float32); indices: int32
sparse_decode       values, W_dec, b_dec                   x_hat: autocast dtype (float32 sums)
sae_loss            x, values, W_dec, b_dec, aux_values    x_hat: autocast dtype; per-row sse, aux_sse
                                                           and the scalar mse / fvu / auxk_loss: float32
threshold_encode    x, W_enc, b_enc, threshold, b_dec      values: autocast dtype; indices: int32
batch_topk          x, W_enc, b_enc, b_dec                 values, aux_values: autocast dtype; indices: int32
==================  =====================================  ===============================================

Indices are never cast; float64 tensors and tensors on another device type are left as they are
(torch's rule). Gradients reach every input in its own dtype. threshold_encode and batch_topk are
plain functions (data-dependent output shapes) around topk_encode: they cast their inputs with
:func:`cast_operands` on entry and run with autocast off, so that their counting pass and dense
fallback see the operands the encode saw.

Why a kernel of our own rather than ``torch.library.register_autocast``:

- register_autocast casts to a dtype fixed when it is registered; torch's autocast casts to the dtype
  of the region in effect (``torch.get_autocast_dtype``: bfloat16 or float16).
- A cast copy of a parameter opted into row-sparse gradients (``_row_grads``) must carry the
  parameter's collector: the ops then hand the touched rows' gradients (in the autocast dtype, rounded
  once into the parameter's dtype by the collector) to the sparse optimizer, as without autocast;
  without it the step would silently fall back to a dense [n, d] gradient.
- The backward ops get a kernel too, which casts nothing: their operands are the forward's saved
  (already cast) tensors and gradients autograd has matched to the forward outputs' dtypes. It only
  turns autocast off, so that a backward run inside an autocast region keeps the backends' internal
  torch calls (tile GEMMs, row gathers) in the dtypes the kernels were written for.

The optimizer ops (sparse_adam_, sparse_adam_rowwise_) have no autocast rule: they update parameters
and moments in place in their own dtypes (a cast copy would take the update instead of the
parameter), and by torch's convention an optimizer step runs outside the autocast region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .. import _native
from . import _row_grads

#: Device types whose autocast the ops follow.
DEVICE_TYPES = ("cpu", "cuda")
#: Both autocast keys are excluded while an op runs: its internals (tile GEMMs, row gathers) compute in
#: the dtypes its kernels were written for, whichever region is active.
_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA
)
#: The dtypes torch's autocast casts (float64 stays float64).
CASTABLE = (torch.float32, torch.bfloat16, torch.float16)
#: The registrations below live as long as this library object (the module's lifetime).
_LIBRARY = torch.library.Library("flashsae", "IMPL")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype the ops cast to on `device`: the autocast dtype while autocast is on for its device
    type, else None."""
    if device.type in DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _CastWithRecycledGrad(torch.autograd.Function):
    """``t.to(dtype)`` whose backward writes the gradient, cast back to t's dtype, into storage that
    :func:`flashsae._native.recycled_output` hands out again step after step.

    Why: under autocast the two [n, d] parameters are cast every step, and autograd's own cast
    backward puts their float32 gradients in fresh memory that ``zero_grad(set_to_none=True)`` frees
    again: every page faults and is zeroed by the kernel first. At n=24576, d=768 (CPU, 2 cores) a
    fresh float32 [n, d] written once takes 17.6 ms against 2.7 ms on a reused block, twice a step."""

    @staticmethod
    def forward(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        t, _ = inputs
        ctx.source = (t.dtype, t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.source
        out = _native.recycled_output(tuple(grad.shape), dtype, device)
        return out.copy_(grad), None


def _eager_tensor(t: torch.Tensor) -> bool:
    """A plain tensor or parameter in eager mode, not a tracer's (torch.compile, make_fx), where the
    recycling pool must not be consulted."""
    return not torch.compiler.is_compiling() and type(t) in (torch.Tensor, torch.nn.Parameter)


def _cast(t: object, device_type: str, dtype: torch.dtype) -> object:
    if not isinstance(t, torch.Tensor) or t.device.type != device_type or t.dtype not in CASTABLE or t.dtype == dtype:
        return t
    if (t.requires_grad and device_type == "cpu" and t.numel() * t.element_size() >= _native.RECYCLE_MIN_BYTES
            and _eager_tensor(t)):  # fmt: skip
        cast = _CastWithRecycledGrad.apply(t, dtype)
    else:
        cast = t.to(dtype)
    _row_grads.share_row_grads(t, cast)  # see the module docstring
    return cast


def cast_operands(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`tensors` as the ops' autocast kernels pass them on: each castable floating tensor in the
    autocast dtype of its device type while autocast is on there; anything else unchanged. The public
    functions call it before their argument checks, so that the checks see what the kernels get."""
    out = []
    for t in tensors:
        dtype = autocast_dtype(t.device) if isinstance(t, torch.Tensor) else None
        out.append(t if dtype is None else _cast(t, t.device.type, dtype))
    return tuple(out)


def disabled(t: object) -> contextlib.AbstractContextManager:
    """Autocast off for `t`'s device type while it is on there (else a no-op): threshold_encode and
    batch_topk run their body in it, after casting their inputs with :func:`cast_operands`."""
    if isinstance(t, torch.Tensor) and autocast_dtype(t.device) is not None:
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def register(op: torch._ops.OpOverload, cast: Sequence[str] = ()) -> None:
    """Registers `op`'s autocast kernel on CPU and CUDA: the arguments named in `cast` are cast to
    the autocast dtype (those castable and on the kernel's device type), then the op runs with
    autocast off. An empty `cast` only turns autocast off (the backward ops)."""
    names = [a.name for a in op._schema.arguments]
    unknown = set(cast) - set(names)
    if unknown:
        raise ValueError(f"cast: {op} has no argument(s) {sorted(unknown)}")
    positions = frozenset(i for i, name in enumerate(names) if name in cast)
    for device_type in DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        _LIBRARY.impl(op, _kernel(op, device_type, positions, frozenset(cast)), key, with_keyset=True)


def _kernel(op: torch._ops.OpOverload, device_type: str, positions: frozenset[int], names: frozenset[str]):
    def kernel(_keyset, *args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(_cast(a, device_type, dtype) if i in positions else a for i, a in enumerate(args))
        kwargs = {k: _cast(v, device_type, dtype) if k in names else v for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return op(*args, **kwargs)

    return kernel
