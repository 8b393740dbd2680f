"""Decoder-row helpers for training with row-sparse gradients (the counterparts of
:meth:`flashsae.modules.SAE.remove_decoder_parallel_grads_` and :meth:`~flashsae.modules.SAE.normalize_decoder_`).

With a unit-norm decoder, a training step removes from W_dec's gradient its component along each row,
then renormalizes the rows after the optimizer step. Both act row by row, so with row-sparse
gradients they need only the touched rows: a row without gradient has no component to remove, and a
row the optimizer did not change keeps its unit norm. Same arithmetic as the dense methods.
"""

from __future__ import annotations

import torch

from ..ops._common import row_blocks
from ..ops._row_grads import row_grads_of

#: Rows handled at a time (16M elements: the float32 temporaries of a chunk stay at 64 MiB; whole at
#: once, a flush of a 5M x 4096 bf16 decoder would allocate 80 GiB of float32 copies).
CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def remove_parallel_row_grads_(W_dec: torch.Tensor) -> None:
    """Removes from W_dec's row-sparse gradient its component along each (touched) decoder row, in
    place, a chunk of rows at a time. No-op without a collector or without collected rows."""
    collector = row_grads_of(W_dec)
    if collector is None or not len(collector):
        return
    rows, grads = collector.coalesced()
    for chunk in row_blocks(rows.numel(), W_dec.shape[1], CHUNK_ELEMENTS):
        weights = W_dec.index_select(0, rows[chunk]).float()
        norms_sq = torch.linalg.vecdot(weights, weights).clamp_min(1e-12)
        along = torch.linalg.vecdot(grads[chunk].float(), weights) / norms_sq
        grads[chunk] -= (along.unsqueeze(1) * weights).to(grads.dtype)


@torch.no_grad()
def normalize_rows_(
    W: torch.Tensor, rows: torch.Tensor | None = None, *, master: torch.Tensor | None = None, eps: float = 1e-12
) -> None:
    """Rescales the given rows of W (all rows when None) to unit L2 norm (rows of norm < eps are left
    as they are), a chunk of rows at a time. With a float32 ``master`` copy (SparseAdam's
    master_weights), the master rows are normalized and rounded into W, so the two stay consistent."""
    source = W if master is None else master
    count = source.shape[0] if rows is None else rows.numel()
    for chunk in row_blocks(count, source.shape[1], CHUNK_ELEMENTS):
        ids = None if rows is None else rows[chunk]
        chosen = source[chunk] if ids is None else source.index_select(0, ids)
        norms = chosen.float().norm(dim=1, keepdim=True)
        scaled = chosen.div(torch.where(norms < eps, torch.ones_like(norms), norms).to(chosen.dtype))
        if ids is None:
            source[chunk] = scaled
            if master is not None:
                W[chunk] = scaled.to(W.dtype)
        else:
            source.index_copy_(0, ids, scaled)
            if master is not None:
                W.index_copy_(0, ids, scaled.to(W.dtype))
