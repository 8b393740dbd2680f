"""JumpReLU and its L0 step on padded sparse latents: the straight-through estimators of
:class:`~flashsae.JumpReLUSAE` applied to the slots that :func:`~flashsae.ops.threshold_encode`
returns instead of to the dense [batch, n_latents] pre-activations.

    t      = threshold[indices]                              (per slot; index -1 = empty slot)
    f      = pre * H(pre - t)                                 slot_jumprelu
    s      = H(pre - t)                                       slot_step  (its sum over slots is the L0)
    df/dpre = H(pre - t)          df/dthreshold_i = sum over slots of i: -(t / eps) K((pre - t) / eps)
    ds/dpre = 0                   ds/dthreshold_i = sum over slots of i: -(1 / eps) K((pre - t) / eps)

with the rectangle kernel K(u) = 1[|u| < 1/2] (Rajamanoharan et al. 2024). Both estimators only see
pre-activations within eps / 2 of a threshold, so encoding with threshold_encode at
``threshold - eps / 2`` yields every slot they need: the active latents and the inactive ones in
the kernel's window. Nothing [batch, n] exists; the threshold gradient is an index_add over slots.
The gradient d loss / d f of an inactive slot (f = 0) still arrives from sparse_decode's backward
(its value gradient is W_dec[index] . grad_out for every slot with an index), which is what the
threshold's estimator needs.

One difference from the dense estimator: threshold_encode returns positive pre-activations only, so
a latent whose threshold is below eps / 2 misses the part of its window at or below 0. Trained
thresholds sit far above that (target L0 32 of 3072: about 2.5 standard deviations of the
pre-activation, the window 0.05 of one).
"""

from __future__ import annotations

from typing import Any

import torch


def _slot_thresholds(indices: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold of every slot [rows, m] (0 in empty slots), valid [rows, m] bool)."""
    valid = indices >= 0
    return threshold[indices.clamp_min(0).long()].masked_fill(~valid, 0), valid


def _threshold_grad(
    contribution: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """[n] sums of `contribution` [rows, m] over the slots of each latent (float32 at least: a
    bfloat16 sum over thousands of rows loses the signal), in threshold's dtype."""
    acc = torch.promote_types(threshold.dtype, torch.float32)
    flat = contribution.to(acc).masked_fill(~valid, 0).reshape(-1)
    total = torch.zeros(threshold.shape[0], dtype=acc, device=threshold.device)
    total.index_add_(0, indices.clamp_min(0).reshape(-1).long(), flat)
    return total.to(threshold.dtype)


class SlotJumpReLU(torch.autograd.Function):
    """f = pre * H(pre - threshold[indices]) with the rectangle-kernel estimator for the threshold
    (module docstring). Inputs: pre [rows, m], int32 indices [rows, m], threshold [n], bandwidth eps."""

    @staticmethod
    def forward(pre: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        t, valid = _slot_thresholds(indices, threshold)
        return pre * ((pre > t) & valid)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pre, indices, threshold, bandwidth = inputs
        ctx.save_for_backward(pre, indices, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor, None]:
        pre, indices, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        t, valid = _slot_thresholds(indices, threshold)
        grad_pre = grad * ((pre > t) & valid)
        in_window = ((pre - t) / eps).abs() < 0.5
        contribution = torch.where(in_window, -(t / eps) * grad, torch.zeros_like(grad))
        return grad_pre, None, _threshold_grad(contribution, indices, valid, threshold), None


class SlotStep(torch.autograd.Function):
    """H(pre - threshold[indices]) per slot (0 in empty slots); the gradient reaches the threshold
    only, through the rectangle kernel (module docstring)."""

    @staticmethod
    def forward(pre: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        t, valid = _slot_thresholds(indices, threshold)
        return ((pre > t) & valid).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pre, indices, threshold, bandwidth = inputs
        ctx.save_for_backward(pre, indices, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor, None]:
        pre, indices, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        t, valid = _slot_thresholds(indices, threshold)
        in_window = ((pre - t) / eps).abs() < 0.5
        contribution = torch.where(in_window, -grad / eps, torch.zeros_like(grad))
        return None, None, _threshold_grad(contribution, indices, valid, threshold), None


def slot_jumprelu(pre: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU of padded slots (see :class:`SlotJumpReLU`)."""
    return SlotJumpReLU.apply(pre, indices, threshold, bandwidth)


def slot_step(pre: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The L0 step of padded slots (see :class:`SlotStep`)."""
    return SlotStep.apply(pre, indices, threshold, bandwidth)
