"""Gradient reduction across ranks, once per step: the shards' partial b_dec gradients, then the average
over data-parallel replicas of every gradient, dense or row-sparse.

flashsae's SAEs are plain nn.Modules with dense gradients by default, so torch's
DistributedDataParallel wraps them as any module (tests/test_distributed.py trains a TopKSAE under DDP).
:func:`reduce_gradients` is what to call instead when DDP does not fit:

- row-sparse gradients (SparseAdam): W_enc / W_dec have no ``.grad`` for DDP's hooks to reduce; each
  replica's touched rows are all-gathered (``rows`` + ``[m, d]`` values, padded to the longest) and
  summed per row, in rank order (the same sum on every replica);
- latent sharding (ShardedTopKSAE): b_dec's gradient is a partial sum per shard and must be summed
  over the shards before the data-parallel average.

Dense gradients are flattened into one buffer and all-reduced in one call. The average matches one
process that averages the gradients of the replicas' batches (each replica's loss is normalized by its
own batch, as in DDP).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops._row_grads import row_grads_of
from .layout import Layout, all_gather_ragged, all_reduce_


@torch.no_grad()
def reduce_gradients(module: nn.Module, layout: Layout) -> None:
    """After backward, before the optimizer step, on every rank: sums replicated parameters'
    gradients over the tensor-parallel group (``module.replicated_parameters()``, e.g. b_dec of a
    ShardedTopKSAE), then averages all gradients over the data-parallel group. A parameter without a
    gradient on this rank counts as a zero gradient (so every replica reduces the same buffers)."""
    replicated = getattr(module, "replicated_parameters", None)
    if replicated is not None and layout.tensor_parallel > 1:
        for p in replicated():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_(p.grad, layout.tp_group)
    if layout.dp_size == 1:
        return
    dense: list[nn.Parameter] = []
    sparse: list[nn.Parameter] = []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if row_grads_of(p) is not None and p.grad is None:
            sparse.append(p)
        else:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dense.append(p)
    if dense:
        # summed in float32 (float64 for float64): 16-bit sums over many replicas would lose bits
        acc = torch.float64 if dense[0].dtype == torch.float64 else torch.float32
        flat = torch.cat([p.grad.reshape(-1).to(acc) for p in dense])
        all_reduce_(flat, layout.dp_group)
        flat /= layout.dp_size
        offset = 0
        for p in dense:
            count = p.grad.numel()
            p.grad.copy_(flat[offset : offset + count].view_as(p.grad))
            offset += count
    for p in sparse:
        collector = row_grads_of(p)
        rows, grads = collector.coalesced()
        all_rows = all_gather_ragged(rows, layout.dp_group)
        all_grads = all_gather_ragged(grads, layout.dp_group)
        merged_rows = torch.cat(all_rows)
        unique, inverse = torch.unique(merged_rows, sorted=True, return_inverse=True)
        acc = torch.float64 if grads.dtype == torch.float64 else torch.float32
        total = torch.zeros(unique.numel(), grads.shape[1], dtype=acc, device=grads.device)
        total.index_add_(0, inverse, torch.cat(all_grads).to(acc))
        total /= layout.dp_size
        collector.set(unique, total.to(grads.dtype))
