"""Row-sparse gradients: the opt-in side channel from the ops' backward to a sparse optimizer.

By default every op returns the dense [n, d] gradient of W_enc / W_dec to autograd, which is what
torch's optimizers need. In a wide SAE that gradient is the largest tensor of a step (16M latents x
4096 in bf16: 128 GiB per matrix), yet only the rows of latents that fired in the batch are non-zero
(at most batch * (k + aux_k) rows). :func:`collect_row_grads` opts one [n, d] parameter into the
row-sparse path. The ops' backward then

1. compacts the problem: ``rows`` = the sorted unique latents named by the batch's slots (m of
   them), the slot indices remapped to [0, m), and ``W[rows]`` gathered into an [m, d] matrix;
2. runs the *same* backward kernels on the compact problem (every backend: the gradient of the m
   touched rows is computed by the same code that computes the dense one);
3. adds ``(rows, grad)`` of the rows with a gradient contribution (named by a slot with a non-zero
   coefficient: :func:`contributing`) to the parameter's :class:`RowGrads` and returns ``None`` to
   autograd for that parameter, so ``param.grad`` stays ``None`` and no [n, d] gradient is allocated.

Several ops touching one parameter in a backward pass (``sae_loss`` and ``sparse_decode`` on W_dec,
Multi-TopK's second loss) add several parts; :meth:`RowGrads.coalesced` sums them. A sparse optimizer
(:class:`flashsae.optim.SparseAdam`) reads and clears the collector each step; a rank of a
data-parallel run reduces it across ranks first (:mod:`flashsae.distributed`).

The per-latent bias b_enc keeps a dense [n] gradient (n values, not n * d), assembled from the compact
one. The hook is read in each op's ``setup_context`` from an attribute of the parameter object, so it
acts in eager mode only; under ``torch.compile`` the ops see traced tensors without the attribute and
return dense gradients as usual (a sparse optimizer accepts those too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .. import _native
from ._common import row_blocks, scratch

_ATTRIBUTE = "_flashsae_row_grads"


class RowGrads:
    """The row-sparse gradient of one [n, d] parameter, accumulated over a backward pass.

    Parts are ``(rows, grads)``: ``rows`` int64 [m] sorted and unique, ``grads`` [m, d] in the
    parameter's dtype. :meth:`coalesced` merges them; :meth:`clear` empties the collector (a sparse
    optimizer does it in ``zero_grad``).
    """

    def __init__(self, param: torch.Tensor) -> None:
        if param.dim() != 2:
            raise ValueError(f"param: row-sparse gradients need an [n, d] parameter, got shape {list(param.shape)}")
        self.n_rows, self.width = param.shape
        self.dtype = param.dtype
        self.device = param.device
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: Set by an optimizer that updates rows during the backward pass
        #: (:class:`flashsae.optim.SparseAdam` with ``update_in_backward=True``): ``add`` then hands each
        #: part to it at once instead of keeping it, and the ops compute the gradient a chunk of rows at
        #: a time (:func:`eager_chunks`), so no gradient larger than a chunk ever exists. The consumer
        #: uses (or copies) the gradient before it returns: the cpu backwards write every chunk into
        #: one reused buffer (:func:`chunk_buffer`).
        self.consumer: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def __len__(self) -> int:
        """Number of parts added since the last clear()."""
        return len(self._parts)

    def __reduce__(self):
        # A copy (copy.deepcopy, pickle) of the parameter gets no collector, i.e. dense gradients: a
        # model copied for evaluation or trained with another optimizer must not route its gradients
        # to a collector no optimizer reads.
        return (_no_collector, ())

    def add(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Adds the gradient ``grads`` [m, d] of the rows ``rows`` (int64 [m], sorted, unique)."""
        if rows.dim() != 1 or grads.shape != (rows.numel(), self.width):
            raise ValueError(
                f"grads: expected shape [{rows.numel()}, {self.width}] for {rows.numel()} rows, got {list(grads.shape)}"
            )
        if not rows.numel():
            return
        if self.consumer is not None:
            self.consumer(rows.to(torch.int64), grads.to(self.dtype))
        else:
            self._parts.append((rows.to(torch.int64), grads.to(self.dtype)))

    def set(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Replaces the whole gradient (e.g. by its data-parallel reduction)."""
        self._parts.clear()
        self.add(rows, grads)

    def coalesced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows int64 [m] sorted unique, grads [m, d]): the sum of every part. Empty (m = 0) when
        nothing was added. Parts are summed in float32 (float64 for float64) and rounded once."""
        if not self._parts:
            return (
                torch.empty(0, dtype=torch.int64, device=self.device),
                torch.empty(0, self.width, dtype=self.dtype, device=self.device),
            )
        if len(self._parts) == 1:
            return self._parts[0]
        rows = torch.cat([r for r, _ in self._parts])
        unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        total = torch.zeros(unique.numel(), self.width, dtype=acc, device=self.device)
        total.index_add_(0, inverse, torch.cat([g for _, g in self._parts]).to(acc))
        merged = (unique, total.to(self.dtype))
        self._parts = [merged]
        return merged

    def clear(self) -> None:
        self._parts.clear()


def _no_collector() -> None:
    return None


def collect_row_grads(param: torch.Tensor) -> RowGrads:
    """Opts the [n, d] parameter into row-sparse gradients (idempotent) and returns its collector."""
    existing = row_grads_of(param)
    if existing is not None:
        return existing
    collector = RowGrads(param)
    setattr(param, _ATTRIBUTE, collector)
    return collector


def stop_collecting(param: torch.Tensor) -> None:
    """Back to dense gradients for this parameter."""
    if hasattr(param, _ATTRIBUTE):
        delattr(param, _ATTRIBUTE)


def row_grads_of(tensor: object) -> RowGrads | None:
    """The collector attached to `tensor`, or None (the default: dense gradients)."""
    return getattr(tensor, _ATTRIBUTE, None)


#: compact_indices uses a presence mask over the latents when their count is at most this many times the
#: slots (the mask and its int32 prefix sum: 5 bytes per latent), else torch.unique's sort of the slots.
PRESENCE_FACTOR = 8


def compact_indices(*indices: torch.Tensor) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """(rows, touched, compact): ``rows`` int64, the sorted unique latents named by any slot (-1
    slots are empty and name none); ``compact`` the int32 index arrays remapped to positions in
    ``rows`` (-1 stays -1). ``touched`` = the number of such latents. When no slot names a latent,
    ``rows`` is [0] (a placeholder the kernels need, m >= 1) and ``touched`` is 0."""
    flat = torch.cat([i.reshape(-1) for i in indices])
    size = int(flat.max()) + 1 if flat.numel() else 0
    if 0 < size <= PRESENCE_FACTOR * flat.numel():
        # a presence mask over the latents and its prefix sum: O(n + slots), against torch.unique's sort
        # of the slots (100 ms for 32k int32 slots on 2 busy CPU cores, 2 ms this way)
        valid = flat >= 0
        present = torch.zeros(size, dtype=torch.bool, device=flat.device)
        present[flat[valid].long()] = True
        unique = present.nonzero().squeeze(1)
        position = present.cumsum(0, dtype=torch.int32) - 1
        inverse = torch.where(valid, position[flat.clamp_min(0).long()], -1)
    else:
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        if unique.numel() and int(unique[0]) < 0:  # only -1 can be negative: the ops range-check indices
            unique, inverse = unique[1:], inverse - 1
    touched = unique.numel()
    rows = unique.to(torch.int64) if touched else torch.zeros(1, dtype=torch.int64, device=flat.device)
    compact, start = [], 0
    for i in indices:
        compact.append(inverse[start : start + i.numel()].reshape(i.shape).to(torch.int32).contiguous())
        start += i.numel()
    return rows, touched, compact


def contributing(compact: list[torch.Tensor], coefficients: list[torch.Tensor], m: int) -> torch.Tensor:
    """[m] bool: the compact rows named by at least one slot whose coefficient is non-zero, i.e. the
    rows whose gradient has a contribution. A row named only by zero-coefficient slots (a latent
    selected with activation 0, or a candidate masked out by a global selection) has an exactly zero
    gradient and is left out, so that its optimizer update is the same whether or not a slot names it."""
    # slots without a contribution point at a spare entry m: index_fill_ over every slot, no boolean
    # gather (its nonzero + index_put cost 20 ms per call for 32k slots on 2 busy cores, this ~1 ms)
    flags = torch.zeros(m + 1, dtype=torch.bool, device=compact[0].device)
    for idx, coef in zip(compact, coefficients, strict=True):
        target = torch.where((coef != 0) & (idx >= 0), idx, m)
        flags.index_fill_(0, target.reshape(-1).long(), True)
    return flags[:m]


def add_contributing(sink: RowGrads, rows: torch.Tensor, grads: torch.Tensor, keep: torch.Tensor) -> None:
    """Hands the kept rows' gradients to the collector; without a copy when every row is kept (the
    usual case: a copy would add a third [m, d] tensor to the backward's peak, 4 GiB at m = 8192 x 64
    rows of d = 4096 in bf16)."""
    if bool(keep.all()):
        sink.add(rows, grads)
    else:
        sink.add(rows[keep], grads[keep])


#: Elements of W_enc gathered at a time for db_dec = -sum_i db_enc[i] W_enc[i]: 4M (8 MiB in bf16 + its
#: 16 MiB float32 copy); 512 chunks for 8192 x 64 touched rows of d = 4096.
DB_DEC_CHUNK_ELEMENTS = 1 << 22


def encoder_db_dec(d_pre: torch.Tensor, compact: torch.Tensor, rows: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """db_dec of the encoder's centering (x - b_dec) from the compact problem, gathering W_enc's touched
    rows a chunk at a time instead of all m of them: -sum_i (sum of d_pre over the slots naming row
    i) W_enc[rows[i]], in float32 (float64 for float64) as the kernels sum it. d_pre: [B, k] gated slot
    gradients; compact: [B, k] int32 positions in rows (-1 empty)."""
    acc = torch.float64 if W_enc.dtype == torch.float64 else torch.float32
    valid = compact >= 0
    per_row = torch.zeros(rows.numel(), dtype=acc, device=W_enc.device)
    per_row.index_add_(0, compact[valid].long(), d_pre.to(acc)[valid])
    total = torch.zeros(W_enc.shape[1], dtype=acc, device=W_enc.device)
    for chunk in row_blocks(rows.numel(), W_enc.shape[1], DB_DEC_CHUNK_ELEMENTS):
        total -= per_row[chunk] @ W_enc.index_select(0, rows[chunk]).to(acc)
    return total


class CompactRows:
    """One op's backward on the touched rows only (steps 1 and 3 of the module docstring).

    ``rows`` int64 [m]: the sorted unique latents named by the slots; ``indices``: the slot index
    arrays remapped to [0, m); ``touched``: how many latents are named (``rows`` is [0] when none,
    a placeholder the kernels need). The op runs its usual backward kernels on ``indices`` and
    :meth:`gather` (W[rows], [m, d]), then hands the [m, d] gradient over with :meth:`hand_over`."""

    def __init__(self, sink: RowGrads, *indices: torch.Tensor) -> None:
        self.sink = sink
        self.rows, self.touched, self.indices = compact_indices(*indices)

    def gather(self, W: torch.Tensor) -> torch.Tensor:
        """W[rows]: the [m, d] rows of the parameter the compact problem reads."""
        return W.index_select(0, self.rows)

    def hand_over(self, grads: torch.Tensor, coefficients: list[torch.Tensor]) -> None:
        """Adds the gradient [m, d] of the rows named by a slot with a non-zero coefficient
        (:func:`contributing`) to the collector. Returns None: autograd gets no dense gradient."""
        if self.touched:
            keep = contributing(self.indices, coefficients, self.rows.numel())
            add_contributing(self.sink, self.rows, grads, keep)

    def dense_vector(self, compact: torch.Tensor, n: int) -> torch.Tensor:
        """The dense [n] vector holding ``compact[:touched]`` at ``rows`` and zeros elsewhere."""
        out = torch.zeros(n, dtype=compact.dtype, device=compact.device)
        return out.index_copy_(0, self.rows[: self.touched], compact[: self.touched])


def compact_rows(sink: RowGrads | None, *indices: torch.Tensor) -> CompactRows | None:
    """The compact problem of a backward whose parameter has a collector (`sink`), else None (the
    dense backward)."""
    return None if sink is None else CompactRows(sink, *indices)


def share_row_grads(param: torch.Tensor, copy: torch.Tensor) -> None:
    """Routes the row gradients of `copy` (a cast of `param`, as autocast makes) to `param`'s
    collector, if it has one: the ops then hand the copy's touched rows to the collector, which rounds
    them into the parameter's dtype, and autograd gets no dense gradient for either tensor."""
    collector = row_grads_of(param)
    if collector is not None:
        setattr(copy, _ATTRIBUTE, collector)


# ------------------------------------------------------------------------ updates during backward

#: Elements of a parameter's rows whose gradient an eager backward computes at a time (4M: 16 MiB in
#: float32). CLT layer 0's decoder [8192, 6 * 384] then takes 5 chunks of 1820 rows, and the backward's
#: gradient memory is one chunk instead of the 75 MiB matrix.
EAGER_CHUNK_ELEMENTS = 1 << 22


def eager(sink: RowGrads | None) -> bool:
    """Whether the collector hands gradients to an optimizer during the backward pass."""
    return sink is not None and sink.consumer is not None


def eager_chunks(n: int, width: int, indices: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, local indices) for each chunk of consecutive parameter rows: the slots' indices remapped
    into the chunk (index - start inside it, -1 elsewhere), so the op's usual backward kernels run on
    the chunk ``W[rows]`` (a view: nothing is gathered) and skip the other slots."""
    for rows in row_blocks(n, width, EAGER_CHUNK_ELEMENTS):
        inside = (indices >= rows.start) & (indices < rows.stop)
        yield rows, torch.where(inside, indices - rows.start, -1).to(torch.int32).contiguous()


def contributing_rows(n: int, indices: list[torch.Tensor], coefficients: list[torch.Tensor]) -> torch.Tensor:
    """[n] bool: the parameter rows with a gradient contribution (:func:`contributing` on the
    uncompacted indices), computed once for every chunk of an eager backward."""
    return contributing(indices, coefficients, n)


def hand_over_chunk(sink: RowGrads, rows: slice, grads: torch.Tensor, flags: torch.Tensor) -> None:
    """Hands the gradient [rows, width] of one chunk to the collector. When at least half of the
    chunk's rows have a contribution (`flags`, [n] bool), the whole chunk goes as it is: a row without
    one gets a zero gradient, i.e. the zero-gradient Adam step that SparseAdam's catch-up would replay
    for it later anyway (dense Adam's math either way), and no [rows, width] copy is made. A CLT
    batch names about 98% of a layer's rows. Otherwise only the contributing rows are copied over."""
    chosen = flags[rows].nonzero().squeeze(1)
    if 2 * chosen.numel() >= grads.shape[0]:
        sink.add(torch.arange(rows.start, rows.stop, device=grads.device), grads)
    elif chosen.numel():
        sink.add(chosen + rows.start, grads.index_select(0, chosen))


def chunk_buffer(rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized [rows, width] tensor for one eager chunk's gradient (at most
    EAGER_CHUNK_ELEMENTS elements; :func:`flashsae.ops._common.scratch`, one buffer per thread, dtype
    and device, 16 MiB in float32), which the next chunk overwrites: the consumer has used the
    gradient by then (SparseAdam's update is done when ``add`` returns, and a partial hand-over
    copies the rows it keeps). Poisoned (NaN) like every kernel output while poisoning is on."""
    out = scratch("eager_chunk", (rows, width), dtype, device, minimum=EAGER_CHUNK_ELEMENTS)
    if _native._poison_outputs:
        out.fill_(float("nan"))
    return out
