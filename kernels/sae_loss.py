"""Fused sparse decoder + reconstruction loss (MSE / FVU) + AuxK loss.

Forward (``_loss_forward_kernel``), one pass per block of rows, d in BLOCK_D steps:
    x_hat = b_dec + sum_j v_j W[idx_j]      (written out, in x's dtype)
    res   = x_hat - x                       (registers only: never stored)
    sse  += |res|^2
    e_hat = sum_j a_j W[aux_idx_j]          (AuxK rows; registers only)
    aux  += |e_hat + res|^2                 (= |e_hat - (x - x_hat)|^2)
Each decoder row of the k + aux_k selected latents is read once per row of x; the per-row sums
are fp32 and the scalar losses are reduced by the caller.

Backward (``_loss_backward_kernel``) recomputes x_hat and e_hat the same way (the op saves no
[B, d] tensor) and writes the two fp32 residual gradients:
    G = 2 g_sse[b] res (+ g_x_hat),  H = 2 g_aux[b] (e_hat + res),  dx = -2 g_sse[b] res (on request)
after which flashsae.ops.sae_loss finishes with the sparse_rows kernels, as for the cuda backend.

The launchers take the arguments of their flashsae.ops._cuda counterparts (``loss_forward``,
``loss_backward_rows``), so one orchestration in the op serves both backends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, check_int32_addressable, next_pow2
from .sparse_rows import combine_slots


def _config(rows: int, k: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_D, num_warps). GPU: one row per program (the per-row loss needs all
    of d, so a program walks d in 128-wide steps over 16-slot gathers, as the decoder's row
    kernels). Interpreter: up to 64 rows and all of d per program."""
    if INTERPRETED:
        return min(64, next_pow2(rows)), min(64, next_pow2(k)), min(128, next_pow2(d)), 1
    return 1, 16, 128, 4


