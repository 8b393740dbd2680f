"""What every op shares: the accumulation dtype and row blocking.

The row primitives of the ``torch`` backend live in :mod:`flashsae.ops._sparse_rows`.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Iterator
from types import ModuleType

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every kernel: float64 for float64 storage, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_blocks(rows: int, elements_per_row: int, block_elements: int) -> Iterator[slice]:
    """Slices of consecutive rows, each at most ``block_elements`` elements (at least one row)."""
    step = max(1, block_elements // max(1, elements_per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def gpu_launchers(backend: str, op: str) -> ModuleType:
    """The launch functions of a GPU backend for `op`, imported on first use (importing triton takes
    seconds): flashsae.kernels.<op> for "triton", flashsae.ops._cuda (every op's wrappers) for "cuda".
    The two take the same arguments, so one orchestration in the op module serves both backends."""
    if backend == "triton":
        return importlib.import_module(f"{__package__.rpartition('.')[0]}.kernels.{op}")
    return importlib.import_module(f"{__package__}._cuda")


#: Per thread: (tag, dtype, device) -> a flat buffer reused by every call of one op's hot path.
_scratch = threading.local()


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, minimum: int = 0) -> torch.Tensor:
    """An uninitialized tensor of `shape`: a view of one buffer kept per thread, `tag`, dtype and
    device (at least `minimum` elements, grown as needed), which the next call with the same tag
    overwrites. For temporaries that an op uses and drops before it returns (or before its next
    call with the tag): a fresh large tensor per call is a fresh allocation whose pages the OS faults
    in and zeroes again whenever glibc has trimmed its heap in between: the CLT training step (L = 6,
    n = 8192 per layer, B = 1024, two cores) took ~30k page faults per step, most from the eager
    backwards' 16 MiB gradient chunks (flashsae.ops._row_grads.chunk_buffer). The buffers stay
    allocated: resident memory, not step memory."""
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    need = math.prod(shape)
    key = (tag, dtype, device)
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < need:
        buffer = torch.empty(max(need, minimum), dtype=dtype, device=device)
        cache[key] = buffer
    return buffer[:need].view(shape)
