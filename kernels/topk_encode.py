"""Fused encoder + top-k: per row, the top-k of relu((x - b_dec) W_enc^T + b_enc), never writing [B, n].

Three launches:

1. ``_encoder_bias_kernel``: c[i] = b_enc[i] - b_dec . W_enc[i] in fp32, so the GEMM runs on x
   itself: (x - b_dec) W^T + b_enc = x W^T + c. One read of W_enc: at an H200's 4.3 TB/s and
   790 TFLOP/s bf16, ~4.5% of the GEMM's time at B=4096, ~1% at B=16384.
   Rounding x - b_dec to bf16 before a bf16 tensor-core dot would lose precision exactly where
   LLM activations have large means; this way the dot sees x as stored and c is fp32.
2. ``_encode_topk_kernel``: program (row block, chunk of latents). For each [BLOCK_B, BLOCK_N]
   tile of its chunk it runs the tl.dot loop over d (fp32 accumulator) and merges the tile into a
   running per-row top-S state held in registers. Each candidate is one int64 key,
   ``(fp32 bits of relu(pre)) << 32 | (2^32 - 1 - latent)``: relu values are >= +0, whose bit
   patterns order like the floats, so one integer comparison orders by value and breaks exact ties
   toward the lower latent (the reference's stable sort). Key 0 means "no candidate".
   A tile merge is one of two exact procedures, chosen per tile by how many keys beat the row's
   current k-th key (the threshold), in the worst row of the block:
     - none: nothing to do;
     - a few (<= INSERT_MAX): insert them one by one: replace the state's last key with the row's
       best remaining tile key, which leaves a bitonic sequence, and restore order with one
       bitonic merge (log2 S compare-exchange stages);
     - many (the first tiles of a chunk): sort the tile (bitonic network), keep its top S in
       ascending order, take max(state, tile) elementwise (the top S of both, as a bitonic
       sequence) and bitonic-merge.
   Once a row's state has seen t latents, a new latent enters its top k with probability ~k / t,
   so after the first tiles most merges are insertions or nothing.
   The chunk's state (top-S keys per row, sorted) goes to a [B, chunks, S] int64 buffer:
   O(B * S * chunks) memory, with chunks chosen just large enough for 2 programs per SM
   (2 chunks at B=16384 on an H200's 132 SMs with 64-row blocks, 5 at B=4096).
3. ``_topk_finish_kernel``: merges the chunks' sorted lists per row (bitonic merges again) and
   writes values (in the output dtype) and int32 indices; an empty key gives value 0, index -1
   (AuxK slots beyond the number of dead latents).

The AuxK selection keeps a second state fed with the same tile, keys of live latents zeroed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, dot_precision, log2, next_pow2, sm_count

#: Smallest state width: keeps every reshape in the bitonic network 2-D and >= 16 wide.
MIN_STATE = 16

#: Worst-row count of keys above the threshold up to which a tile is inserted key by key rather
#: than sorted. Cost per row in compare-exchange units, BLOCK_N = S = 128: sort + merge ~35 x 128,
#: one insertion ~10 x 128, so insertion wins up to ~3 keys. Tests override it to drive each path.
INSERT_MAX = 2

#: Latent chunks per row block; None = enough programs for 2 per SM (1 under the interpreter).
CHUNKS: int | None = None


class EncodeConfig(NamedTuple):
    block_b: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def encode_config(dtype: torch.dtype, B: int, n: int, d: int, state: int) -> EncodeConfig:
    """Block sizes of the fused kernel for a state of `state` keys per row (the wider of the main and
    the fused aux state).

    GPU (sm_80 / sm_90), sized so that ptxas fits the program in 255 registers per thread with 8
    warps: the fp32 accumulator, the int64 tile keys, their sorting network and the states all live
    in registers. sm_90a, ptxas of triton 3.9: bf16, S = 64 with a 64-key aux state at 64 x 64
    tiles: 247 registers, no spill (triton 3.6: 255, no spill; sm_80: 88 bytes of spill); fp32,
    S = 128 at 32 x 128: 178 registers, 8 bytes; bf16 S = 128 with a 128-key aux state: 128 bytes;
    S = 256 at 16 x 128: 24 bytes. K steps of 64 (16-bit) or 32 (fp32) elements, 3 pipelined
    stages. To be tuned on the H200 (``config=`` takes any EncodeConfig).
    Interpreter: each tl.max / tl.min / tl.sum is a device-function call costing ~1 ms there, so
    blocks are as large as the inputs allow (64 x 128) and there are few tiles.
    """
    if INTERPRETED:
        return EncodeConfig(
            min(64, max(16, next_pow2(B))), min(128, max(16, next_pow2(n))), min(128, max(16, next_pow2(d))), 1, 1
        )
    block_d = 32 if dtype == torch.float32 else 64
    if state <= 64:
        return EncodeConfig(64, 64, block_d, 8, 3)
    return EncodeConfig(32 if state <= 128 else 16, 128, block_d, 8, 3)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _encoder_bias_kernel(
    W_ptr, b_enc_ptr, b_dec_ptr, out_ptr, n, d,
    HAS_B_DEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    latents = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lmask = latents < n
    c = tl.load(b_enc_ptr + latents, mask=lmask, other=0.0).to(tl.float32)
    if HAS_B_DEC:
        w_rows = W_ptr + latents.to(tl.int64) * d
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            w = tl.load(w_rows[:, None] + cols[None, :], mask=lmask[:, None] & cmask[None, :], other=0.0)
            b = tl.load(b_dec_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            dot += tl.sum(w.to(tl.float32) * b[None, :], axis=1)
        c -= dot
    tl.store(out_ptr + latents, c, mask=lmask)


# Bitonic networks over a row-major [ROWS, S] block reshaped to a [2] * log2(ROWS * S) hypercube:
# keys 2^t apart within a row are the two ends of hypercube axis N_DIMS - 1 - t. One compare-exchange
# stage takes the pair's max and min with size-2 reductions along that axis and puts them in order.
# (tl.sort swaps with xor_sum, which the CPU interpreter runs element by element in Python; max/min
# are numpy reductions there. The stages are written inline rather than as a jit helper per stage
# because the interpreter re-patches triton.language on every device-function call, ~1 ms each.)


@triton.jit
def _bitonic_merge_desc(x, ROWS: tl.constexpr, LOG_ROWS: tl.constexpr, S: tl.constexpr, LOG_S: tl.constexpr):
    """Sorts each row of x [ROWS, S] descending, given bitonic rows (e.g. decreasing, then
    increasing): LOG_S compare-exchange stages."""
    h = tl.reshape(x, [2] * (LOG_ROWS + LOG_S))
    for i in tl.static_range(LOG_S):
        # stride 2^(LOG_S - 1 - i): hypercube axis LOG_ROWS + i; the larger key goes first
        right = tl.reshape(tl.arange(0, 2), [1] * (LOG_ROWS + i) + [2] + [1] * (LOG_S - 1 - i))
        h = tl.where(right == 1, tl.min(h, LOG_ROWS + i, keep_dims=True), tl.max(h, LOG_ROWS + i, keep_dims=True))
    return tl.reshape(h, [ROWS, S])


@triton.jit
def _merge_tile(
    state, keys, kth,
    ROWS: tl.constexpr, LOG_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, LOG_BLOCK_N: tl.constexpr,
    S: tl.constexpr, LOG_S: tl.constexpr, INSERT_MAX: tl.constexpr,
):  # fmt: skip
    """Merges a tile of keys [ROWS, BLOCK_N] into the descending state [ROWS, S]. Afterwards
    state[:, :kth + 1] is the exact top of every key seen; later entries are real keys but not
    necessarily the next best (which is all the chunk merge needs)."""
    N_DIMS: tl.constexpr = LOG_ROWS + LOG_BLOCK_N
    slots = tl.arange(0, S)[None, :]
    threshold = tl.sum(tl.where(slots == kth, state, 0), axis=1)
    most = tl.max(tl.sum((keys > threshold[:, None]).to(tl.int32), axis=1), axis=0)
    if most > INSERT_MAX:
        # bitonic sort of the tile rows, ascending: runs of 2^stage keys alternate direction
        # (bit `stage` of the position) until the last stage
        h = tl.reshape(keys, [2] * N_DIMS)
        for stage in tl.static_range(1, LOG_BLOCK_N + 1):
            if stage < LOG_BLOCK_N:
                flip = 1 - tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - stage) + [2] + [1] * stage)
            else:
                flip = 1
            for i in tl.static_range(stage):
                right = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - stage + i) + [2] + [1] * (stage - 1 - i))
                h = tl.where(
                    (right ^ flip) == 1,
                    tl.min(h, N_DIMS - stage + i, keep_dims=True),
                    tl.max(h, N_DIMS - stage + i, keep_dims=True),
                )
        tile = tl.reshape(h, [ROWS, BLOCK_N])
        if BLOCK_N > S:  # keep the last (largest) S keys of each row
            groups = tl.reshape(tile, [ROWS, BLOCK_N // S, S])
            last_group = tl.arange(0, BLOCK_N // S)[None, :, None] == BLOCK_N // S - 1
            tile = tl.max(tl.where(last_group, groups, 0), axis=1)
        elif BLOCK_N < S:  # prepend zero keys: join + transpose doubles the width, zeros first
            for _ in tl.static_range(LOG_S - LOG_BLOCK_N):
                tile = tl.reshape(tl.permute(tl.join(tl.zeros_like(tile), tile), (0, 2, 1)), [ROWS, 2 * tile.shape[1]])
        # descending state vs ascending tile: the elementwise max holds the top S of both, bitonic
        state = _bitonic_merge_desc(tl.maximum(state, tile), ROWS, LOG_ROWS, S, LOG_S)
    else:
        for _ in range(most):
            # the row's best remaining key replaces the state's last key (a bitonic row), then merge
            best = tl.max(keys, axis=1)
            take = best > tl.sum(tl.where(slots == kth, state, 0), axis=1)
            state = tl.where((slots == S - 1) & take[:, None], best[:, None], state)
            keys = tl.where(keys == best[:, None], 0, keys)
            state = _bitonic_merge_desc(state, ROWS, LOG_ROWS, S, LOG_S)
    return state


@triton.jit
def _encode_topk_kernel(
    x_ptr, W_ptr, c_ptr, dead_ptr, cand_ptr, aux_cand_ptr,
    B, n, d, k, aux_k, n_row_blocks, tiles_per_chunk, n_chunks,
    HAS_AUX: tl.constexpr, S: tl.constexpr, LOG_S: tl.constexpr, AUX_S: tl.constexpr, LOG_AUX_S: tl.constexpr,
    BLOCK_B: tl.constexpr, LOG_BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, LOG_BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INSERT_MAX: tl.constexpr,
):  # fmt: skip
    # row blocks vary fastest, so programs running together scan the same W_enc tiles (L2 reuse)
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    chunk = pid // n_row_blocks
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    x_rows = x_ptr + rows.to(tl.int64) * d
    n_tiles = tl.cdiv(n, BLOCK_N)
    first_tile = chunk * tiles_per_chunk
    end_tile = tl.minimum(first_tile + tiles_per_chunk, n_tiles)

    state = tl.zeros([BLOCK_B, S], dtype=tl.int64)
    aux_state = tl.zeros([BLOCK_B, AUX_S], dtype=tl.int64)
    for tile in range(first_tile, end_tile):
        latents = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        lmask = latents < n
        w_rows = W_ptr + latents.to(tl.int64) * d
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            a = tl.load(x_rows[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            w = tl.load(w_rows[:, None] + cols[None, :], mask=lmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter multiplies bfloat16's raw bits in tl.dot (triton#11584)
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        pre = acc + tl.load(c_ptr + latents, mask=lmask, other=0.0)[None, :]
        # relu with NaN and -0.0 mapped to +0.0, so the float bits order like the values
        act = tl.where(pre > 0, pre, 0.0)
        low = 4294967295 - latents.to(tl.int64)
        keys = (act.to(tl.int32, bitcast=True).to(tl.int64) << 32) | low[None, :]
        keys = tl.where(lmask[None, :], keys, 0)
        state = _merge_tile(state, keys, k - 1, BLOCK_B, LOG_BLOCK_B, BLOCK_N, LOG_BLOCK_N, S, LOG_S, INSERT_MAX)
        if HAS_AUX:
            dead = tl.load(dead_ptr + latents, mask=lmask, other=0) != 0
            aux_keys = tl.where(dead[None, :], keys, 0)
            aux_state = _merge_tile(
                aux_state, aux_keys, aux_k - 1, BLOCK_B, LOG_BLOCK_B, BLOCK_N, LOG_BLOCK_N, AUX_S, LOG_AUX_S, INSERT_MAX
            )

    out_rows = (rows.to(tl.int64) * n_chunks + chunk)[:, None]
    tl.store(cand_ptr + out_rows * S + tl.arange(0, S)[None, :], state, mask=rmask[:, None])
    if HAS_AUX:
        tl.store(aux_cand_ptr + out_rows * AUX_S + tl.arange(0, AUX_S)[None, :], aux_state, mask=rmask[:, None])


@triton.jit
def _topk_finish_kernel(
    cand_ptr, values_ptr, indices_ptr, B, n_chunks, k,
    S: tl.constexpr, LOG_S: tl.constexpr, BLOCK_B: tl.constexpr, LOG_BLOCK_B: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    slots = tl.arange(0, S)
    base = cand_ptr + rows.to(tl.int64)[:, None] * n_chunks * S
    state = tl.load(base + slots[None, :], mask=rmask[:, None], other=0)
    for chunk in range(1, n_chunks):
        # each chunk list is sorted descending; read it backwards (ascending) for the bitonic merge
        other = tl.load(base + chunk * S + (S - 1 - slots)[None, :], mask=rmask[:, None], other=0)
        state = _bitonic_merge_desc(tl.maximum(state, other), BLOCK_B, LOG_BLOCK_B, S, LOG_S)
    empty = state == 0
    values = (state >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    indices = (4294967295 - (state & 4294967295)).to(tl.int32)
    values = tl.where(empty, 0.0, values)
    indices = tl.where(empty, -1, indices)
    out = rows.to(tl.int64)[:, None] * k + slots[None, :]
    smask = rmask[:, None] & (slots[None, :] < k)
    tl.store(values_ptr + out, values.to(values_ptr.dtype.element_ty), mask=smask)
    tl.store(indices_ptr + out, indices, mask=smask)


# ---------------------------------------------------------------------------------------- launchers


def _state_width(k: int) -> int:
    return max(MIN_STATE, next_pow2(k))


def encoder_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
    """c = b_enc - W_enc b_dec in fp32 [n]."""
    n, d = W_enc.shape
    out = torch.empty(n, dtype=torch.float32, device=W_enc.device)
    # GPU: 32 latents x 64 features per step with 4 warps (~100 registers); a pass over W_enc
    block_n, block_d = (64, min(128, next_pow2(d))) if INTERPRETED else (32, 64)
    _encoder_bias_kernel[(triton.cdiv(n, block_n),)](
        W_enc, b_enc, W_enc if b_dec is None else b_dec, out, n, d,
        HAS_B_DEC=b_dec is not None, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    k: int,
    dead_mask: torch.Tensor | None,
    aux_k: int,
    values: torch.Tensor,
    indices: torch.Tensor,
    aux_values: torch.Tensor,
    aux_indices: torch.Tensor,
    config: EncodeConfig | None = None,
) -> None:
    """Fills values/indices [B, k] (and aux_values/aux_indices [B, aux_k] when aux_k > 0).

    Inputs are validated by the caller: contiguous, same device, float32/bfloat16/float16,
    1 <= k <= n, dead_mask a [n] bool tensor when aux_k > 0."""
    B, d = x.shape
    n = W_enc.shape[0]
    S, aux_S = _state_width(k), _state_width(max(aux_k, 1))
    cfg = config or encode_config(x.dtype, B, n, d, max(S, aux_S if aux_k else 0))
    c = encoder_bias(W_enc, b_enc, b_dec)
    n_row_blocks = triton.cdiv(B, cfg.block_b)
    n_tiles = triton.cdiv(n, cfg.block_n)
    chunks = CHUNKS or max(1, triton.cdiv(2 * sm_count(x.device), n_row_blocks))
    tiles_per_chunk = triton.cdiv(n_tiles, min(chunks, n_tiles))
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    cand = torch.empty(B, n_chunks, S, dtype=torch.int64, device=x.device)
    aux_cand = torch.empty(B, n_chunks, aux_S, dtype=torch.int64, device=x.device) if aux_k else cand
    _encode_topk_kernel[(n_row_blocks * n_chunks,)](
        x, W_enc, c, dead_mask.view(torch.uint8) if aux_k else c, cand, aux_cand,
        B, n, d, k, max(aux_k, 1), n_row_blocks, tiles_per_chunk, n_chunks,
        HAS_AUX=aux_k > 0, S=S, LOG_S=log2(S), AUX_S=aux_S, LOG_AUX_S=log2(aux_S),
        BLOCK_B=cfg.block_b, LOG_BLOCK_B=log2(cfg.block_b), BLOCK_N=cfg.block_n, LOG_BLOCK_N=log2(cfg.block_n),
        BLOCK_D=cfg.block_d,
        PRECISION=dot_precision(x.dtype), UPCAST_DOT=INTERPRETED and x.dtype == torch.bfloat16,
        INSERT_MAX=INSERT_MAX, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    for buffer, width, slots, vals, idx in (
        (cand, S, k, values, indices),
        (aux_cand, aux_S, aux_k, aux_values, aux_indices),
    ):
        if not slots:
            continue
        # GPU: 32 rows of a 64-key state (~150 registers with 4 warps), 16 rows from 128 keys on
        block_b = min(64, max(16, next_pow2(B))) if INTERPRETED else 32 if width <= 64 else 16
        _topk_finish_kernel[(triton.cdiv(B, block_b),)](
            buffer, vals, idx, B, n_chunks, slots,
            S=width, LOG_S=log2(width), BLOCK_B=block_b, LOG_BLOCK_B=log2(block_b), num_warps=4,
        )  # fmt: skip
