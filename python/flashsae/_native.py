"""The compiled modules: loading, dtype codes, raw addresses and output allocation.

``flashsae._C`` (CPU kernels) is always built and imported eagerly. ``flashsae._C_cuda`` is imported
only when a CUDA tensor first needs it, so ``import flashsae`` works on machines without a GPU
driver or without the CUDA module.

Outputs of every backend are allocated through :func:`new_output`, which can poison them (NaN for
floats, ``INDEX_POISON`` for indices) so tests catch any element a kernel forgot to write.
"""

from __future__ import annotations

import contextlib
import os
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
