"""topk_encode: per row, the top-k of relu((x - b_dec) W_enc^T + b_enc), sorted descending.

Ties go to the lower latent index. Optionally also the AuxK selection (Gao et al. 2024): the top
aux_k of the same activations restricted to latents marked dead, in the same pass.

No backend writes the [batch, n_latents] pre-activations: the encoder GEMM runs tile by tile over
the latents (``tile_columns`` latents at a time, torch's GEMM on CPU) and a running top-k per row
keeps the best candidates, so the extra memory is O(batch * (k + tile)).

Backward is sparse: with d_pre = d_values * [values > 0] on the k selected slots,
dW_enc[i] += d_pre * (x - b_dec) and db_enc[i] += d_pre touch only selected latents;
dx = sum_j d_pre W_enc[idx] and db_dec = -sum_b dx are computed only when asked for.

The ``cuda`` backend (flashsae._C_cuda, csrc/cuda/topk_encode.cu) runs the encoder GEMM with torch
(cuBLAS) one chunk of ``cuda_chunk_columns`` latents at a time, into fp32 scores, and merges each chunk
into a per-row select state with one radix-select kernel that reads the scores once and adds the
bias c = b_enc - W_enc b_dec (fp32) and the relu itself; the AuxK state is fed in the same pass.
So [B, n] never exists: the extra memory is one [B, chunk] fp32 tile. The kernel's final sort holds
at most ``_cuda.topk_max_k()`` (2048) keys per row: a larger k selects with the torch backend's
running merge, a larger aux_k over the dead latents only (as the triton backend does past
FUSED_AUX_MAX). Its backward is dW_enc / db_enc by latent-sorted segments and dx by a row gather.

The ``triton`` backend (flashsae.kernels.topk_encode) fuses the encoder GEMM with the selection in
one kernel (tl.dot tiles, a register-resident top-k per row, no [batch, n] tensor at all). It fuses
the AuxK selection too when aux_k <= ``FUSED_AUX_MAX``; a larger aux_k (TopKSAE's default is d_in / 2)
would not fit in registers, so the aux top-k then runs over the dead latents only, with the torch
backend's tiled GEMM + running merge: its extra GEMM is n_dead / n of the encoder's.
"""

from functools import partial

import torch

from .. import _backend
from .._checks import check_finite, check_k, check_tensor
from .._native import _C, DTYPE_CODES, addr, dtype_code, new_output, recycled_output
from . import _autocast, _common, _functorch, _row_grads, _sparse_rows, _topk_encode_cpu

#: Values of topk_encode's ``precision`` argument: "auto" and the cpu backend's precisions.
PRECISIONS = ("auto", *_topk_encode_cpu.PRECISIONS)

#: Largest aux_k the triton backend selects inside its fused encoder kernel: a second per-row state of
#: next_pow2(aux_k) int64 keys has to stay in registers next to the main one (sm_90: 247 registers per
#: thread with k, aux_k <= 64 at 64-row blocks, see kernels/topk_encode.py).
FUSED_AUX_MAX = 128

#: Elements of one pre-activation tile [batch, tile_columns] (16 MiB in float32).
#: d=768, n=24576, B=1024 on 2 CPU cores: 4096-wide tiles run the 12 tile GEMMs in 200 ms against
#: 245 ms for one [1024, 24576] GEMM (no 100 MB output to page in), and the merge adds ~10 ms.
TILE_ELEMENTS = 1 << 22


def tile_columns(rows: int, n_latents: int) -> int:
    """Latents per encoder tile: TILE_ELEMENTS / rows, in multiples of 64, at least 256."""
    cols = max(256, (TILE_ELEMENTS // max(rows, 1)) // 64 * 64)
    return min(n_latents, cols)


#: Scores of one encoder chunk on CUDA (fp32: 256 MiB). At B = 16384 that is 4096 latents per chunk:
#: a [16384, d] x [d, 4096] GEMM keeps the tensor cores busy, and the select re-reads its [B, k]
#: state once per chunk (8k bytes per row against 4 * 4096 of scores).
CUDA_CHUNK_ELEMENTS = 1 << 26


def cuda_chunk_columns(rows: int, n_latents: int) -> int:
    """Latents per encoder chunk on CUDA: CUDA_CHUNK_ELEMENTS / rows in multiples of 256 (so fp32
    score rows stay 16-byte aligned for the select's vector loads), at least 256."""
    cols = max(256, (CUDA_CHUNK_ELEMENTS // max(rows, 1)) // 256 * 256)
    return min(n_latents, cols)


# --------------------------------------------------------------------------------------- reference


def topk_encode_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
    *,
    dead_mask: torch.Tensor | None = None,
    aux_k: int = 0,
) -> tuple[torch.Tensor, ...]:
    """The definition, in plain differentiable torch over the dense [batch, n] activations.

    A stable descending sort gives the tie rule (lower index first). Aux slots beyond the number
    of dead latents hold value 0 and index -1."""
    pre = (x if b_dec is None else x - b_dec) @ W_enc.T + b_enc
    act = pre.relu()
    top = torch.sort(act, dim=-1, descending=True, stable=True)
    values, indices = top.values[:, :k], top.indices[:, :k].to(torch.int32)
    if aux_k == 0:
        return values, indices
    aux = torch.sort(act.masked_fill(~dead_mask, float("-inf")), dim=-1, descending=True, stable=True)
    aux_values, aux_indices = aux.values[:, :aux_k], aux.indices[:, :aux_k].to(torch.int32)
    empty = aux_values == float("-inf")
    return values, indices, aux_values.masked_fill(empty, 0.0), aux_indices.masked_fill(empty, -1)


# ----------------------------------------------------------------------------------------- backends


def _centered(x: torch.Tensor, b_dec: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    return x.to(acc) if b_dec is None else x.to(acc) - b_dec.to(acc)


def _tiles(x, W_enc, b_enc, b_dec):
    """Yields (first latent, [rows, cols] pre-activation tile in the accumulation dtype); the tile
    buffer is reused, so each tile is valid until the next one is produced."""
    rows = x.shape[0]
    n = W_enc.shape[0]
    acc = _common.acc_dtype(x.dtype)
    centered = _centered(x, b_dec, acc)
    cols = tile_columns(rows, n)
    buffer = torch.empty(rows, cols, dtype=acc, device=x.device)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        # addmm writes straight into the strided view: row stride stays `cols`
        tile = torch.addmm(b_enc[c0:c1].to(acc), centered, W_enc[c0:c1].to(acc).T, out=buffer[:, : c1 - c0])
        yield c0, tile


def _encode_cpu(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision):
    """The vendor GEMM per latent chunk + the C++ running top-k, with the precisions (_topk_encode_cpu)."""
    cols = tile_columns(x.shape[0], W_enc.shape[0])
    if x.dtype == torch.float64:
        return _topk_encode_cpu.encode_float64(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, cols)
    precision = _topk_encode_cpu.resolve_precision(precision, x.dtype)
    return _topk_encode_cpu.encode(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision, cols)


class _RunningTopK:
    """Pure-torch running top-k with the exact tie rule: candidates kept so far (sorted, lower
    indices) come before the new tile (ascending indices), so a stable descending sort of their
    concatenation orders ties by index."""

    def __init__(self, rows: int, k: int, dtype: torch.dtype, device: torch.device):
        self.k = k
        self.values = torch.empty(rows, 0, dtype=dtype, device=device)
        self.indices = torch.empty(rows, 0, dtype=torch.int64, device=device)

    def merge(self, scores: torch.Tensor, columns: torch.Tensor) -> None:
        values = torch.cat([self.values, scores], dim=1)
        indices = torch.cat([self.indices, columns.expand(scores.shape[0], -1)], dim=1)
        order = torch.sort(values, dim=1, descending=True, stable=True)
        self.values = order.values[:, : self.k]
        self.indices = indices.gather(1, order.indices[:, : self.k])

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        empty = self.values == float("-inf")  # only aux slots: fewer dead latents than slots
        values = self.values.masked_fill(empty, 0.0).to(dtype)
        return values, self.indices.masked_fill(empty, -1).to(torch.int32)


def _encode_torch(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k):
    rows = x.shape[0]
    acc = _common.acc_dtype(x.dtype)
    best = _RunningTopK(rows, k, acc, x.device)
    aux = _RunningTopK(rows, aux_k, acc, x.device)
    for c0, tile in _tiles(x, W_enc, b_enc, b_dec):
        scores = tile.relu()
        columns = torch.arange(c0, c0 + tile.shape[1], device=x.device)
        best.merge(scores, columns)
        if aux_k:
            aux.merge(scores.masked_fill(~dead_mask[c0 : c0 + tile.shape[1]], float("-inf")), columns)
    return (*best.result(x.dtype), *aux.result(x.dtype))


def _encode_triton(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k):
    from ..kernels import topk_encode as kernels

    rows = x.shape[0]
    values = new_output((rows, k), x.dtype, x.device)
    indices = new_output((rows, k), torch.int32, x.device)
    aux_values = new_output((rows, aux_k), x.dtype, x.device)
    aux_indices = new_output((rows, aux_k), torch.int32, x.device)
    fused_aux = aux_k if aux_k <= FUSED_AUX_MAX else 0
    kernels.topk_encode(
        x, W_enc, b_enc, b_dec, k, dead_mask if fused_aux else None, fused_aux, values, indices, aux_values, aux_indices
    )
    if aux_k and not fused_aux:
        _aux_over_dead_latents(x, W_enc, b_enc, b_dec, dead_mask, aux_values, aux_indices)
    return values, indices, aux_values, aux_indices


def _aux_over_dead_latents(x, W_enc, b_enc, b_dec, dead_mask, aux_values, aux_indices):
    """Fills the aux outputs with the top-aux_k among dead latents by encoding against the dead rows
    of W_enc only (the torch backend's tiles). Dead ids ascend, so subset ties keep the lower latent."""
    dead = dead_mask.nonzero().squeeze(1)
    aux_values.zero_()
    aux_indices.fill_(-1)
    filled = min(aux_values.shape[1], dead.numel())
    if filled:
        sub_values, sub_indices, _, _ = _encode_torch(x, W_enc[dead], b_enc[dead], b_dec, filled, None, 0)
        aux_values[:, :filled] = sub_values
        aux_indices[:, :filled] = dead[sub_indices.long()].to(torch.int32)


def _cuda_encoder_bias(W_enc, b_enc, b_dec):
    """c = b_enc - W_enc b_dec in fp32 [n], so each chunk's GEMM runs on x itself:
    (x - b_dec) W^T + b_enc = x W^T + c, without rounding x - b_dec to a 16-bit dtype."""
    c = b_enc.float()
    if b_dec is None:
        return c
    if W_enc.dtype == torch.float32:
        return c - W_enc @ b_dec
    return c - torch.mm(W_enc, b_dec.unsqueeze(1), out_dtype=torch.float32).squeeze(1)


def _cuda_chunk_scores(x, W_chunk):
    """x W_chunk^T in fp32 (fp32 accumulation and output for 16-bit inputs too: selection never sees
    scores rounded to bf16)."""
    if x.dtype == torch.float32:
        return torch.mm(x, W_chunk.T)
    return torch.mm(x, W_chunk.T, out_dtype=torch.float32)


def _encode_cuda(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k):
    from . import _cuda

    max_k = _cuda.topk_max_k()
    if k > max_k:  # beyond the select kernel's sort (module docstring)
        return _encode_torch(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k)
    rows, n = x.shape[0], W_enc.shape[0]
    fused_aux = aux_k if aux_k <= max_k else 0
    bias = _cuda_encoder_bias(W_enc, b_enc, b_dec)
    state = _cuda.select_state(rows, k, x.device)
    aux_state = _cuda.select_state(rows, fused_aux, x.device) if fused_aux else None
    dead = dead_mask.view(torch.uint8) if fused_aux else None
    cols = cuda_chunk_columns(rows, n)
    for c0 in range(0, n, cols):
        scores = _cuda_chunk_scores(x, W_enc[c0 : c0 + cols])
        _cuda.topk_select(scores, state, col0=c0, bias=bias, relu=True, dead_mask=dead, aux_state=aux_state)
    values = new_output((rows, k), x.dtype, x.device)
    indices = new_output((rows, k), torch.int32, x.device)
    _cuda.topk_finish(state, values, indices)
    aux_values = new_output((rows, aux_k), x.dtype, x.device)
    aux_indices = new_output((rows, aux_k), torch.int32, x.device)
    if fused_aux:
        _cuda.topk_finish(aux_state, aux_values, aux_indices)
    elif aux_k:
        _aux_over_dead_latents(x, W_enc, b_enc, b_dec, dead_mask, aux_values, aux_indices)
    return values, indices, aux_values, aux_indices


def _backward_torch(d_values, values, indices, x, W_enc, b_dec, need_dx, need_db_dec):
    n = W_enc.shape[0]
    d_pre = d_values.to(_common.acc_dtype(x.dtype)) * (values > 0)
    dW_enc, db_enc = _sparse_rows.scatter_rows(d_pre, indices, x, n, offset=b_dec)
    dx = _sparse_rows.gather_rows(d_pre, indices, W_enc) if need_dx else x.new_empty(0)
    db_dec = -(db_enc @ W_enc.to(db_enc.dtype)) if need_db_dec else x.new_empty(0)
    return dW_enc.to(W_enc.dtype), db_enc.to(W_enc.dtype), dx.to(x.dtype), db_dec.to(x.dtype)


def _backward_cpu(d_values, values, indices, x, W_enc, b_dec, need_dx, need_db_dec, dW_out=None):
    """dW_out: where dW_enc goes ([n, d], e.g. an eager chunk's reused buffer); None: a new tensor."""
    rows, d = x.shape
    n = W_enc.shape[0]
    k = values.shape[1]
    dW_enc = recycled_output((n, d), W_enc.dtype, x.device) if dW_out is None else dW_out
    db_enc = new_output((n,), W_enc.dtype, x.device)
    dx = new_output((rows, d) if need_dx else (0,), x.dtype, x.device)
    db_dec = new_output((d,) if need_db_dec else (0,), x.dtype, x.device)
    _C.topk_encode_backward(
        d_values=addr(d_values), values=addr(values), indices=addr(indices), rows=rows, k=k, x=addr(x),
        b_dec=addr(b_dec), W_enc=addr(W_enc), n_latents=n, d=d, dW_enc=addr(dW_enc), db_enc=addr(db_enc),
        dx=addr(dx) if need_dx else 0, db_dec=addr(db_dec) if need_db_dec else 0, dtype=dtype_code(x),
    )  # fmt: skip
    return dW_enc, db_enc, dx, db_dec


def _backward_gpu(backend, d_values, values, indices, x, W_enc, b_dec, need_dx, need_db_dec):
    """triton / cuda: dW_enc and db_enc by scatter_rows over the slots, dx by gather_rows; the gate
    applies d_pre = d_values * [values > 0] inside the kernels."""
    rows_kernels = _sparse_rows.row_kernels(backend)
    dW_enc = new_output(W_enc.shape, W_enc.dtype, x.device)
    db_enc = new_output((W_enc.shape[0],), W_enc.dtype, x.device)
    rows_kernels.scatter_rows(d_values, indices, x, dW_enc, gate=values, offset=b_dec, coef_sum=db_enc)
    dx, db_dec = x.new_empty(0), x.new_empty(0)
    if need_dx or need_db_dec:
        # fp32 dx, so that db_dec = -sum_b dx[b] is summed before rounding to x's dtype; the indices
        # came from the forward (in range), so the flag is not read back
        dx32 = new_output(x.shape, torch.float32, x.device)
        rows_kernels.gather_rows(d_values, indices, W_enc, dx32, _sparse_rows.new_flag(x.device), gate=values)
        if need_dx:
            dx = dx32 if x.dtype == torch.float32 else dx32.to(x.dtype)
        if need_db_dec:
            db_dec = dx32.sum(0).neg_().to(x.dtype)
    return dW_enc, db_enc, dx, db_dec


def _every_precision_exact(encode):
    """A backend without a low-precision candidate pass: it computes every precision exactly
    (certified's results are exact's by definition; fast promises no more)."""

    def run(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision):
        return encode(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k)

    return run


DISPATCH = _backend.register(
    {
        "topk_encode": {
            "cpu": _encode_cpu,
            "cuda": _every_precision_exact(_encode_cuda),
            "triton": _every_precision_exact(_encode_triton),
            "torch": _every_precision_exact(_encode_torch),
        },
        "topk_encode_backward": {
            "cpu": _backward_cpu,
            "cuda": partial(_backward_gpu, "cuda"),
            "triton": partial(_backward_gpu, "triton"),
            "torch": _backward_torch,
        },
    }
)


def _forward(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, backend, precision):
    run = _backend.dispatch("topk_encode", x.device, backend, x.dtype)
    check_finite("x", x)
    return run(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision)


def _backward(d_values, values, indices, x, W_enc, b_dec, need_dx, need_db_dec, backend):
    run = _backend.dispatch("topk_encode_backward", x.device, backend, x.dtype)
    return run(d_values, values, indices, x, W_enc, b_dec, need_dx, need_db_dec)


# ------------------------------------------------------------------------------------ torch.library


@torch.library.custom_op("flashsae::topk_encode", mutates_args=())
def _topk_encode_op(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    k: int,
    dead_mask: torch.Tensor | None,
    aux_k: int,
    backend: str,
    precision: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, backend, precision)


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, backend, precision="exact"):
    rows = x.shape[0]
    return (
        x.new_empty(rows, k),
        x.new_empty(rows, k, dtype=torch.int32),
        x.new_empty(rows, aux_k),
        x.new_empty(rows, aux_k, dtype=torch.int32),
    )


@torch.library.custom_op("flashsae::topk_encode_backward", mutates_args=())
def _topk_encode_backward_op(
    d_values: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    need_dx: bool,
    need_db_dec: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(d_values, values, indices, x, W_enc, b_dec, need_dx, need_db_dec, backend)


@_topk_encode_backward_op.register_fake
def _(d_values, values, indices, x, W_enc, b_dec, need_dx, need_db_dec, backend):
    return (
        W_enc.new_empty(W_enc.shape),
        W_enc.new_empty(W_enc.shape[0]),
        x.new_empty(x.shape if need_dx else (0,)),
        x.new_empty(x.shape[1] if need_db_dec else 0),
    )


def _setup_context(ctx, inputs, output):
    x, W_enc, _b_enc, b_dec, _k, _dead_mask, aux_k, backend, _precision = inputs
    values, indices, aux_values, aux_indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_values, aux_indices)
    ctx.aux_k = aux_k
    ctx.backend = backend
    ctx.row_grads = _row_grads.row_grads_of(inputs[1])  # opt-in row-sparse dW_enc (see ops/_row_grads.py)


def _autograd_backward(ctx, d_values, _d_indices, d_aux_values, _d_aux_indices):
    x, W_enc, b_dec, values, indices, aux_values, aux_indices = ctx.saved_tensors
    need_x, need_W_enc, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
    need_b_dec = need_b_dec and b_dec is not None
    if d_values is None:
        d_values = torch.zeros_like(values)
    if ctx.aux_k:
        # main and aux slots share one sparse backward
        if d_aux_values is None:
            d_aux_values = torch.zeros_like(aux_values)
        d_values = torch.cat([d_values, d_aux_values], dim=1)
        values = torch.cat([values, aux_values], dim=1)
        indices = torch.cat([indices, aux_indices], dim=1)
    if need_W_enc and _row_grads.eager(ctx.row_grads):
        dx, db_enc, db_dec = _eager_backward(
            d_values.contiguous(), values, indices, x, W_enc, b_dec, need_x, need_b_dec, ctx
        )
        return (
            dx if need_x else None, None, db_enc if need_b_enc else None, db_dec if need_b_dec else None,
            None, None, None, None, None,
        )  # fmt: skip
    # with a collector on W_enc: the same backward on the touched rows only, dW_enc [m, d] to it
    compact = _row_grads.compact_rows(ctx.row_grads if need_W_enc else None, indices)
    chunked_db_dec = False
    if compact is not None:
        full_W_enc = W_enc
        (indices,) = compact.indices
        if need_x:  # dx reads every touched row of W_enc: gather them
            W_enc = compact.gather(W_enc)
        else:
            # dW_enc needs no W_enc, and db_dec is summed below a chunk of rows at a time: no [m, d]
            # gather (an [m, d]-shaped view of one row stands in; the kernels do not read it)
            W_enc = W_enc[:1].expand(compact.rows.numel(), W_enc.shape[1])
            chunked_db_dec = need_b_dec
    dW_enc, db_enc, dx, db_dec = _functorch.call(
        _topk_encode_backward_op, _TopKEncodeBackward,
        d_values.contiguous(), values, indices, x, W_enc, b_dec, need_x, need_b_dec and not chunked_db_dec, ctx.backend
    )  # fmt: skip
    if compact is not None:
        W_enc = None
        gated = d_values * (values > 0)
        if chunked_db_dec:
            db_dec = _row_grads.encoder_db_dec(gated, indices, compact.rows, full_W_enc).to(x.dtype)
        dW_enc = compact.hand_over(dW_enc, [gated])
        if need_b_enc:
            db_enc = compact.dense_vector(db_enc, full_W_enc.shape[0])
    return (
        dx if need_x else None,
        dW_enc if need_W_enc else None,
        db_enc if need_b_enc else None,
        db_dec if need_b_dec else None,
        None,
        None,
        None,
        None,
        None,
    )


def _eager_backward(d_values, values, indices, x, W_enc, b_dec, need_x, need_b_dec, ctx):
    """The backward a chunk of encoder rows at a time, each chunk's dW_enc handed to the collector's
    consumer (an optimizer updating rows during backward) before the next: the same kernels on
    W_enc[chunk] with the slots remapped into it. db_enc is assembled by chunks; dx and db_dec sum
    the chunks' (each slot contributes in one chunk only)."""
    n = W_enc.shape[0]
    db_enc = torch.empty(n, dtype=W_enc.dtype, device=W_enc.device)
    dx, db_dec = None, None
    gated = d_values * (values > 0)
    flags = _row_grads.contributing_rows(n, [indices], [gated])
    # the cpu kernel writes each chunk's dW_enc into one reused buffer (_row_grads.chunk_buffer)
    cpu = _backend.dispatch("topk_encode_backward", x.device, ctx.backend, x.dtype) is _backward_cpu
    for rows, local in _row_grads.eager_chunks(n, W_enc.shape[1], indices):
        if cpu:
            out = _row_grads.chunk_buffer(rows.stop - rows.start, W_enc.shape[1], W_enc.dtype, W_enc.device)
            dW_chunk, db_chunk, dx_part, db_part = _backward_cpu(
                d_values, values, local, x, W_enc[rows], b_dec, need_x, need_b_dec, dW_out=out
            )
        else:
            dW_chunk, db_chunk, dx_part, db_part = _topk_encode_backward_op(
                d_values, values, local, x, W_enc[rows], b_dec, need_x, need_b_dec, ctx.backend
            )
        db_enc[rows] = db_chunk
        if need_x:
            dx = dx_part if dx is None else dx.add_(dx_part)
        if need_b_dec:
            db_dec = db_part if db_dec is None else db_dec.add_(db_part)
        _row_grads.hand_over_chunk(ctx.row_grads, rows, dW_chunk, flags)
    return dx, db_enc, db_dec


_topk_encode_op.register_autograd(_autograd_backward, setup_context=_setup_context)
# torch.func (see ops/_functorch.py): the public function calls the op through this Function
_TopKEncode = _functorch.autograd_function("_TopKEncode", _topk_encode_op, _setup_context, _autograd_backward)
_functorch.register_vmap(_topk_encode_op, row_args=("x",))
_functorch.register_vmap(_topk_encode_backward_op)
_TopKEncodeBackward = _functorch.backward_function("_TopKEncodeBackward", _topk_encode_backward_op)

# autocast (see ops/_autocast.py): the encoder GEMM reads x and the parameters in the autocast dtype
_autocast.register(torch.ops.flashsae.topk_encode.default, cast=("x", "W_enc", "b_enc", "b_dec"))
_autocast.register(torch.ops.flashsae.topk_encode_backward.default)


# ------------------------------------------------------------------------------------------- public


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
    *,
    dead_mask: torch.Tensor | None = None,
    aux_k: int = 0,
    backend: str | None = None,
    precision: str = "exact",
) -> tuple[torch.Tensor, ...]:
    """Sparse TopK encoding without the dense [batch, n_latents] activations.

    Args:
        x: [batch, d] inputs (float32/float64/bfloat16/float16), finite.
        W_enc: [n_latents, d] encoder, one row per latent; b_enc: [n_latents].
        k: latents kept per row, 1 <= k <= n_latents.
        b_dec: optional [d] bias subtracted from x before encoding (the decoder bias).
        dead_mask: [n_latents] bool, latents eligible for the AuxK selection; needs aux_k > 0.
        aux_k: size of the AuxK selection among dead latents (0: none).
        backend: "auto" (default, or FLASHSAE_BACKEND), "cpu", "cuda", "triton" or "torch".
        precision: how the scores are computed (cpu backend; see PRECISIONS), "auto" being
            "certified" for float32 / float16 operands where torch's bfloat16 GEMM is fast on this
            CPU (_topk_encode_cpu.AUTO_CERTIFIED_BELOW, measured once per process), else "exact":
            "exact" (default): the top-k of the exact scores, values the exact scores rounded to
            x's dtype. On the cpu backend for float32 / bfloat16 / float16 operands "exact" is
            defined by one canonical score (the pre-activation computed with float64 products and
            sums, rounded once to float32; flashsae.ops._topk_encode_cpu) and bfloat16 operands
            get it from the bfloat16 GEMM, certified.
            "certified": the same results as "exact", bit for bit, from bfloat16 GEMM scores: a
            candidate set per row is rescored exactly and a rigorous error bound proves the top-k
            (rows it cannot prove are recomputed; counted by topk_encode_stats()).
            "fast": scores from the bfloat16 GEMM, selected and returned as computed.
            Backends without a low-precision candidate pass (torch, cuda, triton) and float64
            operands compute "certified" and "fast" exactly: certified's results are exact's by
            definition, and fast promises no more than that.

    Returns:
        ``(values, indices)``, each [batch, k]: the top-k of relu(pre-activations) per row sorted
        descending, ties to the lower index; values in x's dtype (selected in float32/float64),
        indices int32. With aux_k > 0, also ``(aux_values, aux_indices)`` [batch, aux_k]; slots
        beyond the number of dead latents hold value 0 and index -1.
        Differentiable in x, W_enc, b_enc and b_dec through the values (sparse backward).

    Under ``torch.autocast(device_type, dtype)``: x, W_enc, b_enc and b_dec are cast to ``dtype``
    (float32/bfloat16/float16 tensors on that device type; float64 stays), so the encoder GEMM reads
    them in ``dtype`` and accumulates and selects in float32; values and aux_values come back in
    ``dtype``; gradients reach each input in its own dtype. See ops/_autocast.py.
    """
    x, W_enc, b_enc, b_dec = _autocast.cast_operands(x, W_enc, b_enc, b_dec)
    check_tensor("W_enc", W_enc, shape={"n_latents": None, "d": None})
    n, d = W_enc.shape
    check_tensor("x", x, shape={"batch": None, "d": d}, like=("W_enc", W_enc))
    check_tensor("b_enc", b_enc, shape={"n_latents": n}, like=("W_enc", W_enc))
    if b_dec is not None:
        check_tensor("b_dec", b_dec, shape={"d": d}, like=("W_enc", W_enc))
    k = check_k("k", k, n)
    aux_k = check_k("aux_k", aux_k, n, allow_zero=True)
    if aux_k and dead_mask is None:
        raise ValueError("dead_mask: required when aux_k > 0 (a [n_latents] bool mask of dead latents)")
    if dead_mask is not None:
        if not aux_k:
            raise ValueError("aux_k: dead_mask was given but aux_k is 0; pass aux_k > 0 for the AuxK selection")
        check_tensor("dead_mask", dead_mask, shape={"n_latents": n}, dtype=torch.bool, like=("W_enc", W_enc))
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    requested = _backend.requested_backend(backend)
    values, indices, aux_values, aux_indices = _functorch.call(
        _topk_encode_op, _TopKEncode, x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, requested, precision
    )
    if aux_k:
        return values, indices, aux_values, aux_indices
    return values, indices


def topk_encode_stats(reset: bool = False) -> _topk_encode_cpu.EncodeStats:
    """Counters of the cpu backend's rescoring since the last reset: forwards that rescored
    (precision "exact" or "certified" on float32 / bfloat16 / float16 operands), their rows, and the
    rows the error bound could not certify and that were recomputed exactly. ``reset=True`` zeroes
    them after reading."""
    return _topk_encode_cpu.stats(reset)
