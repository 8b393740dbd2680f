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
[B, d] tensor) and writes the two residual gradients as one fp32 [2, B, d] buffer R:
    G = 2 g_sse[b] res (+ g_x_hat),  H = 2 g_aux[b] (e_hat + res),  dx = -2 g_sse[b] res (on request)
after which the sparse decoder's kernels finish: d_values = G . W[idx] and d_aux = H . W[aux_idx]
(``dot_rows``), dW_dec by one latent segment reduce over the main and aux slots together
(``segment_rows`` with R), db_dec = sum_b G[b].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, check_int32_addressable, next_pow2
from .sparse_decode import combine_slots, dot_rows, segment_rows


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
    x_ptr, v_ptr, idx_ptr, av_ptr, aidx_ptr, W_ptr, b_dec_ptr, g_x_hat_ptr, g_sse_ptr, g_aux_ptr, R_ptr, dx_ptr,
    err_ptr, rows, K, AUX_K, n, d, aux_offset,
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
        tl.store(R_ptr + tile, G, mask=tmask)
        if NEED_DX:
            tl.store(dx_ptr + tile, (-two_g_sse * res).to(dx_ptr.dtype.element_ty), mask=tmask)
        if HAS_AUX:
            e_hat = combine_slots(
                av_ptr, av_ptr, aidx_ptr, W_ptr, err_ptr, False, r, rmask, cols, cmask, AUX_K, n, d,
                False, BLOCK_R, BLOCK_K, BLOCK_D,
            )  # fmt: skip
            tl.store(R_ptr + aux_offset + tile, two_g_aux * (e_hat + res), mask=tmask)


def sae_loss_forward(
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
) -> torch.Tensor:
    """Fills x_hat [B, d], sse [B] and (with aux latents) aux_sse [B]. Returns the int32 error flags
    [2]: [0] for indices, [1] for aux_indices (nonzero: an index outside [-1, n))."""
    rows, K = indices.shape
    n, d = W_dec.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    check_int32_addressable("indices", indices.numel())
    err = torch.zeros(2, dtype=torch.int32, device=x.device)
    block_r, block_k, block_d, warps = _config(rows, max(K, aux_k), d)
    # absent optional tensors are replaced by any valid pointer; HAS_AUX keeps the kernel off them
    aux_values, aux_indices = (values, indices) if aux_values is None else (aux_values, aux_indices)
    _loss_forward_kernel[(triton.cdiv(rows, block_r),)](
        x, values, indices, aux_values, aux_indices,
        W_dec, b_dec, x_hat, sse, sse if aux_sse.numel() == 0 else aux_sse, err, rows, K, max(aux_k, 1), n, d,
        HAS_AUX=aux_k > 0, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return err


def sae_loss_backward(
    grad_x_hat: torch.Tensor | None,
    grad_sse: torch.Tensor,
    grad_aux_sse: torch.Tensor | None,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    aux_values: torch.Tensor | None,
    aux_indices: torch.Tensor | None,
    d_values: torch.Tensor,
    d_aux_values: torch.Tensor,
    dW_dec: torch.Tensor,
    dx: torch.Tensor | None,
) -> torch.Tensor:
    """Fills d_values [B, k], d_aux_values [B, aux_k] (with aux latents), dW_dec [n, d] and dx [B, d]
    (when given); grad_sse / grad_aux_sse are fp32 [B]. Returns db_dec in fp32 [d]."""
    rows, K = indices.shape
    n, d = W_dec.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    # R[0] = G, R[1] = H (aux_offset = rows * d elements further: an int64 argument past 2^31)
    R = torch.empty(2 if aux_k else 1, rows, d, dtype=torch.float32, device=x.device)
    err = torch.zeros(1, dtype=torch.int32, device=x.device)  # indices were checked by the forward
    block_r, block_k, block_d, warps = _config(rows, max(K, aux_k), d)
    _loss_backward_kernel[(triton.cdiv(rows, block_r),)](
        x, values, indices, values if aux_values is None else aux_values,
        indices if aux_indices is None else aux_indices, W_dec, b_dec, x if grad_x_hat is None else grad_x_hat,
        grad_sse, grad_sse if grad_aux_sse is None else grad_aux_sse,
        R, x if dx is None else dx, err, rows, K, max(aux_k, 1), n, d, rows * d,
        HAS_AUX=aux_k > 0, HAS_G_X_HAT=grad_x_hat is not None, NEED_DX=dx is not None,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    dot_rows(R[0], indices, W_dec, d_values)
    if aux_k:
        dot_rows(R[1], aux_indices, W_dec, d_aux_values)
        # one segment reduce over main and aux slots: slots j >= K read R[1]
        segment_rows(
            torch.cat([values, aux_values], dim=1), torch.cat([indices, aux_indices], dim=1), R, dW_dec, main_slots=K
        )
    else:
        segment_rows(values, indices, R, dW_dec)
    return R[0].sum(0)
