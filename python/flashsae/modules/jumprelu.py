"""JumpReLUSAE: the JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead: Improving
Reconstruction Fidelity with JumpReLU Sparse Autoencoders", arXiv:2407.14435; the Gemma Scope SAEs),
with the tanh sparsity penalty and pre-activation loss of Anthropic's January 2025 update
("Circuits Updates - January 2025", transformer-circuits.pub) as options.

    pre     = (x [- b_dec]) W_enc^T + b_enc                 b_dec subtracted iff apply_b_dec_to_input
    theta   = exp(log_threshold)                             per latent, > 0 (or the parameter
                                                             direct_threshold, >= 0: see below)
    f       = JumpReLU_theta(pre) = pre * H(pre - theta)
    x_hat   = f W_dec + b_dec
    loss    = sum_b |x_b - x_hat_b|^2 / batch  +  lambda(t) * S  +  lambda_P * P
      S (step, the paper) = mean_b sum_i H(pre_bi - theta_i)                       (L0)
      S (tanh, Anthropic) = mean_b sum_i tanh(c * f_bi * |W_dec_i|)
      P (pre-activation)  = mean_b sum_i relu(theta_i - pre_bi) * |W_dec_i|   over dead latents
                            (all latents when forward gets no dead_mask)

Target L0 (``target_l0``): lambda is set by an :class:`~flashsae.modules.l0_controller.L0Controller`
(a PI controller on log lambda driven by the batch L0) instead of l0_coefficient / l0_warmup_steps;
the first training batch sets every threshold to the uniform value that gives that batch target_l0
active latents, and the controller's ``data_scale`` to the batch's per-coordinate root-mean-square of
x - b_dec (the standard deviation of a projection on a random unit direction: the scale of the
pre-activations); the bandwidth then counts in units of data_scale (eps = bandwidth * data_scale),
so one default works on data of any scale and width. Without a target every
number is used as given, in the data's units.

Threshold parametrization (``threshold_parametrization``): "log" (default, the paper) learns
log_threshold; "direct" learns the thresholds themselves in ``direct_threshold`` (SAELens trains this
way since its v6: Adam moves a log-parameter multiplicatively, so small initial thresholds barely
move), kept >= 0 by clamping before every training step. "direct" is also what SAELens / Gemma Scope
/ dictionary_learning files store, so loading them is exact in every dtype (exp(log(t)) is not t:
in bfloat16, log_threshold ~ -5 has a resolution of 3% in t).

H has no derivative, so the threshold learns through the paper's straight-through estimator with a
rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth eps:

    dJumpReLU/dpre   = H(pre - theta)              dJumpReLU/dtheta = -(theta / eps) K((pre - theta) / eps)
    dH/dpre          = 0                           dH/dtheta        = -(1 / eps) K((pre - theta) / eps)

Which ops run dense and why: training (``forward``) builds the [batch, n_latents] pre-activations,
because the threshold gradient needs, for every latent, whether its pre-activation lies within
eps/2 of its threshold (active or not), and the reconstruction gradient reaching those inactive
latents (d loss / d f_i = -2 (x - x_hat) . W_dec_i) is a dense [batch, n] product as well. Inference
(``encode``, ``decode``) is sparse: :func:`~flashsae.ops.threshold_encode` (topk_encode on shifted
biases, padded [..., m] latents) and sparse_decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import boolean, non_negative, non_negative_int, positive_number
from ..ops.threshold_encode import DEFAULT_CANDIDATES
from ..outputs import ForwardOutput, SparseLatents
from ..registry import register
from . import _shared
from .base import SAEConfig
from .l0_controller import (
    L0Controller,
    center_encoder_bias_,
    check_target_l0,
    data_scale_of,
    log_threshold_shift,
    step_initial_coefficient,
    uniform_cut,
)

SPARSITY_LOSSES = ("step", "tanh")
THRESHOLD_PARAMETRIZATIONS = ("log", "direct")
#: eps in the data's units (the paper's, for activations of unit mean squared norm).
DEFAULT_BANDWIDTH = 0.001
#: eps in units of data_scale with a target L0: on the synthetic known-answer data 0.02 recovered
#: 88-100% of the directions over 4 seeds, 0.1 and 0.3 92-100%.
DEFAULT_RELATIVE_BANDWIDTH = 0.1


@dataclass
class JumpReLUConfig(SAEConfig):
    """Configuration of a :class:`JumpReLUSAE`. Coefficients are in the papers' units: the
    reconstruction term is the squared error summed over features, averaged over rows, so they
    assume normalized activations (Gemma Scope: unit mean squared norm; Anthropic: E|x| = sqrt(d_in))."""

    l0_coefficient: float = 1.0
    """lambda, the weight of the sparsity penalty S (>= 0). Gemma Scope sweeps it per site."""
    bandwidth: float | None = None
    """eps, the width of the rectangle kernel of the straight-through estimator (> 0). Without
    target_l0 it is in the data's units (None: 0.001, the paper's value for activations normalized
    to unit mean squared norm; Anthropic uses 2 with tanh); with target_l0 it is in units of
    data_scale, the first batch's per-coordinate root-mean-square of x - b_dec (None: 0.1; the
    paper's setting is ~0.05 of that unit at d = 2304)."""
    threshold_init: float = 0.001
    """Initial threshold of every latent (> 0; the paper: 0.001)."""
    sparsity_loss: str = "step"
    """"step": the L0 penalty of the paper; "tanh": Anthropic's sum tanh(c * f * |W_dec_i|)."""
    tanh_scale: float = 4.0
    """c of the tanh penalty (> 0; Anthropic: 4). Unused with "step"."""
    pre_act_coefficient: float = 0.0
    """lambda_P, the weight of the pre-activation loss P that pulls dead latents' pre-activations
    up to their thresholds (>= 0; 0 turns it off; Anthropic: 3e-6)."""
    l0_warmup_steps: int = 0
    """Training steps over which lambda rises linearly from 0 (>= 0; 0: no warm-up). See
    :mod:`flashsae.modules._shared` for how steps are counted."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from x before encoding (SAELens' option; the paper's encoder does not)."""
    threshold_parametrization: str = "log"
    """"log": the parameter is log_threshold (thresholds > 0, the paper); "direct": the parameter
    direct_threshold holds the thresholds (>= 0; exact for thresholds read from other libraries'
    files). See the module docstring."""

    target_l0: float | None = None
    """Mean active latents per row to train for, in (0, n_latents); None: lambda is l0_coefficient
    (with its warm-up). With a target, a controller adapts lambda (l0_coefficient and l0_warmup_steps
    are not used), the first training batch sets the thresholds, and bandwidth is relative to the
    data's scale (module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_l0 = check_target_l0(self.target_l0, self.n_latents)
        self.l0_coefficient = non_negative("l0_coefficient", self.l0_coefficient)
        if self.bandwidth is None:
            self.bandwidth = DEFAULT_BANDWIDTH if self.target_l0 is None else DEFAULT_RELATIVE_BANDWIDTH
        self.bandwidth = positive_number("bandwidth", self.bandwidth)
        self.threshold_init = positive_number("threshold_init", self.threshold_init)
        if self.sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(f"sparsity_loss: expected one of {SPARSITY_LOSSES}, got {self.sparsity_loss!r}")
        self.tanh_scale = positive_number("tanh_scale", self.tanh_scale)
        self.pre_act_coefficient = non_negative("pre_act_coefficient", self.pre_act_coefficient)
        non_negative_int("l0_warmup_steps", self.l0_warmup_steps)
        boolean("apply_b_dec_to_input", self.apply_b_dec_to_input)
        if self.threshold_parametrization not in THRESHOLD_PARAMETRIZATIONS:
            raise ValueError(
                f"threshold_parametrization: expected one of {THRESHOLD_PARAMETRIZATIONS}, "
                f"got {self.threshold_parametrization!r}"
            )


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta) with the rectangle-kernel straight-through estimator for theta.
    setup_context style with a generated vmap rule, so torch.func's grad and vmap work through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return pre * (pre > theta)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pre, theta, bandwidth = inputs
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta) / eps).abs() < 0.5
        grad_pre = grad * (pre > theta)
        # summed over the batch in float32 at least: a bfloat16 sum of thousands of rows loses the signal
        acc = torch.promote_types(theta.dtype, torch.float32)
        grad_theta = (-(theta.to(acc) / eps) * (grad.to(acc) * in_window)).sum(0)
        return grad_pre, grad_theta.to(theta.dtype), None


class _Step(torch.autograd.Function):
    """H(pre - theta); the gradient reaches theta only (rectangle kernel), as in the paper."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pre, theta, bandwidth = inputs
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta) / eps).abs() < 0.5
        acc = torch.promote_types(theta.dtype, torch.float32)
        grad_theta = (-(1.0 / eps) * (grad.to(acc) * in_window)).sum(0)
        return None, grad_theta.to(theta.dtype), None