@triton.jit
def _loss_forward_kernel(
    x_ptr, v_ptr, idx_ptr, av_ptr, aidx_ptr, W_ptr, b_dec_ptr, x_hat_ptr, sse_ptr, aux_sse_ptr, err_ptr,
    rows, K, AUX_K, n, d,
    HAS_AUX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    sse = tl.zeros([BLOCK_R], dtype=tl.float32)
    aux_sse = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        tile = r.to(tl.int64)[:, None] * d + cols[None, :]
        tmask = rmask[:, None] & cmask[None, :]
        x_hat = combine_slots(
            v_ptr, v_ptr, idx_ptr, W_ptr, err_ptr, d0 == 0, r, rmask, cols, cmask, K, n, d,
            False, BLOCK_R, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        x_hat += tl.load(b_dec_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(x_hat_ptr + tile, x_hat.to(x_hat_ptr.dtype.element_ty), mask=tmask)
        res = tl.where(tmask, x_hat - tl.load(x_ptr + tile, mask=tmask, other=0.0).to(tl.float32), 0.0)
        sse += tl.sum(res * res, axis=1)
        if HAS_AUX:
            e_hat = combine_slots(
                av_ptr, av_ptr, aidx_ptr, W_ptr, err_ptr + 1, d0 == 0, r, rmask, cols, cmask, AUX_K, n, d,
                False, BLOCK_R, BLOCK_K, BLOCK_D,
            )  # fmt: skip
            aux_res = e_hat + res
            aux_sse += tl.sum(aux_res * aux_res, axis=1)
    tl.store(sse_ptr + r, sse, mask=rmask)
    if HAS_AUX:
        tl.store(aux_sse_ptr + r, aux_sse, mask=rmask)


@triton.jit
def _loss_backward_kernel(
    x_ptr, v_ptr, idx_ptr, av_ptr, aidx_ptr, W_ptr, b_dec_ptr, g_x_hat_ptr, g_sse_ptr, g_aux_ptr, G_ptr, H_ptr,
    dx_ptr, err_ptr, rows, K, AUX_K, n, d,
    HAS_AUX: tl.constexpr, HAS_G_X_HAT: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    two_g_sse = 2.0 * tl.load(g_sse_ptr + r, mask=rmask, other=0.0)[:, None]
    if HAS_AUX:
        two_g_aux = 2.0 * tl.load(g_aux_ptr + r, mask=rmask, other=0.0)[:, None]
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        tile = r.to(tl.int64)[:, None] * d + cols[None, :]
        tmask = rmask[:, None] & cmask[None, :]
        x_hat = combine_slots(
            v_ptr, v_ptr, idx_ptr, W_ptr, err_ptr, False, r, rmask, cols, cmask, K, n, d,
            False, BLOCK_R, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        x_hat += tl.load(b_dec_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        res = x_hat - tl.load(x_ptr + tile, mask=tmask, other=0.0).to(tl.float32)
        G = two_g_sse * res
        if HAS_G_X_HAT:
            G += tl.load(g_x_hat_ptr + tile, mask=tmask, other=0.0).to(tl.float32)
        tl.store(G_ptr + tile, G, mask=tmask)
        if NEED_DX:
            tl.store(dx_ptr + tile, (-two_g_sse * res).to(dx_ptr.dtype.element_ty), mask=tmask)
        if HAS_AUX:
            e_hat = combine_slots(
                av_ptr, av_ptr, aidx_ptr, W_ptr, err_ptr, False, r, rmask, cols, cmask, AUX_K, n, d,
                False, BLOCK_R, BLOCK_K, BLOCK_D,
            )  # fmt: skip
            tl.store(H_ptr + tile, two_g_aux * (e_hat + res), mask=tmask)


def loss_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    aux_values: torch.Tensor | None,
    aux_indices: torch.Tensor | None,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x_hat: torch.Tensor,
    sse: torch.Tensor,
    aux_sse: torch.Tensor,
    flags: torch.Tensor,
) -> None:
    """Fills x_hat [B, d], sse [B] and (with aux latents) aux_sse [B]; flags[0] / flags[1] are set
    by an index outside [-1, n) in indices / aux_indices."""
    rows, K = indices.shape
    n, d = W_dec.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    check_int32_addressable("indices", indices.numel())
    block_r, block_k, block_d, warps = _config(rows, max(K, aux_k), d)
    # absent optional tensors are replaced by any valid pointer; HAS_AUX keeps the kernel off them
    aux_values, aux_indices = (values, indices) if aux_values is None else (aux_values, aux_indices)
    _loss_forward_kernel[(triton.cdiv(rows, block_r),)](
        x, values, indices, aux_values, aux_indices,
        W_dec, b_dec, x_hat, sse, sse if aux_sse.numel() == 0 else aux_sse, flags, rows, K, max(aux_k, 1), n, d,
        HAS_AUX=aux_k > 0, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip


def loss_backward_rows(
    grad_x_hat: torch.Tensor | None,
    grad_sse: torch.Tensor,
    grad_aux_sse: torch.Tensor | None,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    aux_values: torch.Tensor | None,
    aux_indices: torch.Tensor | None,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor | None,
    dx: torch.Tensor | None,
    flags: torch.Tensor,
) -> None:
    """G = 2 grad_sse (x_hat - x) + grad_x_hat, H = 2 grad_aux_sse (e_hat + x_hat - x) (with aux
    latents), dx = -2 grad_sse (x_hat - x) (when dx is given); G, H fp32 [B, d], grad_sse /
    grad_aux_sse fp32 [B]. The forward read these indices, so the kernel does not flag them again."""
    rows, K = indices.shape
    n, d = W_dec.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    block_r, block_k, block_d, warps = _config(rows, max(K, aux_k), d)
    _loss_backward_kernel[(triton.cdiv(rows, block_r),)](
        x, values, indices, values if aux_values is None else aux_values,
        indices if aux_indices is None else aux_indices, W_dec, b_dec, x if grad_x_hat is None else grad_x_hat,
        grad_sse, grad_sse if grad_aux_sse is None else grad_aux_sse,
        G, G if H is None else H, x if dx is None else dx, flags, rows, K, max(aux_k, 1), n, d,
        HAS_AUX=aux_k > 0, HAS_G_X_HAT=grad_x_hat is not None, NEED_DX=dx is not None,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
