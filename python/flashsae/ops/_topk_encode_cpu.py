"""The cpu backend of topk_encode: the vendor GEMM per latent chunk, the C++ running top-k, and the
precisions (exact / fast / certified) with their rescoring and error bound.

Per chunk of latents, torch's matmul (oneDNN / MKL: AMX and AVX-512 BF16 tiles for bfloat16
operands) writes the chunk's scores x W_chunk^T, in the GEMM dtype, into one reused [rows, cols]
buffer, and the C++ merge (csrc/cpu/topk_encode.cpp) adds the latent bias, applies relu and keeps a
running top-k per row. [rows, n] never exists. Python owns the GEMM call, C++ the selection.

The exact score. For float32 / bfloat16 / float16 operands every precision returns the canonical
score (csrc/cpu/topk_rescore.cpp)

    S[b, j] = float32( dot64(x[b], W[j]) + c64[j] ),    c64[j] = b_enc[j] - dot64(b_dec, W[j])

where dot64 sums exact float64 products in a fixed order: S is the exact pre-activation rounded once
to float32, up to a float64 summation error (relative d * 2^-53), and does not depend on chunking,
threads or ISA. "exact" returns the top-k of relu(S) (ties to the lower index) with values relu(S)
rounded to x's dtype; so does "certified", bit for bit. float64 operands have no lower precision to
certify against: they run float64 GEMM chunks whose values are returned as computed.

How it is computed (exact and certified are the same algorithm with a different GEMM dtype L):

1. Candidates. The merge keys every latent by an upper bound U[b, j] >= relu(S[b, j]) derived from
   the GEMM's score and keeps the k + margin best per row (also aux_k + margin over the dead latents).
2. Rescoring. The candidates' S are computed exactly (csrc/cpu/topk_rescore.cpp, O(rows (k + margin)
   d)), and sorted by relu(S) descending, index ascending.
3. Certificate. Every latent outside the candidates has U <= T, the smallest key kept (the heap's
   root). If the k-th best relu(S) of the candidates is > T, no other latent can reach or tie it: the
   k returned are the exact top-k. A row whose candidates are all its eligible latents is certified.
4. Rows not certified go through steps 1-3 again, alone, with ESCALATION times the margin; rows that
   still fail at ESCALATION_MAX_MARGIN are recomputed: S for every latent of the row (the same
   rescoring kernel, chunk by chunk) and an exact merge. ``topk_encode_stats()`` counts the rows the
   first pass could not certify.

The bound. Notation: u = 2^-24 (float32), u_L the unit roundoff of the GEMM's output dtype (2^-8 for
bfloat16, 2^-24 for float32), g = (d + 1) u / (1 - (d + 1) u). The GEMM runs on x~ = x rounded to L
and W~ = W rounded to L (exact when the dtypes already agree), with float32 accumulation in any
summation order (oneDNN / MKL; bfloat16 products are exact in float32); its output is rounded to L:
G. The merge computes a = float32(G + c32) with c32 = float32(c64). With Dx = x - x~, DW = W - W~
(|.| the Euclidean norm, Cauchy-Schwarz throughout) and the exact score s = (x - b_dec).W + b_enc:

    |x.W - x~.W~|       <= |Dx| |W~| + |x| |DW|                        (input rounding)
    |G' - x~.W~|        <= g |x~| |W~|                                  (accumulation, G' before rounding)
    |G - G'|            <= u_L |G| <= u_L ((1 + u) |a| + |c32|)          (output rounding)
    |a - (G + c32)|     <= u |a|                                        (bias add)
    |c32 - c_exact|     <= u |c32| + 2^-30 (|b_enc| + |b_dec| |W|)     (c64 in float64, then rounded)
    |S - s|             <= u |S| + 2^-30 (|x| + |b_dec| + 1) |W|        (the canonical rounding)

so with q1 = |W~| + |DW| (>= |W|, |W~|) and q2 = |DW|, per latent, and per row p1 = g (|x| + |Dx|)
+ |Dx| + 2^-30 (|x| + |b_dec| + 1), p2 = |x|, z = 2^-30 (|x| + |b_dec| + 1), and per latent
o = (u_L + 2u) |c32| + 2^-30 (|b_enc| + |b_dec| q1 + 1):

    relu(S) <= relu(a + R |a| + p1 q1 + p2 q2 + z + o) = U,    R = u + u_L (1 + u) + 20 u,

after every term but a is inflated by 2^-16, which covers the float32 evaluation of U itself, the
norms' rounding (computed in float64, rounded up by 2^-20) and the 2u |S| of the last line. The
absolute 2^-30 terms also cover flush-to-zero of subnormals inside the GEMM (at most d 2^-125).
A float32 GEMM under a reduced-precision setting (torch.set_float32_matmul_precision other than
"highest", or mkldnn's fp32_precision set to bf16 / tf32) rounds its inputs to at most bfloat16's 8
bits internally: p1 then gains (2 r + r^2)(1 + g)(|x| + |Dx|) with r = 2^-8.

The margin: at d=768, n=24576, k=32 on random data the bf16 bound is about 0.01 of a standard
deviation of the scores at the k-th place (x and W already bf16), about 0.2 with x and W rounded from
float32 (the Cauchy-Schwarz input-rounding terms dominate); the k-th and (k + margin)-th scores of a
row are further apart than twice the bound in all but a few rows with CERTIFY_MARGIN's margins.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from .._native import _C, DTYPE_CODES, addr, new_output

PRECISIONS = ("exact", "fast", "certified")

#: "auto" chooses "certified" for float32 / float16 operands when torch's bfloat16 GEMM takes at most
#: this share of its float32 GEMM's time on this CPU, else "exact" (results are the same either way).
#: Certified's extra work (W rounded to bfloat16, the candidates' exact rescoring) is ~12-20% of the
#: float32 GEMM, so it wins below ~0.8; the CPUs measured sit far from the line. bf16_gemm_share():
#: 0.34 on a 2-core EPYC (Zen 4, AVX-512 BF16), 2.12 on the same EPYC with oneDNN held to AVX-512
#: without BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE: Skylake / Cascade Lake-class). [1024, 768] x
#: [768, 24576]: 0.25 on the 2-core Xeon with AMX; [1024, 768] x [768, 4096] on the EPYC held to AVX2
#: (Zen 2/3, Haswell-class): 4.5. There "certified" would make a step several times slower.
AUTO_CERTIFIED_BELOW = 0.6


@functools.cache
def bf16_gemm_share() -> float:
    """torch's bfloat16 GEMM time as a share of its float32 GEMM time on this CPU, for a [256, 768] x
    [768, 2048] product (the best of three after a warm-up each; about 50 ms once per process, most of
    it oneDNN building its kernels on the first call); infinity where torch has no bfloat16 GEMM on
    this CPU (then "certified" cannot run, and "auto" is "exact")."""
    x, w = torch.randn(256, 768), torch.randn(2048, 768)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        try:
            torch.mm(a, b.T)
        except RuntimeError:  # e.g. "not implemented for 'BFloat16'" in builds without it
            return float("inf")
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b.T)
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.bfloat16] / best[torch.float32]


def resolve_precision(precision: str, dtype: torch.dtype) -> str:
    """The precision the cpu backend runs for `precision` ("auto" resolved for operands of `dtype`:
    :data:`AUTO_CERTIFIED_BELOW`; bfloat16 operands' "exact" already scores with the bfloat16 GEMM)."""
    if precision != "auto":
        return precision
    if dtype in (torch.float32, torch.float16) and bf16_gemm_share() <= AUTO_CERTIFIED_BELOW:
        return "certified"
    return "exact"

#: Candidates per row beyond k (and beyond aux_k), by whether the GEMM operands had to be rounded to
#: its dtype (float32 parameters under "certified"): enough that the k-th exact score clears the
#: (k + margin)-th key in nearly every row. Rows recomputed at d=768, n=24576, k=32 (random data /
#: the demo's MiniLM layer-3 activations with a fresh SAE): operands already in the GEMM dtype
#: (bfloat16 parameters, or the float32 GEMM): margin 4: 7.6% / 6.8%, 8: 0% / 0%; operands rounded to
#: bfloat16: 16: 26% / 10%, 24: 1.3% / 0.3%, 32: 0% / 0%. Each candidate costs one d-long float64
#: dot in the rescoring.
CERTIFY_MARGIN = {False: 10, True: 32}

#: Rows a pass cannot certify go through another candidate pass (the GEMM over those rows only, the
#: per-latent terms reused) with ESCALATION times the margin, while that margin is at most
#: ESCALATION_MAX_MARGIN; only rows that still fail are rescored over every latent. A TopK SAE trained
#: on one repeated bfloat16 batch (d=768, n=24576, k=32, B=1024) bunches its top scores: the rows the
#: first pass could not certify grew 0, 1, 7, 13, 36, 83, 123, 199 over its first 8 steps, and with
#: each one rescored over all 24576 latents (d float64 products each) the step took 157, 114, 135,
#: 147, 212, 361, 456, 667 ms; with the escalation pass 177, 121, 119, 116, 123, 122, 123, 126 ms
#: (and 149 ms at step 12, 620 rows escalated).
ESCALATION = 4
ESCALATION_MAX_MARGIN = 160

_U32 = 2.0**-24
_OUTPUT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
_INFLATE = 1.0 + 2.0**-16
_TINY = 2.0**-30


@dataclass
class EncodeStats:
    """What the cpu backend's certified rescoring did since the last reset."""

    calls: int = 0
    """topk_encode forwards that rescored candidates (precision "exact" or "certified")."""
    rows: int = 0
    """Rows those calls encoded."""
    recomputed_rows: int = 0
    """Rows the bound could not certify, recomputed exactly (all latents rescored)."""


_stats = EncodeStats()


def stats(reset: bool = False) -> EncodeStats:
    """A copy of the counters; ``reset=True`` zeroes them afterwards."""
    global _stats
    current = EncodeStats(_stats.calls, _stats.rows, _stats.recomputed_rows)
    if reset:
        _stats = EncodeStats()
    return current


#: Test hook: when set, a callable (rows) -> bool tensor of rows to treat as uncertified in addition
#: to those the bound rejects (the recompute path is then exercised on demand).
_force_uncertified = None


def heap_state(rows: int, slots: int, acc: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Running top-k state of the C++ merge: (keys [rows, slots], indices [rows, slots])."""
    if not slots:
        return None, None
    keys = torch.empty(rows, slots, dtype=acc)
    ids = torch.empty(rows, slots, dtype=torch.int32)
    _C.topk_state_init(heap_scores=addr(keys), heap_indices=addr(ids), rows=rows, k=slots, score_dtype=DTYPE_CODES[acc])
    return keys, ids


def finish(heap, heap_ids, rows: int, slots: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (values in `dtype`, int32 indices) of a merged heap state ([rows, 0] when slots == 0)."""
    values = new_output((rows, slots), dtype, torch.device("cpu"))
    indices = new_output((rows, slots), torch.int32, torch.device("cpu"))
    if slots:
        _C.topk_state_finish(
            heap_scores=addr(heap), heap_indices=addr(heap_ids), rows=rows, k=slots,
            score_dtype=DTYPE_CODES[heap.dtype], values=addr(values), indices=addr(indices),
            value_dtype=DTYPE_CODES[dtype],
        )  # fmt: skip
    return values, indices


def gemm_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """The dtype the chunk GEMMs run in: bfloat16 for "fast" / "certified" and for bfloat16 operands
    (whose "exact" results the bf16 GEMM certifies at its own speed), else float32."""
    if precision != "exact" or dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _reduced_precision_float32_matmul() -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return True
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") not in ("none", "ieee")


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Row norms in float64, rounded up by 2^-20 (the float64 sum is within d 2^-53 of exact). The
    dtype argument casts inside the reduction: no float64 copy of t (with the float32 residual below,
    the row terms of a [1024, 768] float32 x took 1.2 ms instead of 5.9)."""
    return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float64) * (1.0 + 2.0**-20)


def _residual(x: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
    """x - x_low exactly: in float32 for float32 x (x_low is x rounded to fewer bits, so the
    difference is a multiple of x's last place below 2^16 of them: representable), else in float64."""
    if x.dtype == torch.float32:
        return x - x_low.float()
    return x.double() - x_low.double()


def _row_terms(x, x_low, b_dec, low, d):
    """(row_bound [3, rows] float32: p1, p2, z; rel) of the module docstring's bound."""
    u_out = _OUTPUT_ROUNDOFF[low]
    g = (d + 1) * _U32 / (1 - (d + 1) * _U32)
    nx = _norms(x)
    ndx = _norms(_residual(x, x_low)) if x_low.dtype != x.dtype else torch.zeros_like(nx)
    nb = float(_norms(b_dec)) if b_dec is not None else 0.0
    tiny = _TINY * (nx + nb + 1.0)
    p1 = g * (nx + ndx) + ndx + tiny
    if low == torch.float32 and _reduced_precision_float32_matmul():
        r = 2.0**-8
        p1 = p1 + (2 * r + r * r) * (1 + g) * (nx + ndx)
    row_bound = (torch.stack([p1, nx, tiny]) * _INFLATE).float()
    rel = (_U32 + u_out * (1 + _U32)) * _INFLATE + 20 * _U32
    return row_bound, rel, nb


def _chunk_offsets(col_bound, bias32, b_enc, nb, low, c0, c1):
    """o = (u_L + 2u) |c32| + 2^-30 (|b_enc| + |b_dec| q1 + 1), inflated, for latents c0 .. c1."""
    c32 = bias32[c0:c1].double().abs()
    q1 = col_bound[0, c0:c1].double()
    o = (_OUTPUT_ROUNDOFF[low] + 2 * _U32) * c32 + _TINY * (b_enc[c0:c1].double().abs() + nb * q1 + 1.0)
    col_bound[2, c0:c1] = o * _INFLATE


def encode(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision, cols):
    """topk_encode's cpu forward for float32 / bfloat16 / float16 operands (module docstring).
    `cols`: latents per GEMM chunk."""
    return _encode(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision, cols, None, None)


def _encode(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision, cols, margin, latent):
    """One candidate pass. margin: candidates per row beyond k (None: CERTIFY_MARGIN's). latent: None
    on the first pass (the per-latent terms are computed chunk by chunk beside the GEMM), else the
    (bias64, bias32, col_bound) of the first pass: an escalation pass over the rows it could not
    certify, with the same parameters."""
    rows, d = x.shape
    n = W_enc.shape[0]
    low = gemm_dtype(x.dtype, precision)
    certify = precision != "fast"
    if margin is None:
        margin = CERTIFY_MARGIN[x.dtype != low or W_enc.dtype != low] if certify else 0
    slots = min(n, k + margin)
    aux_slots = min(n, aux_k + margin) if aux_k else 0
    code32 = DTYPE_CODES[torch.float32]
    x_low = x if x.dtype == low else x.to(low)
    copy_W = W_enc.dtype != low
    scores = torch.empty(rows, cols, dtype=low)
    W_low = torch.empty(cols, d, dtype=low) if copy_W else None
    first = latent is None
    if first:
        bias64 = torch.empty(n, dtype=torch.float64)
        bias32 = torch.empty(n, dtype=torch.float32)
        col_bound = torch.zeros(3, n, dtype=torch.float32)
    else:
        bias64, bias32, col_bound = latent
    row_bound, rel, nb = _row_terms(x, x_low, b_dec, low, d) if certify else (None, 0.0, 0.0)
    (heap, heap_ids), (aux, aux_ids) = heap_state(rows, slots, torch.float32), heap_state(rows, aux_slots, torch.float32)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        if first:
            _C.encoder_latent_stats(
                W=addr(W_enc[c0:c1]), b_enc=addr(b_enc[c0:c1]), b_dec=addr(b_dec), n_latents=c1 - c0, d=d,
                dtype=DTYPE_CODES[W_enc.dtype], bias64=addr(bias64[c0:c1]), q1=addr(col_bound[0, c0:c1]),
                q2=addr(col_bound[1, c0:c1]), W_low=addr(W_low), low_dtype=DTYPE_CODES[low],
            )  # fmt: skip
            bias32[c0:c1] = bias64[c0:c1]
            if certify:
                _chunk_offsets(col_bound, bias32, b_enc, nb, low, c0, c1)
        elif copy_W:
            W_low[: c1 - c0].copy_(W_enc[c0:c1])  # round to nearest even, as encoder_latent_stats rounds
        W_chunk = W_low[: c1 - c0] if copy_W else W_enc[c0:c1]
        torch.mm(x_low, W_chunk.T, out=scores[:, : c1 - c0])  # writes the strided view: row stride `cols`
        _C.topk_state_merge(
            scores=addr(scores), ld=cols, rows=rows, cols=c1 - c0, col0=c0, n_latents=n, heap_scores=addr(heap),
            heap_indices=addr(heap_ids), k=slots, dead_mask=addr(dead_mask), aux_scores=addr(aux),
            aux_indices=addr(aux_ids), aux_k=aux_slots, score_dtype=code32, chunk_dtype=DTYPE_CODES[low],
            bias=addr(bias32), row_bound=addr(row_bound), col_bound=addr(col_bound) if certify else 0, rel=rel,
        )  # fmt: skip
    if not certify:
        return (*finish(heap, heap_ids, rows, k, x.dtype), *finish(aux, aux_ids, rows, aux_k, x.dtype))
    values, indices, certified = _certified_top(x, W_enc, bias64, heap, heap_ids, k, n, None)
    aux_values, aux_indices = finish(None, None, rows, 0, x.dtype)
    if aux_k:
        n_dead = int(dead_mask.sum())
        aux_values, aux_indices, aux_certified = _certified_top(x, W_enc, bias64, aux, aux_ids, aux_k, n_dead, dead_mask)
        certified &= aux_certified
    if _force_uncertified is not None:
        certified &= ~_force_uncertified(rows)
    redo = (~certified).nonzero().squeeze(1)
    if first:
        _stats.calls += 1
        _stats.rows += rows
        _stats.recomputed_rows += redo.numel()
    if redo.numel():
        if margin * ESCALATION <= ESCALATION_MAX_MARGIN and slots < n:
            exact = _encode(
                x[redo], W_enc, b_enc, b_dec, k, dead_mask, aux_k, precision, cols, margin * ESCALATION,
                (bias64, bias32, col_bound),
            )  # fmt: skip
        else:
            exact = _recompute_rows(x[redo], W_enc, bias64, k, dead_mask, aux_k, cols)
        for out, part in zip((values, indices, aux_values, aux_indices), exact, strict=True):
            out[redo] = part
    return values, indices, aux_values, aux_indices


def _certified_top(x, W_enc, bias64, heap, heap_ids, k, eligible, eligible_mask):
    """(values [rows, k] in x's dtype, int32 indices, certified [rows] bool) from a candidate heap:
    the candidates rescored exactly, sorted, and the certificate of the module docstring (with its
    zero-tie case, :func:`_fill_zero_ties`). eligible_mask: bool [n] of the latents that may be
    selected (the dead ones for AuxK), None for all."""
    rows, slots = heap_ids.shape
    n, d = W_enc.shape
    exact = torch.empty(rows, slots, dtype=torch.float32)
    _C.topk_rescore(
        x=addr(x), W=addr(W_enc), bias64=addr(bias64), indices=addr(heap_ids), idx_ld=slots, rows=rows, m=slots,
        n_latents=n, d=d, dtype=DTYPE_CODES[x.dtype], out=addr(exact),
    )  # fmt: skip
    # sorted by relu(S) descending, index ascending (the C++ finish); empty slots (-inf -> 0, index
    # INT32_MAX) come after every real 0 and leave as (0, -1)
    top, top_ids = finish(exact.clamp_min_(0.0), heap_ids, rows, slots, torch.float32)
    if slots >= eligible:  # every eligible latent is a candidate
        certified = torch.ones(rows, dtype=torch.bool)
    else:
        certified = top[:, k - 1] > heap[:, 0]
        _fill_zero_ties(top, top_ids, heap, certified, k, eligible_mask, W_enc.shape[0])
    return top[:, :k].to(x.dtype).contiguous(), top_ids[:, :k].contiguous(), certified


def _fill_zero_ties(top, top_ids, heap, certified, k, eligible_mask, n) -> None:
    """Certifies, in place, the rows whose k-th value is 0 and whose heap root T is 0: every latent
    outside the candidates then has relu(S) <= T = 0, so the exact top-k is the row's positive
    candidates (sorted already) followed by the lowest-index eligible latents among the rest (the
    tie rule at value 0). Without this such rows were recomputed over every latent: AuxK over a few
    hundred dead latents, fewer than aux_k of them positive, recomputed every row (3072 latents, 317
    dead, aux_k = 192, B = 1024 on 2 busy cores: 707 ms per encode, 572 ms with this)."""
    rows = (~certified & (top[:, k - 1] == 0) & (heap[:, 0] <= 0)).nonzero().squeeze(1)
    if not rows.numel():
        return
    if eligible_mask is None:
        latents = torch.arange(min(n, 2 * k), dtype=torch.int64)
    else:
        latents = eligible_mask.nonzero().squeeze(1)[: 2 * k]
    # the k - p free latents needed lie among the first k + p <= 2k eligible ones (p positives < k)
    m = latents.numel()
    ids = top_ids[rows, :k].long()
    positive = top[rows, :k] > 0
    need = k - positive.sum(1)
    position = torch.searchsorted(latents, ids).clamp_max(m - 1)
    hit = positive & (latents[position] == ids)
    taken = torch.zeros(rows.numel(), m + 1, dtype=torch.bool)
    taken.scatter_(1, torch.where(hit, position, m), True)
    free = ~taken[:, :m]
    rank = free.cumsum(1)  # 1-based among the free latents
    # the r-th free latent goes to slot k - need + r - 1 (the zero-valued slots, in index order);
    # the others to a spare column k (scatter, no boolean gathers: those cost ~100 ms here)
    target = torch.where(free & (rank <= need.unsqueeze(1)), rank + (k - need - 1).unsqueeze(1), k)
    zeros = torch.empty(rows.numel(), k + 1, dtype=torch.int64).scatter_(1, target, latents.expand(rows.numel(), m))
    slots = torch.arange(k).unsqueeze(0) >= (k - need).unsqueeze(1)
    top_ids[rows, :k] = torch.where(slots, zeros[:, :k], ids).to(torch.int32)  # values there are 0 already
    certified[rows] = True


def _recompute_rows(x, W_enc, bias64, k, dead_mask, aux_k, cols):
    """The exact top-k (and aux top-k) of relu(S) over every latent, for the rows of x."""
    rows, d = x.shape
    n = W_enc.shape[0]
    code32 = DTYPE_CODES[torch.float32]
    (heap, heap_ids), (aux, aux_ids) = heap_state(rows, k, torch.float32), heap_state(rows, aux_k, torch.float32)
    latents = torch.arange(n, dtype=torch.int32)
    exact = torch.empty(rows, cols, dtype=torch.float32)
    x = x.contiguous()
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        _C.topk_rescore(
            x=addr(x), W=addr(W_enc), bias64=addr(bias64), indices=addr(latents[c0:c1]), idx_ld=0, rows=rows,
            m=c1 - c0, n_latents=n, d=d, dtype=DTYPE_CODES[x.dtype], out=addr(exact),
        )  # fmt: skip
        _C.topk_state_merge(
            scores=addr(exact), ld=c1 - c0, rows=rows, cols=c1 - c0, col0=c0, n_latents=n, heap_scores=addr(heap),
            heap_indices=addr(heap_ids), k=k, dead_mask=addr(dead_mask), aux_scores=addr(aux),
            aux_indices=addr(aux_ids), aux_k=aux_k, score_dtype=code32, chunk_dtype=code32, bias=0, row_bound=0,
            col_bound=0, rel=0.0,
        )  # fmt: skip
    return (*finish(heap, heap_ids, rows, k, x.dtype), *finish(aux, aux_ids, rows, aux_k, x.dtype))


def encode_float64(x, W_enc, b_enc, b_dec, k, dead_mask, aux_k, cols):
    """float64 operands: float64 GEMM chunks of the centered x, b_enc added in the merge, values as
    computed (every precision: there is no lower precision to certify against)."""
    rows = x.shape[0]
    n = W_enc.shape[0]
    code = DTYPE_CODES[torch.float64]
    centered = x if b_dec is None else x - b_dec
    buffer = torch.empty(rows, cols, dtype=torch.float64)
    (heap, heap_ids), (aux, aux_ids) = heap_state(rows, k, torch.float64), heap_state(rows, aux_k, torch.float64)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        torch.mm(centered, W_enc[c0:c1].T, out=buffer[:, : c1 - c0])
        _C.topk_state_merge(
            scores=addr(buffer), ld=cols, rows=rows, cols=c1 - c0, col0=c0, n_latents=n, heap_scores=addr(heap),
            heap_indices=addr(heap_ids), k=k, dead_mask=addr(dead_mask), aux_scores=addr(aux),
            aux_indices=addr(aux_ids), aux_k=aux_k, score_dtype=code, chunk_dtype=code, bias=addr(b_enc),
            row_bound=0, col_bound=0, rel=0.0,
        )  # fmt: skip
    return (*finish(heap, heap_ids, rows, k, x.dtype), *finish(aux, aux_ids, rows, aux_k, x.dtype))

