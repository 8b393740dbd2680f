"""Fused sparse Adam: one kernel over the touched rows of an [n, d] parameter (flashsae.ops.sparse_adam).

Program = BLOCK_M touched rows x BLOCK_D features. Each program loads its rows' parameter (or float32
master), moments and last step once, replays the skipped zero-gradient steps in registers (at most
``horizon`` per row; the loop runs to the longest replay in the block, shorter rows masked), decays the
moments over the rest of the gap, applies the row's gradient step and stores once. The per-step scalars
(lr_j / (1 - beta1^j), sqrt(1 - beta2^j)) come from the float64 schedule table; math is float32 with
round-to-nearest sqrt and division, as torch's Adam computes. Rows are unique, so no two programs write
the same element; ``last_step`` is written by the caller after the kernel (every d-block reads it).

Memory traffic per touched element: param + m + v read and written (+ master, + the gradient read),
as one dense Adam element; nothing is swept over the untouched rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, next_pow2


class AdamConfig(NamedTuple):
    block_m: int
    block_d: int
    num_warps: int


def adam_config(rows: int, d: int) -> AdamConfig:
    """GPU: 4 rows x 256 features (8 elements per thread with 4 warps: each of p, m, v, g is a 16-byte
    load per thread in bf16, 32 bytes in fp32). Interpreter: up to 64 rows and 128 features per program."""
    if INTERPRETED:
        return AdamConfig(min(64, next_pow2(rows)), min(128, next_pow2(d)), 1)
    return AdamConfig(4, 256, 4)


@triton.jit
def _lerp(start, end, weight, rest, FROM_START: tl.constexpr):
    if FROM_START:
        return start + weight * (end - start)
    return end - (end - start) * rest


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 -> the storage dtype, round-to-nearest-even. bfloat16 is rounded with integer ops: the
    Triton interpreter truncates in its float32 -> bfloat16 cast (a GPU rounds to nearest even), and a
    bf16 parameter must equal its float32 master copy rounded as torch rounds it. Values are finite."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def touched_rows(rows_ptr, last_ptr, M, upto, horizon, BLOCK_M: tl.constexpr):
    """This program's block of touched rows: (slot q, its mask, row id r, the row's last step, the gap
    of skipped steps to catch up on, and how many of them are replayed: at most ``horizon``)."""
    q = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    qmask = q < M
    r = tl.load(rows_ptr + q, mask=qmask, other=0).to(tl.int64)
    last = tl.load(last_ptr + r, mask=qmask, other=0).to(tl.int64)
    gap = tl.where((last > 0) & (upto > last) & qmask, upto - last, 0)
    return q, qmask, r, last, gap, tl.minimum(gap, horizon)


@triton.jit
def _sparse_adam_kernel(
    param_ptr, master_ptr, m_ptr, v_ptr, last_ptr, rows_ptr, grad_ptr, sched_ptr,
    M, d, step, upto, horizon, w1, w1_rest, beta2, c2, eps, log2_beta1, log2_beta2,
    HAS_GRAD: tl.constexpr, HAS_MASTER: tl.constexpr, LERP_FROM_START: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    q, qmask, r, last, gap, replay = touched_rows(rows_ptr, last_ptr, M, upto, horizon, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    mask = qmask[:, None] & cmask[None, :]
    offs = r[:, None] * d + cols[None, :]
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    longest = tl.max(replay, axis=0)
    # the skipped steps last+1 .. last+replay: dense Adam steps with a zero gradient
    for i in range(1, longest + 1):
        active = replay >= i
        j = last + i
        step_size = tl.load(sched_ptr + 2 * j, mask=active, other=0.0).to(tl.float32)
        bias_sqrt = tl.load(sched_ptr + 2 * j + 1, mask=active, other=1.0).to(tl.float32)
        m_next = _lerp(m, zero, w1, w1_rest, LERP_FROM_START)
        v_next = v * beta2
        denom = tl.div_rn(tl.sqrt_rn(v_next), bias_sqrt[:, None]) + eps
        p_next = p + tl.div_rn(-step_size[:, None] * m_next, denom)
        keep = active[:, None]
        m = tl.where(keep, m_next, m)
        v = tl.where(keep, v_next, v)
        p = tl.where(keep, p_next, p)
    # past the horizon the drift is below rounding; the moments still decay over the whole gap
    rest = (gap - replay).to(tl.float32)
    m = m * tl.exp2(rest * log2_beta1)[:, None]
    v = v * tl.exp2(rest * log2_beta2)[:, None]
    if HAS_GRAD:
        g = tl.load(grad_ptr + q.to(tl.int64)[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        step_size_now = tl.load(sched_ptr + 2 * step).to(tl.float32)
        bias_sqrt_now = tl.load(sched_ptr + 2 * step + 1).to(tl.float32)
        m = _lerp(m, g, w1, w1_rest, LERP_FROM_START)
        v = v * beta2 + (c2 * g) * g
        denom = tl.div_rn(tl.sqrt_rn(v), bias_sqrt_now) + eps
        p = p + tl.div_rn(-step_size_now * m, denom)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    tl.store(param_ptr + offs, _rounded(p, param_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, _rounded(m, m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, _rounded(v, v_ptr.dtype.element_ty), mask=mask)


def _log2(beta: float) -> float:
    """log2(beta) for the moments' decay exp2(gap * log2 beta); beta = 0 gives a finite -1e30 so that a
    gap of 0 still decays by exp2(-0) = 1."""
    return math.log2(beta) if beta > 0 else -1e30


class StepScalars(NamedTuple):
    """The scalar launch arguments both sparse Adam kernels take, from a flashsae.ops.sparse_adam.AdamStep."""

    rows: int
    step: int
    upto: int
    horizon: int
    w1: float
    w1_rest: float
    beta2: float
    c2: float
    eps: float
    log2_beta1: float
    log2_beta2: float
    lerp_from_start: bool


def step_scalars(s) -> StepScalars:
    w1 = 1.0 - s.beta1
    w1_f32 = float(torch.tensor(w1, dtype=torch.float32))  # torch rounds lerp's weight to float32 first
    return StepScalars(
        s.rows.numel(), s.step, s.upto, s.horizon, w1, 1.0 - w1_f32, s.beta2, 1.0 - s.beta2, s.eps,
        _log2(s.beta1), _log2(s.beta2), abs(w1_f32) < 0.5,
    )  # fmt: skip


def sparse_adam(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, last_step: torch.Tensor, s
) -> None:
    """The fused step `s` (a flashsae.ops.sparse_adam.AdamStep, validated) over its rows; last_step is
    not written."""
    k = step_scalars(s)
    d = param.shape[1]
    cfg = adam_config(k.rows, d)
    _sparse_adam_kernel[(triton.cdiv(k.rows, cfg.block_m), triton.cdiv(d, cfg.block_d))](
        param, param if s.master is None else s.master, exp_avg, exp_avg_sq, last_step, s.rows,
        param if s.grads is None else s.grads, s.schedule, k.rows, d, k.step, k.upto, k.horizon,
        k.w1, k.w1_rest, k.beta2, k.c2, k.eps, k.log2_beta1, k.log2_beta2,
        HAS_GRAD=s.grads is not None, HAS_MASTER=s.master is not None, LERP_FROM_START=k.lerp_from_start,
        BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip
