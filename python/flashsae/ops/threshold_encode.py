"""threshold_encode: per row, every latent whose pre-activation clears its own threshold (JumpReLU),
in the padded sparse layout, without the [batch, n_latents] activations.

    pre    = (x - b_dec) W_enc^T + b_enc
    active = pre > max(threshold, 0)            (JumpReLU_threshold(relu(pre)); threshold [n])
    values = pre on active latents, sorted descending per row (ties to the lower index)

The number of active latents varies per row, so the result is padded to m = the largest count in
the batch (at least 1): ``values`` [batch, m] and int32 ``indices`` [batch, m], where empty slots
hold value 0 and index -1 (the convention of sparse_decode / sae_loss). An active slot always has a
value > 0.

How it stays sparse and exact (a composite of :func:`~flashsae.ops.topk_encode`, which never writes
[batch, n]): shifting the encoder bias by the threshold turns the question into a top-k one,

    relu(pre - theta) = relu((x - b_dec) W_enc^T + (b_enc - theta)),   theta = max(threshold, 0),

whose positive entries are exactly the active latents. topk_encode with ``candidates`` slots per row
returns them all unless a row's last slot is still positive (the row may hold more). Then one tiled
counting pass (:func:`count_active`, O(batch * tile) memory) gives every row's exact count and the
encode runs once more with enough slots. When some row needs more than DENSE_FRACTION (1/8) of
all latents, one dense [batch, n] GEMM is cheaper than the merge and its output is within 8x of the
result anyway: that exact dense path runs instead (untrained JumpReLU / ReLU SAEs, ~n/2 active).
The output shape depends on the data, so this is a plain function around the topk_encode custom op
rather than a custom op of its own.

Values are ``relu(pre - theta) + theta``: for float32 / float64 that is pre up to one rounding; for
bfloat16 / float16 both the shifted bias ``b_enc - theta`` and the values carry one extra rounding
in the storage dtype. Gradients flow to x, W_enc, b_enc and b_dec through topk_encode's sparse
backward (and cancel for the threshold, whose JumpReLU gradient needs an estimator: see JumpReLUSAE).
"""

from __future__ import annotations

import importlib

import torch

from .._checks import check_finite, check_tensor
from . import _autocast, _common, _functorch
from .topk_encode import topk_encode

# the module itself (flashsae.ops re-exports the function under the same name)
_topk_encode_module = importlib.import_module(f"{__package__}.topk_encode")

#: Slots per row of the first attempt when the caller gives no hint. 64 covers the L0 of typical
#: JumpReLU / ReLU-L1 SAEs (20-100 per token); rows that hold more trigger the counting pass.
DEFAULT_CANDIDATES = 64

#: When some row needs more than this share of n_latents slots, the exact dense path runs instead
#: (one [batch, n] GEMM and a top-m): topk_encode's running merge then costs as much as the GEMM
#: (d=768, n=16384, batch=1024 on 2 shared cores: k=1024 took 0.8 s, the dense GEMM + mask 0.8 s),
#: and the [batch, m] output is itself within 8x of [batch, n]. Untrained JumpReLU / ReLU SAEs
#: (about n/2 active) take this path.
DENSE_FRACTION = 1 / 8


# --------------------------------------------------------------------------------------- reference


def threshold_encode_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    b_dec: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition over the dense [batch, n] pre-activations, in plain differentiable torch
    (use float64 to check): JumpReLU values, stable-sorted descending, padded with (0, -1)."""
    pre = (x if b_dec is None else x - b_dec) @ W_enc.T + b_enc
    active = pre > threshold.clamp_min(0)
    order = torch.sort(pre.masked_fill(~active, float("-inf")), dim=1, descending=True, stable=True)
    m = max(1, int(active.sum(1).max()))
    empty = order.values[:, :m] == float("-inf")
    values = pre.gather(1, order.indices[:, :m]).masked_fill(empty, 0.0)
    return values, order.indices[:, :m].to(torch.int32).masked_fill(empty, -1)


# -------------------------------------------------------------------------------- padded layout


def padded_rows(dense: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The active entries of `dense` [rows, n] in the padded layout: values sorted descending per
    row (ties to the lower index), m = the largest active count of a row (>= 1), empty slots (0, -1).
    Differentiable in `dense`. A top-m (every active entry of every row is in its row's top m of the
    masked values) and the exact re-sort of compact_rows: no sort of [rows, n]."""
    if _functorch.vmap_active():  # the width m depends on the data: positions below the vmap
        positions = _functorch.vmap_select(lambda d, a: padded_rows(d, a)[1].long(), dense, active, rows=2)
        return take_slots(dense, torch.arange(dense.shape[1], device=dense.device).expand_as(dense), positions)
    m = max(1, int(active.sum(1).max()))
    top = dense.detach().masked_fill(~active, float("-inf")).topk(m, dim=1).indices
    return compact_rows(dense.gather(1, top), top.to(torch.int32), active.gather(1, top))


def take_slots(
    values: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, int32 indices) of the slots at `positions` [rows, m] (-1: an empty slot, (0, -1)).
    Differentiable in `values`; plain torch, so vmap batches it."""
    slot = positions.clamp_min(0)
    keep = positions >= 0
    taken = values.gather(1, slot)
    picked = indices.gather(1, slot).to(torch.int32)
    return torch.where(keep, taken, torch.zeros_like(taken)), picked.masked_fill(~keep, -1)


def compact_order(values: torch.Tensor, indices: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The positions (int64, into the slots) of compact_rows' result, -1 for its empty slots."""
    # two stable sorts: by index, then by value, give value order with ties to the lower index
    by_index = torch.sort(torch.where(active, indices, torch.iinfo(torch.int32).max), dim=1, stable=True).indices
    keyed = values.detach().gather(1, by_index).masked_fill(~active.gather(1, by_index), float("-inf"))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices[:, : max(1, int(active.sum(1).max()))]
    positions = by_index.gather(1, order)
    return positions.masked_fill(~active.gather(1, positions), -1)


def compact_rows(
    values: torch.Tensor, indices: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `active` slots of padded latents [rows, slots] in the padded layout: per row sorted by
    value descending (ties to the lower index), m = the largest active count (>= 1), empty slots
    (0, -1), contiguous. Differentiable in `values`."""
    if _functorch.vmap_active():
        positions = _functorch.vmap_select(compact_order, values, indices, active, rows=3)
    else:
        positions = compact_order(values, indices, active)
    values, indices = take_slots(values, indices, positions)
    return values.contiguous(), indices.contiguous()


def dense_pre_activations(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None
) -> torch.Tensor:
    """(x - b_dec) W_enc^T + b_enc as one differentiable [batch, n] GEMM in the accumulation dtype,
    returned in x's dtype: the dense fallback of the variable-count encodes."""
    acc = _common.acc_dtype(x.dtype)
    centered = (x if b_dec is None else x - b_dec).to(acc)
    return torch.addmm(b_enc.to(acc), centered, W_enc.to(acc).T).to(x.dtype)


# ------------------------------------------------------------------------------------- counting pass


@torch.no_grad()
def count_active(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    inclusive: bool = False,
) -> torch.Tensor:
    """Per row, the number of latents with relu(pre) > threshold (``inclusive``: >= threshold),
    counting only positive activations: int64 [rows].

    Runs the encoder GEMM tile by tile exactly as topk_encode does (same tiles, same accumulation
    dtype) and compares after rounding to x's dtype, as topk_encode rounds the values it returns, so
    a count agrees with those values; never holds more than one [rows, tile] block."""
    counts = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    for c0, tile in _topk_encode_module._tiles(x, W_enc, b_enc, b_dec):
        tile = tile.to(x.dtype)
        cutoff = threshold[c0 : c0 + tile.shape[1]].to(tile.dtype)
        above = tile >= cutoff if inclusive else tile > cutoff
        counts += (above & (tile > 0)).sum(1)
    return counts


# ------------------------------------------------------------------------------------------- public


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    candidates: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU encoding in the padded sparse layout, exact, without the dense activations.

    Args:
        x: [batch, d] inputs, finite; W_enc [n_latents, d]; b_enc [n_latents]; b_dec optional [d]
            (subtracted from x first). The usual topk_encode checks apply.
        threshold: [n_latents] per-latent thresholds in W_enc's dtype (a uniform threshold: expand
            a scalar); values <= 0 act as 0 (plain ReLU for that latent).
        candidates: slots per row of the first attempt (default DEFAULT_CANDIDATES); a hint only:
            the result is the same for any value, a good one (about 2x the largest row count) saves
            the counting pass and the second encode.
        backend: passed to topk_encode.

    Returns:
        ``(values, indices)``, each [batch, m] with m the largest active count of any row (>= 1):
        the active latents' pre-activations sorted descending (ties to the lower index), int32
        indices, empty slots (0, -1). Differentiable in x, W_enc, b_enc, b_dec.

    Under ``torch.autocast`` x, W_enc, b_enc, threshold and b_dec are cast to the autocast dtype
    (topk_encode's rule, see ops/_autocast.py) and the whole selection runs on those operands.
    """
    x, W_enc, b_enc, threshold, b_dec = _autocast.cast_operands(x, W_enc, b_enc, threshold, b_dec)
    with _autocast.disabled(x):  # the counting pass and the dense path see the operands the encode saw
        if _functorch.vmap_active():  # the width m depends on the data: positions below the vmap
            positions = _functorch.vmap_select(
                lambda *t: _threshold_encode(*t, candidates, backend)[1].long(), x, W_enc, b_enc, threshold, b_dec,
                rows=1,
            )  # fmt: skip
            return pre_activations_at(x, W_enc, b_enc, b_dec, positions)
        return _threshold_encode(x, W_enc, b_enc, threshold, b_dec, candidates, backend)


def pre_activations_at(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, int32 indices) of padded latents whose slots name latents `positions` [rows, m]
    (-1: empty): each value the pre-activation (x - b_dec) . W_enc[i] + b_enc[i], in the accumulation
    dtype, returned in x's dtype. The encodes' path under vmap: the latents were chosen below the
    vmap (ops/_functorch.py, vmap_select); their values come from these plain, vmappable torch ops
    (O(rows * m * d)), differentiable in x, W_enc, b_enc and b_dec."""
    acc = _common.acc_dtype(x.dtype)
    slot = positions.clamp_min(0)
    centered = (x if b_dec is None else x - b_dec).to(acc)
    pre = torch.einsum("rd,rmd->rm", centered, W_enc.to(acc)[slot]) + b_enc.to(acc)[slot]
    keep = positions >= 0
    return torch.where(keep, pre, torch.zeros_like(pre)).to(x.dtype), positions.to(torch.int32).masked_fill(~keep, -1)


def _threshold_encode(x, W_enc, b_enc, threshold, b_dec, candidates, backend):
    check_tensor("W_enc", W_enc, shape={"n_latents": None, "d": None})
    n = W_enc.shape[0]
    # x is checked here too, not only by topk_encode: the dense path never calls it
    check_tensor("x", x, shape={"batch": None, "d": W_enc.shape[1]}, like=("W_enc", W_enc))
    check_tensor("threshold", threshold, shape={"n_latents": n}, like=("W_enc", W_enc))
    check_finite("threshold", threshold)
    if candidates is None:
        candidates = DEFAULT_CANDIDATES
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates: expected a positive int, got {candidates!r}")
    theta = threshold.clamp_min(0)
    shifted = b_enc - theta
    slots = min(candidates, n)
    while slots <= n * DENSE_FRACTION:
        excess, indices = topk_encode(x, W_enc, shifted, slots, b_dec, backend=backend)
        if slots == n or not bool((excess[:, -1] > 0).any()):
            break
        # some row filled every slot: count exactly, then encode once more with one slot to spare
        # (so that every row's last slot comes back empty and proves the row complete)
        counts = count_active(x, W_enc, shifted.detach(), torch.zeros_like(theta), b_dec)
        slots = min(n, max(int(counts.max()) + 1, slots + 1))
    else:  # the exact dense path: see DENSE_FRACTION
        pre = dense_pre_activations(x, W_enc, b_enc, b_dec)
        active = pre > theta.to(pre.dtype)
        return padded_rows(torch.where(active, pre, torch.zeros_like(pre)), active)
    active = excess > 0
    values = excess + theta[indices.clamp_min(0).long()]
    # ranked by pre - theta, reported by value: re-sort each row
    return compact_rows(values, indices, active)
