"""batch_topk: the top (batch * k) activations of the whole batch (BatchTopK, Bussmann et al. 2024),
in the padded sparse layout, exact, without the [batch, n_latents] activations.

    act      = relu((x - b_dec) W_enc^T + b_enc)                      [batch, n], never stored
    selected = the batch * k largest entries of act over the whole batch (ties: lower row, then
               lower latent index, i.e. a stable descending sort of act.flatten())
    latents  = the selected entries that are > 0, per row sorted descending

Rows get different numbers of latents, so the result is padded to m = the largest count in the batch
(at least 1): values [batch, m] and int32 indices [batch, m], empty slots (0, -1).

The exact sparse method: every selected entry of a row is among the row's top entries, so
topk_encode with ``candidates`` slots per row (sorted, never [batch, n]) gives a candidate set, and
the top batch*k of the candidates (a k-th value and a tie cut, O(batch * candidates)) is the answer
unless some row might hold more: a row whose last candidate is positive and >= the candidates'
cut value t. The true cut is >= t, so a tiled count of each row's entries >= t (``count_active``)
bounds every row's share; one more encode with that many slots (+1) is then exact. When that bound
exceeds DENSE_FRACTION (1/8) of the latents, one exact dense pass ([batch, n] GEMM, k-th value, top-m)
is cheaper than the merge and runs instead (threshold_encode.DENSE_FRACTION says why). The output
shape depends on the data, so this is a plain function around the topk_encode custom op (whose
sparse backward gives the gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_k, check_tensor
from . import _autocast, _functorch
from .threshold_encode import count_active, dense_pre_activations, padded_rows, pre_activations_at
from .topk_encode import topk_encode

#: When the retry needs more than this share of n_latents slots per row, one exact dense pass runs
#: instead: past ~n/16 slots topk_encode's running merge costs as much as the dense GEMM (see
#: threshold_encode.DENSE_FRACTION for the measurement), and the selection itself is O(batch * n).
DENSE_FRACTION = 1 / 8


class BatchTopKOutput(NamedTuple):
    """What :func:`batch_topk` returns."""

    values: torch.Tensor
    """[batch, m] selected activations (> 0) sorted descending per row, 0 in empty slots."""
    indices: torch.Tensor
    """[batch, m] int32 latent ids, -1 in empty slots."""
    aux_values: torch.Tensor | None
    """[batch, aux_k] AuxK selection (per row, top aux_k among dead latents, as topk_encode), or None."""
    aux_indices: torch.Tensor | None
    """[batch, aux_k] int32 ids of the AuxK selection (-1 where fewer latents are dead), or None."""


# --------------------------------------------------------------------------------------- reference


def batch_topk_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition over the dense [batch, n] activations, in plain differentiable torch (use
    float64 to check): (values, indices) in the padded layout."""
    act = ((x if b_dec is None else x - b_dec) @ W_enc.T + b_enc).relu()
    order = torch.sort(act.flatten(), descending=True, stable=True).indices[: act.shape[0] * k]
    selected = torch.zeros(act.numel(), dtype=torch.bool, device=act.device)
    selected[order] = True
    active = selected.view_as(act) & (act > 0)
    return padded_rows(torch.where(active, act, torch.zeros_like(act)), active)


# ------------------------------------------------------------------------------------------- helpers


def top_of_flat(values: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, cut): the `total` largest entries of `values` (any shape) with ties taken in flat
    (row-major) order, as a bool mask of values' shape, and the smallest selected value. O(numel)."""
    flat = values.reshape(-1)
    cut = -torch.kthvalue(-flat, total).values
    above = flat > cut
    ties = flat == cut
    wanted = total - above.sum()
    mask = above | (ties & (torch.cumsum(ties, 0) <= wanted))
    return mask.view_as(values), cut


# ------------------------------------------------------------------------------------------- public