@register
class JumpReLUSAE(_shared.DenseActivationSAE):
    """A JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, arXiv:2407.14435).

    Args:
        d_in: input width d. n_latents: dictionary size n.
        options: the other :class:`JumpReLUConfig` fields (l0_coefficient, bandwidth, ...).
        dtype, device, backend: as for :class:`~flashsae.TopKSAE`.

    Parameters: ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d], ``b_dec`` [d] (Gao et al. init:
    unit decoder rows, encoder = decoder, zero biases, as in the paper) and ``log_threshold`` [n]
    (``threshold`` = exp(log_threshold) stays positive), or ``direct_threshold`` [n] with
    threshold_parametrization="direct". Buffer ``num_steps`` drives the warm-up.

    Decoder: with the step (L0) penalty the paper keeps decoder rows at unit norm, so
    ``unit_norm_decoder`` is True and a training loop calls remove_decoder_parallel_grads_ /
    normalize_decoder_; the tanh penalty weighs activations by decoder norms (Anthropic), so the
    decoder is left free (``unit_norm_decoder`` False).

    ``forward`` (training, dense pre-activations) and ``encode`` (inference, sparse) give the same
    latents; see the module docstring for which ops run dense and why.
    """

    architecture = "jumprelu"
    config_class = JumpReLUConfig
    config: JumpReLUConfig

    def _build(self) -> None:
        self.init_weights_()
        if self.config.threshold_parametrization == "direct":
            start = torch.full((self.n_latents,), self.config.threshold_init, dtype=self._init_dtype)
            self.direct_threshold = nn.Parameter(start.to(self._init_device))
        else:
            start = torch.full((self.n_latents,), math.log(self.config.threshold_init), dtype=self._init_dtype)
            self.log_threshold = nn.Parameter(start.to(self._init_device))
        _shared.register_step_counter(self, self._init_device)
        if self.config.target_l0 is not None:
            self.l0_controller = L0Controller(self.config.target_l0, self._init_device)
        self._candidates = DEFAULT_CANDIDATES

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether a training loop should keep decoder rows at unit norm (True for the step penalty)."""
        return self.config.sparsity_loss == "step"

    @property
    def threshold(self) -> torch.Tensor:
        """[n_latents] thresholds: exp(log_threshold), or direct_threshold itself."""
        if self.config.threshold_parametrization == "direct":
            return self.direct_threshold
        return self.log_threshold.exp()

    # ----------------------------------------------------------------------------- forward pieces

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The active latents of x [..., d_in] (pre > threshold), padded to [..., m] with m the
        largest count of any row; empty slots hold value 0 and index -1. Sparse (threshold_encode)."""
        return _shared.shaped(self._latents_above(x, self.threshold.detach()), x.shape[:-1])

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encodes, decodes and scores x [..., d_in]; ``loss`` is the whole objective (module docstring).

        dead_mask: optional [n_latents] bool; restricts the pre-activation loss to those latents.
        A training-mode forward with autograd on advances ``num_steps`` (the warm-up)."""
        cfg = self.config
        rows = self._rows(x)
        if dead_mask is not None:
            _shared.check_dead_mask(dead_mask, self.n_latents, self.device)
        if cfg.threshold_parametrization == "direct" and _shared.is_training_step(self):
            with torch.no_grad():  # projected, not clamped in the graph (that would zero its gradient)
                self.direct_threshold.clamp_(min=0)
        centered = rows - self.b_dec if cfg.apply_b_dec_to_input else rows
        controlled = cfg.target_l0 is not None
        training_step = _shared.is_training_step(self)
        starting = controlled and training_step and not self.l0_controller.is_started()
        if starting:
            cut = self._start_from_batch(rows, centered)
        elif controlled and training_step:
            self._shift_thresholds(self.l0_controller.take_shift())
        pre = centered @ self.W_enc.T + self.b_enc  # [batch, n]: the STE needs every latent's
        theta = self.threshold
        bandwidth = cfg.bandwidth * self.l0_controller.data_scale.to(pre.dtype) if controlled else cfg.bandwidth
        f = _JumpReLU.apply(pre, theta, bandwidth)
        x_hat = f @ self.W_dec + self.b_dec
        recon, mse, fvu = _shared.dense_losses(rows, x_hat)
        acc = fvu.dtype  # penalties summed in float32 (float64): a bfloat16 sum of n 0/1s is inexact
        if cfg.sparsity_loss == "step":
            sparsity = _Step.apply(pre, theta, bandwidth).to(acc).sum(1).mean()
        else:
            scaled = cfg.tanh_scale * f.to(acc) * self.W_dec.to(acc).norm(dim=1)
            sparsity = torch.tanh(scaled).sum(1).mean()
        if controlled:
            if starting:
                self.l0_controller.start(step_initial_coefficient(cut), self._first_scale)
            coefficient = self.l0_controller.coefficient().to(acc)
            if training_step:
                self.l0_controller.update(self._threshold_shift(pre, theta))
        else:
            coefficient = _shared.warmed_up(cfg.l0_coefficient, cfg.l0_warmup_steps, self.num_steps).to(acc)
        loss = recon + coefficient * sparsity
        if cfg.pre_act_coefficient:
            shortfall = (theta.to(acc) - pre.to(acc)).relu() * self.W_dec.to(acc).norm(dim=1)
            if dead_mask is not None:
                shortfall = shortfall * dead_mask
            loss = loss + cfg.pre_act_coefficient * shortfall.sum(1).mean()
        return _shared.dense_output(self, x, f, x_hat, fvu=fvu, mse=mse, loss=loss)

    @torch.no_grad()
    def _start_from_batch(self, rows: torch.Tensor, centered: torch.Tensor) -> float:
        """First training batch with a target L0 (module docstring): b_enc centered (when b_dec is
        not subtracted from the input), data_scale from the batch, and every threshold at the
        uniform value that gives the batch target_l0 active latents (at least 1e-6 * data_scale:
        log-parametrized thresholds must stay > 0). Returns that value."""
        if not self.config.apply_b_dec_to_input:
            center_encoder_bias_(self.W_enc, self.b_enc, self.b_dec)
        self._first_scale = data_scale_of(rows - self.b_dec)
        pre = centered @ self.W_enc.T + self.b_enc
        cut = max(float(uniform_cut(pre, self.config.target_l0)), 1e-6 * self._first_scale)
        if self.config.threshold_parametrization == "direct":
            self.direct_threshold.fill_(cut)
        else:
            self.log_threshold.fill_(math.log(cut))
        return cut

    def _threshold_shift(self, pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The controller's shift of the log thresholds for this batch (l0_controller.log_threshold_shift)."""
        return log_threshold_shift(pre, theta, self.config.target_l0, self.l0_controller.data_scale)

    @torch.no_grad()
    def _shift_thresholds(self, shift: torch.Tensor) -> None:
        """The controller's direct action: every threshold times exp(shift)."""
        if self.config.threshold_parametrization == "direct":
            self.direct_threshold.mul_(shift.exp().to(self.direct_threshold.dtype))
        else:
            self.log_threshold.add_(shift.to(self.log_threshold.dtype))
