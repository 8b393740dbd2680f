"""Pure-PyTorch building blocks of the ``torch`` backend, shared by the ops.

They mirror the three row patterns of the compiled kernels (gather-combine, row dot, latent
scatter) and keep their memory bounded: gathers of [rows, k, d] are done in row blocks of at most
``BLOCK_ELEMENTS`` elements, so the fallback runs at sizes where a dense [rows, n] would not fit.
Indices may be -1 (an empty slot, skipped). Math runs in float32 (float64 for float64 input), as in
the kernels.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

#: Elements of one [rows, k, d] gather block (64 MiB in float32).
BLOCK_ELEMENTS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every kernel: float64 for float64 storage, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_blocks(rows: int, elements_per_row: int, block_elements: int = BLOCK_ELEMENTS) -> Iterator[slice]:
    """Slices of consecutive rows, each at most ``block_elements`` elements (at least one row)."""
    step = max(1, block_elements // max(1, elements_per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


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
    for blk in row_blocks(rows, k * M.shape[1]):
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
    for blk in row_blocks(rows, k * d):
        contrib = weights[blk].unsqueeze(-1) * R[blk].to(acc).unsqueeze(1)  # [block, k, d]
        out.index_add_(0, idx[blk].reshape(-1), contrib.reshape(-1, d))
    coef_sum = torch.zeros(n, dtype=acc, device=R.device).index_add_(0, idx.reshape(-1), weights.reshape(-1))
    if offset is not None:
        out -= coef_sum.unsqueeze(1) * offset.to(acc)
    return out, coef_sum
