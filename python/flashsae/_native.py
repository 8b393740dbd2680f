"""The compiled modules: loading, dtype codes, raw addresses and output allocation.

``flashsae._C`` (CPU kernels) is always built and imported eagerly. ``flashsae._C_cuda`` is imported
only when a CUDA tensor first needs it, so ``import flashsae`` works on machines without a GPU
driver or without the CUDA module.

Outputs of every backend are allocated through :func:`new_output`, which can poison them (NaN for
floats, ``INDEX_POISON`` for indices) so tests catch any element a kernel forgot to write.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from . import _C
from .errors import BackendUnavailableError

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: _C.DTYPE_FLOAT32,
    torch.float64: _C.DTYPE_FLOAT64,
    torch.bfloat16: _C.DTYPE_BFLOAT16,
    torch.float16: _C.DTYPE_FLOAT16,
}

#: Value written into index outputs when poisoning: outside the valid range [-1, n).
INDEX_POISON = -(2**31)

_poison_outputs = os.environ.get("FLASHSAE_POISON_OUTPUTS", "0") == "1"
_cuda_module: ModuleType | None = None
_cuda_import_error: str | None = None


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def addr(t: torch.Tensor | None) -> int:
    """The address handed to C++ (0 for an absent optional tensor)."""
    return 0 if t is None else t.data_ptr()


def new_output(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized output tensor; NaN / INDEX_POISON-filled while poisoning is on."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(float("nan") if out.is_floating_point() else INDEX_POISON)
    return out


#: Smallest output, in bytes, that :func:`recycled_output` recycles (smaller blocks stay in malloc's heap).
RECYCLE_MIN_BYTES = 1 << 20
#: Storages kept per size; one per dense gradient of that size is enough (dW_enc and dW_dec of an SAE).
RECYCLE_PER_SIZE = 8

_recycle = os.environ.get("FLASHSAE_RECYCLE_OUTPUTS", "1") != "0"
_recycled: dict[int, list[torch.UntypedStorage]] = {}
_recycled_lock = threading.Lock()


def recycled_output(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`new_output` for the large dense gradients (dW_enc, dW_dec) on CPU, on the storage of an
    earlier one that nothing references any more when there is one.

    Why: ``zero_grad(set_to_none=True)`` frees a step's gradients, and glibc returns blocks above its
    mmap threshold (32 MiB at most) to the kernel, so the next step's [n, d] gradient is fresh memory:
    every page faults and is zeroed by the kernel before the kernel writes it. At n=24576, d=768 on
    this project's 2-core machine, a fresh bfloat16 [n, d] written once took 8.3 ms against 0.8 ms on
    a reused block (float32: 17.6 against 2.7), twice per TopK step (dW_enc, dW_dec).

    A kept storage whose only reference is this pool's (torch's storage use count 1: no tensor, view
    or ``.grad`` holds it) is handed out again; otherwise a new one is allocated and, up to
    RECYCLE_PER_SIZE per size, kept. The pool holds no tensor, so autograd still takes the output
    as ``.grad`` without a copy. Cost: between steps the memory of the freed gradients stays
    allocated, as with ``zero_grad(set_to_none=False)``; the peak is unchanged.
    FLASHSAE_RECYCLE_OUTPUTS=0 turns it off."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if not _recycle or device.type != "cpu" or nbytes < RECYCLE_MIN_BYTES:
        return new_output(shape, dtype, device)
    with _recycled_lock:
        pool = _recycled.setdefault(nbytes, [])
        for storage in pool:
            if torch._C._storage_Use_Count(storage._cdata) == 1:
                out = torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
                break
        else:
            # none free of this size: drop the free ones of other sizes first (gradients of a size
            # that changes step by step, e.g. the touched rows' [m, d] blocks, are never reused, and
            # kept they would add to the peak)
            for size in list(_recycled):
                kept = [s for s in _recycled[size] if size == nbytes or torch._C._storage_Use_Count(s._cdata) > 1]
                if kept:
                    _recycled[size] = kept
                else:
                    del _recycled[size]
            pool = _recycled.setdefault(nbytes, [])
            out = torch.empty(tuple(shape), dtype=dtype)
            if len(pool) < RECYCLE_PER_SIZE:
                pool.append(out.untyped_storage())
    if _poison_outputs:
        out.fill_(float("nan") if out.is_floating_point() else INDEX_POISON)
    return out


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, every kernel output starts as NaN (floats) or INDEX_POISON (indices)."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, enabled
    try:
        yield
    finally:
        _poison_outputs = previous


def cuda_module() -> ModuleType:
    """flashsae._C_cuda, imported on first use; BackendUnavailableError when it cannot be."""
    global _cuda_module, _cuda_import_error
    if _cuda_module is not None:
        return _cuda_module
    if _cuda_import_error is None:
        try:
            from . import _C_cuda

            _cuda_module = _C_cuda
            return _cuda_module
        except ImportError as exc:
            _cuda_import_error = str(exc)
    raise BackendUnavailableError(
        "flashsae was built without its CUDA module (flashsae._C_cuda could not be imported: "
        f"{_cuda_import_error}). Rebuild with nvcc on PATH: FLASHSAE_CUDA=ON pip install ."
    )


def cuda_module_available() -> bool:
    try:
        cuda_module()
    except BackendUnavailableError:
        return False
    return True


def cuda_stream(device: torch.device) -> int:
    """The raw handle of torch's current stream on `device` (kernels launch on it)."""
    return torch.cuda.current_stream(device).cuda_stream
