"""Sparse Adam with a row-wise second moment: one kernel over the touched rows (flashsae.ops.sparse_adam_rowwise).

Program = BLOCK_M touched rows, looping over d in BLOCK_D columns. Per row it loads the last step and
the row's second moment, sums the skipped steps' drift coefficient as a scalar loop (at most
``horizon`` steps; the per-row denominator makes the drift m_s times a scalar), then makes two passes
over d: the first sums g^2 (the new second moment) and, for an int8 first moment, takes the new
row max that sets the code scale; the second recomputes the new first moment, updates the weights and
stores weights and codes once. Math float32 with round-to-nearest sqrt and division.

Memory traffic per touched element: weights read + written, gradient read twice, first moment read
twice + written (1 byte each with int8 codes): 2 + 4 + 3 = 9 bytes in bf16 / int8, against 2 + 2 + 12
= 16 for the elementwise sparse_adam kernel with bf16 moments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, next_pow2
from .sparse_adam import _lerp, _rounded, step_scalars, touched_rows

FIRST_NONE, FIRST_FLOAT, FIRST_INT8 = 0, 1, 2


class RowwiseConfig(NamedTuple):
    block_m: int
    block_d: int
    num_warps: int


def rowwise_config(rows: int, d: int) -> RowwiseConfig:
    """GPU: 2 rows x 1024 columns per pass (8 elements per thread with 8 warps: 16-byte bf16 loads).
    Interpreter: up to 64 rows and 128 columns."""
    if INTERPRETED:
        return RowwiseConfig(min(64, next_pow2(rows)), min(128, next_pow2(d)), 1)
    return RowwiseConfig(2, min(1024, max(128, next_pow2(d))), 8)


@triton.jit
def _first_moment(m_ptr, offs, mask, unit, FIRST: tl.constexpr):
    """The stored first moment of a [BLOCK_M, BLOCK_D] tile in float32 (unit: scale / 127^2 per row)."""
    if FIRST == 2:
        c = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32)
        return (c * tl.abs(c)) * unit[:, None]
    elif FIRST == 1:
        return tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.zeros(offs.shape, dtype=tl.float32)


@triton.jit
def _sparse_adam_rowwise_kernel(
    param_ptr, master_ptr, m_ptr, scale_ptr, v_ptr, last_ptr, rows_ptr, grad_ptr, sched_ptr,
    M, d, step, upto, horizon, beta1, w1, w1_rest, beta2, c2, eps, log2_beta1, log2_beta2,
    FIRST: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_MASTER: tl.constexpr, LERP_FROM_START: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    q, qmask, r, last, gap, replay = touched_rows(rows_ptr, last_ptr, M, upto, horizon, BLOCK_M)
    v = tl.load(v_ptr + r, mask=qmask, other=0.0)
    # drift of the skipped steps: sum_i ss_{last+i} b1^i / (sqrt(v b2^i) / bs_{last+i} + eps)
    coef = tl.zeros([BLOCK_M], dtype=tl.float32)
    decay1 = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    second = v
    for i in range(1, tl.max(replay, axis=0) + 1):
        active = replay >= i
        j = last + i
        step_size = tl.load(sched_ptr + 2 * j, mask=active, other=0.0).to(tl.float32)
        bias_sqrt = tl.load(sched_ptr + 2 * j + 1, mask=active, other=1.0).to(tl.float32)
        decay1 = decay1 * beta1
        second = second * beta2
        term = tl.div_rn(step_size * decay1, tl.div_rn(tl.sqrt_rn(second), bias_sqrt) + eps)
        coef += tl.where(active, term, 0.0)
    gap_f = gap.to(tl.float32)
    f1 = tl.where(gap > 0, tl.exp2(gap_f * log2_beta1), 1.0)
    v = tl.where(gap > 0, v * tl.exp2(gap_f * log2_beta2), v)
    unit = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FIRST == 2:
        unit = tl.load(scale_ptr + r, mask=qmask, other=0.0) / 16129.0
    row_base = r[:, None] * d
    grad_base = q.to(tl.int64)[:, None] * d
    # pass 1: sum of g^2 (new second moment) and the new first moment's row max (int8 scale)
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GRAD or FIRST == 2:
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = qmask[:, None] & (cols < d)[None, :]
            m = _first_moment(m_ptr, row_base + cols[None, :], mask, unit, FIRST) * f1[:, None]
            if HAS_GRAD:
                g = tl.load(grad_ptr + grad_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                sum_sq += tl.sum(g * g, axis=1)
                m = _lerp(m, g, w1, w1_rest, LERP_FROM_START)
            row_max = tl.maximum(row_max, tl.max(tl.abs(m), axis=1))
    factor = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GRAD:
        v = v * beta2 + (c2 * sum_sq) / d
        step_size_now = tl.load(sched_ptr + 2 * step).to(tl.float32)
        bias_sqrt_now = tl.load(sched_ptr + 2 * step + 1).to(tl.float32)
        factor = step_size_now / (tl.div_rn(tl.sqrt_rn(v), bias_sqrt_now) + eps)
    safe = tl.where(row_max > 0, row_max, 1.0)
    # pass 2: drift, decay, the step with the gradient; weights and first moment stored once
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = qmask[:, None] & (cols < d)[None, :]
        offs = row_base + cols[None, :]
        if HAS_MASTER:
            p = tl.load(master_ptr + offs, mask=mask, other=0.0)
        else:
            p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = _first_moment(m_ptr, offs, mask, unit, FIRST)
        p = p - coef[:, None] * m
        m = m * f1[:, None]
        if HAS_GRAD:
            g = tl.load(grad_ptr + grad_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            m = _lerp(m, g, w1, w1_rest, LERP_FROM_START)
            p = p - factor[:, None] * m
        if HAS_MASTER:
            tl.store(master_ptr + offs, p, mask=mask)
        tl.store(param_ptr + offs, _rounded(p, param_ptr.dtype.element_ty), mask=mask)
        if FIRST == 2:
            magnitude = tl.floor(127.0 * tl.sqrt_rn(tl.div_rn(tl.abs(m), safe[:, None])) + 0.5)
            tl.store(m_ptr + offs, tl.where(m < 0, -magnitude, magnitude).to(tl.int8), mask=mask)
        elif FIRST == 1:
            tl.store(m_ptr + offs, _rounded(m, m_ptr.dtype.element_ty), mask=mask)
    if FIRST == 2:
        tl.store(scale_ptr + r, row_max, mask=qmask)
    tl.store(v_ptr + r, v, mask=qmask)


def sparse_adam_rowwise(
    param: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_scale: torch.Tensor | None,
    exp_avg_sq: torch.Tensor,
    last_step: torch.Tensor,
    s,
) -> None:
    """The fused step `s` (a flashsae.ops.sparse_adam.AdamStep, validated by
    flashsae.ops.sparse_adam_rowwise) over its rows; last_step is not written."""
    k = step_scalars(s)
    d = param.shape[1]
    cfg = rowwise_config(k.rows, d)
    first = FIRST_NONE if exp_avg is None else FIRST_INT8 if exp_avg.dtype == torch.int8 else FIRST_FLOAT
    _sparse_adam_rowwise_kernel[(triton.cdiv(k.rows, cfg.block_m),)](
        param, param if s.master is None else s.master, param if exp_avg is None else exp_avg,
        exp_avg_sq if exp_avg_scale is None else exp_avg_scale, exp_avg_sq, last_step, s.rows,
        param if s.grads is None else s.grads, s.schedule, k.rows, d, k.step, k.upto, k.horizon,
        s.beta1, k.w1, k.w1_rest, k.beta2, k.c2, k.eps, k.log2_beta1, k.log2_beta2,
        FIRST=first, HAS_GRAD=s.grads is not None, HAS_MASTER=s.master is not None, LERP_FROM_START=k.lerp_from_start,
        BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip
