"""GatedSAE: the Gated sparse autoencoder (Rajamanoharan et al. 2024, "Improving Dictionary Learning
with Gated Sparse Autoencoders", arXiv:2404.16014).

Gate and magnitude paths share the encoder directions (the paper's weight tying, r_mag rescales rows):

    x_c      = x - b_dec                                  (x itself with apply_b_dec_to_input=False)
    pi_gate  = x_c W_enc^T + b_enc                       (W_enc = W_gate, b_enc = b_gate)
    pi_mag   = exp(r_mag) * (x_c W_enc^T) + b_mag         (W_mag = exp(r_mag) ⊙ W_gate, row-wise)
    f        = H(pi_gate) * relu(pi_mag)                   H: step, no gradient
    x_hat    = f W_dec + b_dec
    loss     = sum_b |x_b - x_hat_b|^2 / batch                               (reconstruction)
             + lambda(t) * mean_b sum_i relu(pi_gate)_bi                       (L1 on the gate)
             + sum_b |x_b - (relu(pi_gate_b) W_dec' + b_dec')|^2 / batch       (auxiliary)

where W_dec', b_dec' are frozen (detached) copies of the decoder, so the auxiliary loss trains only
the gate path to reconstruct on its own. The decoder rows are kept at unit norm as in the paper
(``unit_norm_decoder`` True: a training loop calls remove_decoder_parallel_grads_ and
normalize_decoder_), which is what makes the unweighted L1 meaningful.

Target L0 (``target_l0``): lambda is set by an :class:`~flashsae.modules.l0_controller.L0Controller`
(a PI controller on log lambda driven by the batch L0) instead of l1_coefficient / l1_warmup_steps,
and the first training batch lowers every gate bias by the same amount, so that this batch opens
target_l0 gates per row (instead of about half of them at zero biases).

Which ops run dense and why: training (``forward``) computes the [batch, n_latents] gate and
magnitude pre-activations (one shared GEMM) and decodes densely, because the L1 and auxiliary terms
touch every latent with a positive gate, about half of them at initialization. Inference (``encode``
/ ``decode``) is sparse: threshold_encode (threshold 0) finds the open gates, their magnitudes follow
from the same pre-activations (x_c W_enc_i = pi_gate_i - b_enc_i), and sparse_decode decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._checks import boolean, non_negative, non_negative_int
from ..ops.threshold_encode import DEFAULT_CANDIDATES, compact_rows
from ..outputs import ForwardOutput, SparseLatents
from ..registry import register
from . import _shared
from .base import SAEConfig
from .l0_controller import (
    GATED_INITIAL_SHRINKAGE,
    L0Controller,
    check_target_l0,
    penalty_coefficient,
    steer_encoder_biases_,
)


@dataclass
class GatedConfig(SAEConfig):
    """Configuration of a :class:`GatedSAE`. Coefficients are in the paper's units: the
    reconstruction terms are squared errors summed over features, averaged over rows."""

    l1_coefficient: float = 0.1
    """lambda, the final weight of the L1 penalty on relu(pi_gate) (>= 0; dictionary_learning's
    default 0.1; the paper sweeps it)."""
    l1_warmup_steps: int = 0
    """Training steps over which lambda rises linearly from 0 (>= 0; 0: no warm-up, as in the
    paper). See :mod:`flashsae.modules._shared` for how steps are counted."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from x before encoding (the paper; SAELens' field of that name can turn it off)."""

    target_l0: float | None = None
    """Mean active latents per row to train for, in (0, n_latents); None: lambda is l1_coefficient
    (with its warm-up). With a target, a controller adapts lambda (l1_coefficient and l1_warmup_steps
    are not used) and the first training batch shifts the encoder bias (module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_l0 = check_target_l0(self.target_l0, self.n_latents)
        self.l1_coefficient = non_negative("l1_coefficient", self.l1_coefficient)
        non_negative_int("l1_warmup_steps", self.l1_warmup_steps)
        boolean("apply_b_dec_to_input", self.apply_b_dec_to_input)


@register
class GatedSAE(_shared.DenseActivationSAE):
    """A Gated sparse autoencoder (Rajamanoharan et al. 2024, arXiv:2404.16014).

    Args:
        d_in: input width d. n_latents: dictionary size n.
        options: the other :class:`GatedConfig` fields (l1_coefficient, l1_warmup_steps, apply_b_dec_to_input).
        dtype, device, backend: as for :class:`~flashsae.TopKSAE`.

    Parameters: ``W_enc`` [n, d] and ``b_enc`` [n] (the gate: W_gate, b_gate), ``r_mag`` [n] and
    ``b_mag`` [n] (the magnitude path), ``W_dec`` [n, d], ``b_dec`` [d]. Init: Gao et al. (unit
    decoder rows, encoder = decoder), r_mag = b_mag = 0 (so both paths start equal). Buffer
    ``num_steps`` drives the optional L1 warm-up.
    """

    architecture = "gated"
    config_class = GatedConfig
    config: GatedConfig

    def _build(self) -> None:
        self.init_weights_()
        n, dtype, device = self.n_latents, self._init_dtype, self._init_device
        self.r_mag = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.b_mag = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        if self.config.target_l0 is not None:
            self.l0_controller = L0Controller(self.config.target_l0, self._init_device)
        _shared.register_step_counter(self, device)
        self._candidates = DEFAULT_CANDIDATES

    # ----------------------------------------------------------------------------- forward pieces

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The nonzero latents f of x [..., d_in], padded to [..., m] (m = the largest count of any
        row; empty slots: value 0, index -1). Sparse: open gates by threshold_encode (threshold 0),
        magnitudes from their pre-activations (in bfloat16 / float16 with one extra rounding)."""
        gate, indices = self._latents_above(x, self._zero_threshold())
        open_gate = indices >= 0
        slot = indices.clamp_min(0).long()
        projection = gate - self.b_enc[slot]  # x_c . W_enc_i
        magnitude = (self.r_mag.exp()[slot] * projection + self.b_mag[slot]).relu()
        latents = compact_rows(magnitude, indices, open_gate & (magnitude > 0))
        return _shared.shaped(latents, x.shape[:-1])

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encodes, decodes and scores x [..., d_in]; ``loss`` is the whole objective (module
        docstring). dead_mask is accepted for the common interface and unused.
        A training-mode forward with autograd on advances ``num_steps`` (the warm-up)."""
        rows = self._rows(x)
        if dead_mask is not None:
            _shared.check_dead_mask(dead_mask, self.n_latents, self.device)
        centered = rows - self.b_dec if self.config.apply_b_dec_to_input else rows
        projection = centered @ self.W_enc.T  # [batch, n], shared by both paths
        training_step = _shared.is_training_step(self)
        starting = steer_encoder_biases_(self, centered, training_step)
        pi_gate = projection + self.b_enc
        pi_mag = self.r_mag.exp() * projection + self.b_mag
        f = (pi_gate > 0) * pi_mag.relu()
        x_hat = f @ self.W_dec + self.b_dec
        recon, mse, fvu = _shared.dense_losses(rows, x_hat)
        acc = fvu.dtype
        gate_act = pi_gate.relu()
        l1 = gate_act.to(acc).sum(1).mean()
        via_gate = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        aux, _, _ = _shared.dense_losses(rows, via_gate)
        if self.config.target_l0 is not None:
            coefficient = penalty_coefficient(
                self, rows, pi_gate, gate_act, GATED_INITIAL_SHRINKAGE, starting=starting, training_step=training_step
            )
        else:
            coefficient = _shared.warmed_up(self.config.l1_coefficient, self.config.l1_warmup_steps, self.num_steps)
        loss = recon + coefficient.to(acc) * l1 + aux
        return _shared.dense_output(self, x, f, x_hat, fvu=fvu, mse=mse, loss=loss)
