"""sparse_rows: the three row primitives every sparse op is built from, in pure PyTorch.

A batch of sparse latents is ``coef`` [rows, k] with ``indices`` [rows, k] into the rows of an
[n, d] matrix M (-1 = an empty slot). The ops need three things of it, under the same names on the
GPU backends (``kernels/sparse_rows.py`` in Triton, ``csrc/cuda/sparse_rows.cu`` behind
``ops/_cuda.py``; on the CPU ``csrc/cpu/sparse_rows.cpp`` fuses them per op):

- ``gather_rows``: out[b] = bias + sum_j coef[b, j] M[indices[b, j]]  (decoder forward, encoder dx);
- ``dot_rows``: out[b, j] = G[b] . M[indices[b, j]]                  (d_values);
- ``scatter_rows``: out[i] = sum over the slots naming latent i of coef (R[b] - offset) (dW, db_enc).

The torch versions here are the ``torch`` backend's. They keep memory bounded: gathers of
[rows, k, d] are done in row blocks of at most ``BLOCK_ELEMENTS`` elements, so the fallback runs at
sizes where a dense [rows, n] would not fit. Math runs in float32 (float64 for float64 input), as in
the kernels. :func:`latent_segments` is the slot sort the compiled ``scatter_rows`` kernels share: it
turns the scatter into a deterministic segment reduce, with no atomics.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from .. import _checks
from .._latent_segments import latent_segments  # noqa: F401 (the ops' one name for the slot sort)
from ._common import acc_dtype, gpu_launchers, row_blocks

#: Elements of one [rows, k, d] gather block (64 MiB in float32).
BLOCK_ELEMENTS = 1 << 24


def row_kernels(backend: str) -> ModuleType:
    """The sparse_rows launchers of a GPU backend ("triton": flashsae.kernels.sparse_rows, "cuda":
    flashsae.ops._cuda), with the same arguments: ``gather_rows(coef, indices, M, out, flag, *, gate,
    bias)``, ``dot_rows(G, indices, M, out, flag)``, ``scatter_rows(coef, indices, R1, out, *, R2,
    main_slots, gate, offset, coef_sum)``."""
    return gpu_launchers(backend, "sparse_rows")


def new_flag(device: torch.device, count: int = 1) -> torch.Tensor:
    """Zeroed int32 device flags that the GPU kernels set to 1 on an out-of-range index (they skip
    the slot: a bad index is never dereferenced)."""
    return torch.zeros(count, dtype=torch.int32, device=device)


def raise_on_index_flags(flags: torch.Tensor, n: int, *names: str) -> None:
    """Raises a ValueError naming the first index argument whose flag the kernels set, for a latent
    index outside [-1, n). Reading the flags is a device sync: skipped with FLASHSAE_VALUE_CHECKS=0,
    together with the other value checks."""
    if _checks.VALUE_CHECKS and bool(flags.any()):
        name = names[int(flags.nonzero()[0, 0])]
        raise ValueError(f"{name}: some index is out of range; expected a latent in [0, {n}) or -1")


def masked_slots(coef: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef with empty slots zeroed, indices with -1 replaced by 0, as int64)."""
    valid = indices >= 0
    return coef.to(dtype) * valid, indices.clamp_min(0).long()


def gather_rows(
    coef: torch.Tensor, indices: torch.Tensor, M: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """out[b] = bias + sum_j coef[b, j] * M[indices[b, j]], in the accumulation dtype."""
    acc = acc_dtype(M.dtype)
    weights, idx = masked_slots(coef, indices, acc)
    out = F.embedding_bag(idx, M.to(acc), per_sample_weights=weights, mode="sum")
    return out if bias is None else out + bias.to(acc)


def dot_rows(G: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b, j] = G[b] . M[indices[b, j]] (0 for empty slots), in the accumulation dtype."""
    acc = acc_dtype(M.dtype)
    rows, k = indices.shape
    valid = indices >= 0
    idx = indices.clamp_min(0).long()
    out = torch.empty(rows, k, dtype=acc, device=G.device)
    for blk in row_blocks(rows, k * M.shape[1], BLOCK_ELEMENTS):
        gathered = M[idx[blk]].to(acc)  # [block, k, d]
        out[blk] = torch.bmm(gathered, G[blk].to(acc).unsqueeze(-1)).squeeze(-1)
    return out * valid


def scatter_rows(
    coef: torch.Tensor,
    indices: torch.Tensor,
    R: torch.Tensor,
    n: int,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, coef_sum): out[i] = sum over slots (b, j) with indices[b, j] = i of
    coef[b, j] * (R[b] - offset), and coef_sum[i] = sum of those coef[b, j]; accumulation dtype."""
    acc = acc_dtype(R.dtype)
    rows, k = indices.shape
    d = R.shape[1]
    weights, idx = masked_slots(coef, indices, acc)
    out = torch.zeros(n, d, dtype=acc, device=R.device)
    for blk in row_blocks(rows, k * d, BLOCK_ELEMENTS):
        contrib = weights[blk].unsqueeze(-1) * R[blk].to(acc).unsqueeze(1)  # [block, k, d]
        out.index_add_(0, idx[blk].reshape(-1), contrib.reshape(-1, d))
    coef_sum = torch.zeros(n, dtype=acc, device=R.device).index_add_(0, idx.reshape(-1), weights.reshape(-1))
    if offset is not None:
        out -= coef_sum.unsqueeze(1) * offset.to(acc)
    return out, coef_sum
