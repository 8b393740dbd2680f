"""What every op shares: the accumulation dtype and row blocking.

The row primitives of the ``torch`` backend live in :mod:`flashsae.ops._sparse_rows`.
"""

from __future__ import annotations

import importlib
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
