"""sparse_rows in Triton: the three row kernels behind sparse_decode and the backward passes of
topk_encode and sae_loss (the same primitives as flashsae.ops._sparse_rows, under the same names).

Each is O(rows * k * d) memory traffic, with fp32 accumulation for every input dtype:

- ``_gather_rows_kernel`` (decoder forward; dx of the encoder): program = BLOCK_R rows x BLOCK_D
  features, a [BLOCK_R, BLOCK_K, BLOCK_D] gather of M rows per step over the k slots. Each selected
  row segment is contiguous (one latent's row), so loads coalesce along d.
- ``_dot_rows_kernel`` (d_values[b, j] = G[b] . M[idx[b, j]]): program = BLOCK_R rows x BLOCK_K
  slots, stepping over d.
- ``_scatter_rows_kernel`` (dW[i] = sum over slots (b, j) with idx[b, j] = i of coef[b, j] R[b]):
  no atomics. The launcher sorts the flat slot ids by latent (``latent_segments``: one stable
  torch.sort of rows * k keys plus a searchsorted for the n + 1 segment bounds), and each
  program owns LATENTS latents x BLOCK_D features: it walks their segments BLOCK_P slots at a time
  and writes every row of its block exactly once, zeros for unselected latents. The result is
  deterministic (fixed summation order). A latent selected by many rows makes its program walk a
  long segment (B=16384 rows on one latent: 1024 steps of 16); the rest of the grid is unaffected.

Invalid indices (-1 = empty slot, or out of range) contribute nothing and are never dereferenced;
out-of-range ones also raise a flag the caller turns into a ValueError.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._latent_segments import latent_segments
from ._launch import INTERPRETED, check_int32_addressable, next_pow2


class RowsConfig(NamedTuple):
    block_r: int
    block_k: int
    block_d: int
    num_warps: int


def rows_config(rows: int, k: int, d: int) -> RowsConfig:
    """GPU: one row per program, 16 slots x 128 features per step: 16 gathered elements per thread
    with 4 warps, each with its own 64-bit address (sm_90a, ptxas: 52 registers for the gather, 48
    for the dots), so many programs per SM keep loads in flight to stream W rows from HBM.
    Interpreter: up to 64 rows and all of d per program, so a call is a few numpy steps."""
    if INTERPRETED:
        return RowsConfig(min(64, next_pow2(rows)), min(64, next_pow2(k)), min(128, next_pow2(d)), 1)
    return RowsConfig(1, 16, 128, 4)


class ScatterConfig(NamedTuple):
    latents: int
    block_p: int
    block_d: int
    num_warps: int


def scatter_config(pairs: int, n: int, d: int) -> ScatterConfig:
    """GPU: 2 latents x 16 slots x 128 features per step with 8 warps (16 gathered elements per
    thread; sm_90a, ptxas: 80-127 registers). Interpreter: 64 latents per program and slot steps
    sized to the mean segment length."""
    if INTERPRETED:
        return ScatterConfig(64, min(16, next_pow2(max(1, pairs // max(n, 1)) * 2)), min(128, next_pow2(d)), 1)
    return ScatterConfig(2, 16, 128, 8)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def combine_slots(
    coef_ptr, gate_ptr, idx_ptr, M_ptr, err_ptr, report, r, rmask, cols, cmask, K, n, d,
    HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """[BLOCK_R, BLOCK_D] fp32: sum_j c[b, j] M[idx[b, j], cols] for rows r, c = coef (times
    [gate > 0] when gated). Sets err_ptr[0] = 1 for an index outside [-1, n) when `report`."""
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        slot = r.to(tl.int64)[:, None] * K + j[None, :]
        smask = rmask[:, None] & (j < K)[None, :]
        idx = tl.load(idx_ptr + slot, mask=smask, other=-1)
        valid = (idx >= 0) & (idx < n)
        if report:
            tl.store(err_ptr + tl.zeros_like(idx), 1, mask=smask & ((idx >= n) | (idx < -1)))
        c = tl.load(coef_ptr + slot, mask=smask, other=0.0).to(tl.float32)
        if HAS_GATE:
            c = tl.where(tl.load(gate_ptr + slot, mask=smask, other=0.0) > 0, c, 0.0)
        c = tl.where(valid, c, 0.0)  # an empty slot's value is ignored, even NaN
        w = tl.load(
            M_ptr + idx.to(tl.int64)[:, :, None] * d + cols[None, None, :],
            mask=valid[:, :, None] & cmask[None, None, :],
            other=0.0,
        )
        acc += tl.sum(c[:, :, None] * w.to(tl.float32), axis=1)
    return acc


@triton.jit
def _gather_rows_kernel(
    coef_ptr, gate_ptr, idx_ptr, M_ptr, bias_ptr, out_ptr, err_ptr, rows, K, n, d,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b] = bias + sum_j c[b, j] M[idx[b, j]], c = coef (gated: coef * [gate > 0])."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    acc = combine_slots(
        coef_ptr, gate_ptr, idx_ptr, M_ptr, err_ptr, tl.program_id(1) == 0, r, rmask, cols, cmask, K, n, d,
        HAS_GATE, BLOCK_R, BLOCK_K, BLOCK_D,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + r.to(tl.int64)[:, None] * d + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _dot_rows_kernel(
    G_ptr, idx_ptr, M_ptr, out_ptr, err_ptr, rows, K, n, d,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b, j] = G[b] . M[idx[b, j]] (0 for empty slots); err_ptr[0] = 1 for an index outside [-1, n)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot = r.to(tl.int64)[:, None] * K + j[None, :]
    smask = rmask[:, None] & (j < K)[None, :]
    idx = tl.load(idx_ptr + slot, mask=smask, other=-1)
    valid = (idx >= 0) & (idx < n)
    tl.store(err_ptr + tl.zeros_like(idx), 1, mask=smask & ((idx >= n) | (idx < -1)))
    w_rows = M_ptr + idx.to(tl.int64)[:, :, None] * d
    g_rows = G_ptr + r.to(tl.int64)[:, None] * d
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        g = tl.load(g_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, None, :], mask=valid[:, :, None] & cmask[None, None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * g[:, None, :], axis=2)
    tl.store(out_ptr + slot, acc.to(out_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _scatter_rows_kernel(
    order_ptr, bounds_ptr, coef_ptr, gate_ptr, R_ptr, R2_ptr, offset_ptr, out_ptr, coef_sum_ptr,
    n, d, K, K_MAIN,
    HAS_R2: tl.constexpr, HAS_GATE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_COEF_SUM: tl.constexpr,
    LATENTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[i] = sum over slots s of latent i of c[s] (R[row(s)] - offset), coef_sum[i] = sum c[s].

    Slot s = b * K + j reads row b of R for j < K_MAIN and row b of R2 past it (sae_loss sums its
    main and AuxK slots in one pass, with their own residual gradients)."""
    latents = tl.program_id(0) * LATENTS + tl.arange(0, LATENTS)
    lmask = latents < n
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(bounds_ptr + latents, mask=lmask, other=0)
    count = tl.load(bounds_ptr + latents + 1, mask=lmask, other=0) - start
    acc = tl.zeros([LATENTS, BLOCK_D], dtype=tl.float32)
    coef_sum = tl.zeros([LATENTS, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, tl.max(count, axis=0), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p[None, :] < count[:, None]
        s = tl.load(order_ptr + start[:, None] + p[None, :], mask=pmask, other=0)
        c = tl.load(coef_ptr + s, mask=pmask, other=0.0).to(tl.float32)
        if HAS_GATE:
            c = tl.where(tl.load(gate_ptr + s, mask=pmask, other=0.0) > 0, c, 0.0)
        tile = (s // K).to(tl.int64)[:, :, None] * d + cols[None, None, :]
        tmask = pmask[:, :, None] & cmask[None, None, :]
        main = (s % K < K_MAIN)[:, :, None]
        v = tl.load(R_ptr + tile, mask=tmask & main, other=0.0).to(tl.float32)
        if HAS_R2:
            v += tl.load(R2_ptr + tile, mask=tmask & ~main, other=0.0).to(tl.float32)
        acc += tl.sum(c[:, :, None] * v, axis=1)
        coef_sum += c
    total = tl.sum(coef_sum, axis=1)
    if HAS_OFFSET:
        acc -= total[:, None] * tl.load(offset_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + latents.to(tl.int64)[:, None] * d + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=lmask[:, None] & cmask[None, :])
    if HAS_COEF_SUM:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if tl.program_id(1) == 0:
            tl.store(coef_sum_ptr + latents, total.to(coef_sum_ptr.dtype.element_ty), mask=lmask)


# ---------------------------------------------------------------------------------------- launchers


def gather_rows(
    coef: torch.Tensor,
    indices: torch.Tensor,
    M: torch.Tensor,
    out: torch.Tensor,
    flag: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """out [rows, d] = bias + sum_j coef[:, j] (gated by gate > 0) M[indices[:, j]]; flag [0] is set to
    1 by an index outside [-1, n)."""
    rows, K = indices.shape
    n, d = M.shape
    check_int32_addressable("indices", indices.numel())
    cfg = rows_config(rows, K, d)
    _gather_rows_kernel[(triton.cdiv(rows, cfg.block_r), triton.cdiv(d, cfg.block_d))](
        coef, coef if gate is None else gate, indices, M, M if bias is None else bias, out, flag, rows, K, n, d,
        HAS_GATE=gate is not None, HAS_BIAS=bias is not None,
        BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip


def dot_rows(G: torch.Tensor, indices: torch.Tensor, M: torch.Tensor, out: torch.Tensor, flag: torch.Tensor) -> None:
    """out [rows, K] = G[b] . M[indices[b, j]], 0 for empty slots; flag [0] is set to 1 by an index
    outside [-1, n)."""
    rows, K = indices.shape
    n, d = M.shape
    cfg = rows_config(rows, K, d)
    _dot_rows_kernel[(triton.cdiv(rows, cfg.block_r), triton.cdiv(K, cfg.block_k))](
        G, indices, M, out, flag, rows, K, n, d,
        BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip


def scatter_rows(
    coef: torch.Tensor,
    indices: torch.Tensor,
    R1: torch.Tensor,
    out: torch.Tensor,
    *,
    R2: torch.Tensor | None = None,
    main_slots: int | None = None,
    gate: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    coef_sum: torch.Tensor | None = None,
) -> None:
    """out[i] = sum over slots (b, j) with indices[b, j] = i of c[b, j] * (R[b] - offset), with
    c = coef * [gate > 0] and R = R1 for j < main_slots, else R2; coef_sum[i] = sum of those c.
    Every row of out [n, d] is written; no atomics (latent-sorted segments, deterministic)."""
    rows, K = indices.shape
    n, d = out.shape
    order, bounds = latent_segments(indices, n)
    cfg = scatter_config(indices.numel(), n, d)
    _scatter_rows_kernel[(triton.cdiv(n, cfg.latents), triton.cdiv(d, cfg.block_d))](
        order, bounds, coef, coef if gate is None else gate, R1, R1 if R2 is None else R2,
        R1 if offset is None else offset, out, out if coef_sum is None else coef_sum, n, d, K,
        K if main_slots is None else main_slots,
        HAS_R2=R2 is not None, HAS_GATE=gate is not None, HAS_OFFSET=offset is not None,
        HAS_COEF_SUM=coef_sum is not None,
        LATENTS=cfg.latents, BLOCK_P=cfg.block_p, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip
