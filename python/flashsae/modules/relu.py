"""ReLUSAE: the ReLU sparse autoencoder with an L1 penalty, as trained in Anthropic's April 2024 update
("Circuits Updates - April 2024", section "Training SAEs", transformer-circuits.pub), the setup used
for Scaling Monosemanticity (Templeton et al. 2024).

    f      = relu((x [- b_dec]) W_enc^T + b_enc)      no pre-encoder bias unless apply_b_dec_to_input
    x_hat  = f W_dec + b_dec
    loss   = sum_b |x_b - x_hat_b|^2 / batch  +  lambda(t) * mean_b sum_i f_bi |W_dec_i|

The decoder norms are unconstrained: the penalty weighs each activation by its decoder row's norm
(so shrinking the decoder cannot dodge it), and a training loop must NOT renormalize the decoder
(``unit_norm_decoder`` is False). lambda(t) warms up linearly from 0 over ``l1_warmup_steps`` (the
update: the first 5% of training). Initialization as in the update: decoder rows in random
directions with norm ``decoder_init_norm`` (1.0; the update: 0.05 to 1), encoder = decoder
(W_e = W_d^T in the update's column convention), zero biases. The update also scales activations so that E|x| = sqrt(d_in)
(lambda = 5 there) and clips gradients to norm 1: both are the training loop's job.

Target L0 (``target_l0``): lambda is set by an :class:`~flashsae.modules.l0_controller.L0Controller`
(a PI controller on log lambda driven by the batch L0) instead of l1_coefficient / l1_warmup_steps,
and the first training batch lowers every encoder bias by the same amount, so that this batch has
target_l0 active latents per row (instead of about half of all latents at the update's zero biases).

Which ops run dense and why: training (``forward``) computes the [batch, n_latents] activations and
decodes them with a dense product, because every latent with a positive pre-activation is active
and receives the L1 gradient, and at initialization that is about half of all latents (there is no
k bounding a row). Inference (``encode`` / ``decode``) is sparse: threshold_encode with threshold 0
(padded [..., m] latents) and sparse_decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import boolean, non_negative, non_negative_int, positive_number
from ..ops.threshold_encode import DEFAULT_CANDIDATES
from ..outputs import ForwardOutput, SparseLatents
from ..registry import register
from . import _shared
from .base import SAEConfig
from .l0_controller import (
    RELU_INITIAL_SHRINKAGE,
    L0Controller,
    check_target_l0,
    penalty_coefficient,
    steer_encoder_biases_,
)


@dataclass
class ReLUConfig(SAEConfig):
    """Configuration of a :class:`ReLUSAE` (Anthropic, April 2024). Coefficients are in the update's
    units: the reconstruction term is the squared error summed over features, averaged over rows."""

    l1_coefficient: float = 5.0
    """lambda, the final weight of the decoder-norm-weighted L1 penalty (>= 0; the update: 5 with
    activations scaled to E|x| = sqrt(d_in))."""
    l1_warmup_steps: int = 0
    """Training steps over which lambda rises linearly from 0 (>= 0; 0: no warm-up; the update: 5% of
    all steps). See :mod:`flashsae.modules._shared` for how steps are counted."""
    decoder_init_norm: float = 1.0
    """L2 norm of every decoder (and encoder) row at initialization (> 0; the update: 0.05 to 1).
    1.0, the unit rows of the other architectures, because Adam moves every weight by about lr per
    step whatever its size: flashsae train's learning rate is sized for unit rows (1.85e-3 on the
    demo, about 4% of a weight of a unit row at d = 384), and rows of norm 0.1 moved 10 times as
    fast relative to their size, and started with x_hat ~ 0.01 x (FVU 0.94 after 10 steps). On the
    demo with target L0 32, 0.1 -> 1.0 raised held-out explained variance from 0.783 to 0.816 and
    cut dead latents from 2.4% to 1.1%."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from x before encoding (the update removed this pre-encoder bias; SAELens'
    standard SAE keeps it)."""

    target_l0: float | None = None
    """Mean active latents per row to train for, in (0, n_latents); None: lambda is l1_coefficient
    (with its warm-up). With a target, a controller adapts lambda (l1_coefficient and l1_warmup_steps
    are not used) and the first training batch shifts the encoder bias (module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_l0 = check_target_l0(self.target_l0, self.n_latents)
        self.l1_coefficient = non_negative("l1_coefficient", self.l1_coefficient)
        non_negative_int("l1_warmup_steps", self.l1_warmup_steps)
        self.decoder_init_norm = positive_number("decoder_init_norm", self.decoder_init_norm)
        boolean("apply_b_dec_to_input", self.apply_b_dec_to_input)


@register
class ReLUSAE(_shared.DenseActivationSAE):
    """A ReLU sparse autoencoder with the decoder-norm-weighted L1 penalty (Anthropic, April 2024).

    Args:
        d_in: input width d. n_latents: dictionary size n.
        options: the other :class:`ReLUConfig` fields (l1_coefficient, l1_warmup_steps, ...).
        dtype, device, backend: as for :class:`~flashsae.TopKSAE`.

    Parameters: ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d], ``b_dec`` [d]; buffer
    ``num_steps`` drives the L1 warm-up. ``unit_norm_decoder`` is False: do not call
    normalize_decoder_ / remove_decoder_parallel_grads_ while training this SAE.
    """

    architecture = "relu"
    config_class = ReLUConfig
    config: ReLUConfig
    unit_norm_decoder = False

    def _build(self) -> None:
        self.init_weights_()
        with torch.no_grad():
            self.W_dec.mul_(self.config.decoder_init_norm)
            self.W_enc.mul_(self.config.decoder_init_norm)
        if self.config.target_l0 is not None:
            self.l0_controller = L0Controller(self.config.target_l0, self._init_device)
        _shared.register_step_counter(self, self._init_device)
        self._candidates = DEFAULT_CANDIDATES

    def l1_coefficient_now(self) -> torch.Tensor:
        """lambda at the current step, a float64 scalar tensor: the controller's with a target L0,
        else l1_coefficient after its warm-up."""
        if self.config.target_l0 is not None:
            return self.l0_controller.coefficient()
        return _shared.warmed_up(self.config.l1_coefficient, self.config.l1_warmup_steps, self.num_steps)

    # ----------------------------------------------------------------------------- forward pieces

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The positive latents of x [..., d_in], padded to [..., m] (m = the largest count of any
        row; empty slots: value 0, index -1). Sparse (threshold_encode with threshold 0)."""
        return _shared.shaped(self._latents_above(x, self._zero_threshold()), x.shape[:-1])

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encodes, decodes and scores x [..., d_in]; ``loss`` is the whole objective (module
        docstring). dead_mask is accepted for the common interface and unused (no auxiliary loss).
        A training-mode forward with autograd on advances ``num_steps`` (the warm-up)."""
        rows = self._rows(x)
        if dead_mask is not None:
            _shared.check_dead_mask(dead_mask, self.n_latents, self.device)
        centered = rows - self.b_dec if self.config.apply_b_dec_to_input else rows
        training_step = _shared.is_training_step(self)
        starting = steer_encoder_biases_(self, centered, training_step)
        pre = centered @ self.W_enc.T + self.b_enc  # [batch, n]: see the module docstring
        f = pre.relu()
        x_hat = f @ self.W_dec + self.b_dec
        recon, mse, fvu = _shared.dense_losses(rows, x_hat)
        acc = fvu.dtype
        l1 = (f.to(acc) * self.W_dec.to(acc).norm(dim=1)).sum(1).mean()
        if self.config.target_l0 is not None:
            coefficient = penalty_coefficient(
                self, rows, pre, f, RELU_INITIAL_SHRINKAGE, starting=starting, training_step=training_step
            ).to(acc)
        else:
            coefficient = self.l1_coefficient_now().to(acc)
        loss = recon + coefficient * l1
        return _shared.dense_output(self, x, f, x_hat, fvu=fvu, mse=mse, loss=loss)