def batch_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
    *,
    candidates: int | None = None,
    dead_mask: torch.Tensor | None = None,
    aux_k: int = 0,
    backend: str | None = None,
) -> BatchTopKOutput:
    """BatchTopK encoding in the padded sparse layout, exact, without the dense activations.

    Args:
        x: [batch, d] inputs, finite; W_enc [n_latents, d]; b_enc [n_latents]; b_dec optional [d]
            (subtracted from x first). The usual topk_encode checks apply.
        k: mean active latents per row; batch * k entries are selected in all.
        candidates: slots per row of the first attempt, >= k (default 4 k); a hint only: the result
            is the same for any value, a good one (about 2x the largest row count) saves a
            counting pass and a second encode.
        dead_mask, aux_k: the AuxK selection, exactly as in topk_encode (per row, among dead latents).
        backend: passed to topk_encode.

    Returns:
        :class:`BatchTopKOutput`. Differentiable in x, W_enc, b_enc, b_dec (and through aux_values)
        via topk_encode's sparse backward.

    Under ``torch.autocast`` x, W_enc, b_enc and b_dec are cast to the autocast dtype (topk_encode's
    rule, see ops/_autocast.py) and the whole selection runs on those operands.
    """
    x, W_enc, b_enc, b_dec = _autocast.cast_operands(x, W_enc, b_enc, b_dec)
    with _autocast.disabled(x):  # the counting pass and the dense path see the operands the encode saw
        if _functorch.vmap_active():
            return _batch_topk_vmapped(x, W_enc, b_enc, k, b_dec, candidates, dead_mask, aux_k, backend)
        return _batch_topk(x, W_enc, b_enc, k, b_dec, candidates, dead_mask, aux_k, backend)


def _batch_topk_vmapped(x, W_enc, b_enc, k, b_dec, candidates, dead_mask, aux_k, backend):
    """batch_topk under vmap: each vmapped slice is its own batch. The selection (a data-dependent
    width) runs below the vmap, once per slice (ops/_functorch.py, vmap_select); the values are the
    selected pre-activations from plain torch ops, the AuxK pair from topk_encode (fixed width)."""

    def selector(x, W_enc, b_enc, b_dec):
        return _batch_topk(x, W_enc, b_enc, k, b_dec, candidates, None, 0, backend).indices.long()

    positions = _functorch.vmap_select(selector, x, W_enc, b_enc, b_dec, rows=0)
    values, indices = pre_activations_at(x, W_enc, b_enc, b_dec, positions)
    aux = (None, None)
    if aux_k:
        aux = tuple(topk_encode(x, W_enc, b_enc, 1, b_dec, dead_mask=dead_mask, aux_k=aux_k, backend=backend)[2:])
    return BatchTopKOutput(values.relu(), indices, *aux)


def _batch_topk(x, W_enc, b_enc, k, b_dec, candidates, dead_mask, aux_k, backend):
    check_tensor("W_enc", W_enc, shape={"n_latents": None, "d": None})
    n = W_enc.shape[0]
    check_tensor("x", x, shape={"batch": None, "d": W_enc.shape[1]}, like=("W_enc", W_enc))
    k = check_k("k", k, n)
    if candidates is None:
        candidates = 4 * k
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates: expected a positive int, got {candidates!r}")
    slots = min(n, max(k, candidates))
    aux: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    first = True
    while slots <= n * DENSE_FRACTION or first:
        encoded = topk_encode(
            x, W_enc, b_enc, slots, b_dec, dead_mask=dead_mask if first else None, aux_k=aux_k if first else 0,
            backend=backend,
        )  # fmt: skip
        values, indices = encoded[:2]
        if first and aux_k:
            aux = (encoded[2], encoded[3])  # independent of `slots`: kept from the first pass
        first = False
        selected, cut = top_of_flat(values.detach(), x.shape[0] * k)
        last = values.detach()[:, -1]
        if slots == n or not bool(((last > 0) & (last >= cut)).any()):
            break
        # a row filled every slot with entries that may all be selected: bound each row's share by
        # its count of entries >= cut (the true cut can only be higher), then encode once more
        cutoff = torch.full((n,), float(cut), dtype=torch.float64, device=x.device)
        counts = count_active(x, W_enc, b_enc, cutoff, b_dec, inclusive=True)
        slots = min(n, max(int(counts.max()) + 1, slots + 1))
    else:  # the exact dense path (see DENSE_FRACTION); the AuxK pair of the first pass stays valid
        act = dense_pre_activations(x, W_enc, b_enc, b_dec).relu()
        selected, _ = top_of_flat(act.detach(), x.shape[0] * k)
        active = selected & (act.detach() > 0)
        values, indices = padded_rows(torch.where(active, act, torch.zeros_like(act)), active)
        return BatchTopKOutput(values, indices, *aux)
    active = selected & (values.detach() > 0)
    m = max(1, int(active.sum(1).max()))
    # selected entries of a row are a prefix of its (sorted) slots: trimming keeps all of them
    values = torch.where(active, values, torch.zeros_like(values))[:, :m].contiguous()
    indices = indices.masked_fill(~active, -1)[:, :m].contiguous()
    return BatchTopKOutput(values, indices, *aux)
