"""L0Controller: steers a penalty-based SAE (JumpReLU, ReLU-L1, Gated) during training so that its
L0 (mean active latents per row) reaches a target, by adapting its sparsity coefficient lambda.

Each training step gives the error e, the log of the ratio of the batch's L0 to the target:

    e_t          = clamp(log((L0_t + 1) / (target + 1)), -1, 1)
    log lambda_t = clamp(log lambda_{t-1} + COEFFICIENT_GAIN * e_t,  log lambda_0 +- MAX_DECADES decades)
    shift_t      = SHIFT_GAIN * e_t

lambda (the slow loop) is the integral of the error in log space; ``shift`` (the fast loop) is
applied by the architecture directly to its sparsity parameters: every JumpReLU threshold is
multiplied by exp(shift), every ReLU / Gated encoder bias lowered by shift times the latent's
pre-activation scale. Both are integral actions on the same error, at two speeds, for a reason
measured on the demo (MiniLM, 256 steps of Adam at lr 1.9e-3): Adam moves each encoder weight by
up to lr per step, which moves a pre-activation by up to lr * |x|_1 (~1 standard deviation per
step at d = 384), while a log-parametrized threshold moves by lr (0.2%) per step. A controller on
lambda alone therefore cannot follow the encoder: its L0 fell from 32 to 6 within 40 steps. The
direct shift follows it within a few steps; lambda meanwhile moves to where the gradients keep the
thresholds (biases) in place on their own (a steady shift means a steady error, which moves
lambda until the gradient drift it compensates is gone), so the shift fades as training settles.

Why each piece:
    * log space: the coefficient that gives an L0 spans decades across data sets, scales and
      architectures, and a multiplicative step is as fast at every scale.
    * the error is a log ratio (+1 so that L0 = 0 stays finite) clamped to +-1: a batch with 10x the
      target moves no faster than one with 2.7x, so a burst cannot throw lambda decades away.
    * the clamp of log lambda is the anti-windup: while it holds, no error accumulates beyond it.

The architectures also start at the target (see their modules): on the first training batch a
uniform threshold (JumpReLU) or encoder-bias offset (ReLU, Gated) is set so that this batch's L0 is
the target (:func:`uniform_cut`), and lambda starts at a balance estimated on that batch
(:func:`step_initial_coefficient`, :func:`l1_initial_coefficient`), in the data's own units, so no
setting depends on the scale of the data.

State: ``log_coefficient``, ``log_initial`` (the anti-windup range's center), ``data_scale`` (the
first batch's per-coordinate root-mean-square of x - b_dec: the unit of pre-activations) and
``pending_shift`` (float64 scalar buffers) and ``started`` (bool buffer: whether the first-batch initialization has run). They are
saved and loaded with the SAE's state dict, so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import positive_number

#: Gain of log lambda per unit of log-ratio error per step: a decade in ~115 steps at full error.
COEFFICIENT_GAIN = 0.02
#: Gain of the direct shift (log threshold, or bias in pre-activation standard deviations) per
#: unit of error per step: 5% per step at full error.
SHIFT_GAIN = 0.05
#: Largest |error| a single batch contributes (a log ratio).
MAX_ERROR = 1.0
#: lambda stays within initial * 10^(+-MAX_DECADES) (the anti-windup clamp).
MAX_DECADES = 8.0
#: The initial L1 lambda shrinks the first batch's typical active latent by this share of its value.
L1_INITIAL_SHRINKAGE = 0.1


class L0Controller(nn.Module):
    """The controller of a sparsity coefficient and a direct shift (module docstring).

    Args:
        target_l0: the L0 to reach (> 0).
        device: of the state buffers.

    The owner calls :meth:`start` with the initial lambda on its first training batch, then
    :meth:`update` after every training forward.
    """

    def __init__(self, target_l0: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.target_l0 = positive_number("target_l0", target_l0)
        self.register_buffer("log_coefficient", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("log_initial", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("data_scale", torch.ones((), dtype=torch.float64, device=device))
        self.register_buffer("pending_shift", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool, device=device))
        self._started = False  # host copy of `started`, so a started controller costs no sync

    def is_started(self) -> bool:
        """Whether :meth:`start` has run (reads the buffer until it is True, then a host flag)."""
        if not self._started:
            self._started = bool(self.started)
        return self._started

    @torch.no_grad()
    def start(self, initial_coefficient: float, data_scale: float) -> None:
        """Sets lambda to its initial value (> 0), the anti-windup range around it, and data_scale
        (> 0; the owner's unit of pre-activations, see :func:`data_scale_of`)."""
        initial = positive_number("initial_coefficient", initial_coefficient)
        self.data_scale.fill_(positive_number("data_scale", data_scale))
        self.log_coefficient.fill_(math.log(initial))
        self.log_initial.fill_(math.log(initial))
        self.started.fill_(True)
        self._started = True

    def coefficient(self) -> torch.Tensor:
        """lambda now, a float64 scalar tensor."""
        return self.log_coefficient.exp()

    @torch.no_grad()
    def update(self, l0: torch.Tensor) -> torch.Tensor:
        """One controller step from the batch's L0 (a scalar tensor; no host sync): updates lambda
        and sets ``pending_shift``, which the architecture applies before its next training forward
        (:meth:`take_shift`; not in this step: the parameters are saved for backward)."""
        ratio = (l0.detach().to(torch.float64) + 1) / (self.target_l0 + 1)
        error = ratio.log().clamp(-MAX_ERROR, MAX_ERROR)
        span = MAX_DECADES * math.log(10)
        moved = self.log_coefficient + COEFFICIENT_GAIN * error
        self.log_coefficient.copy_(torch.minimum(torch.maximum(moved, self.log_initial - span), self.log_initial + span))
        self.pending_shift.copy_(SHIFT_GAIN * error)

    @torch.no_grad()
    def take_shift(self) -> torch.Tensor:
        """The pending shift (a float64 scalar tensor), zeroed in the buffer."""
        shift = self.pending_shift.clone()
        self.pending_shift.zero_()
        return shift

    def extra_repr(self) -> str:
        return f"target_l0={self.target_l0}"


@torch.no_grad()
def center_encoder_bias_(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> None:
    """b_enc -= W_enc b_dec: an encoder that does not subtract b_dec from its input starts as one
    that does. Without it a latent's pre-activations are offset by b_dec . W_enc_i (the data's mean
    along the latent: on the demo's MiniLM activations several standard deviations), so one uniform
    cut would leave the latents aligned with the mean always on and those opposed to it never."""
    b_enc.sub_((W_enc.to(torch.float32) @ b_dec.to(torch.float32)).to(b_enc.dtype))


def uniform_cut(pre: torch.Tensor, target_l0: float) -> float:
    """The value c such that ``(pre > c)`` holds for target_l0 entries per row of `pre` [rows, n]
    on average: the midpoint between the (rows * target)-th and the next largest entries."""
    rows, n = pre.shape
    count = min(max(1, round(rows * target_l0)), rows * n - 1)
    top = torch.topk(pre.detach().reshape(-1).float(), count + 1).values
    return float((top[count - 1] + top[count]) / 2)


def check_target_l0(value: object, n_latents: int) -> float | None:
    """target_l0 of a config: None, or a number in (0, n_latents)."""
    if value is None:
        return None
    target = positive_number("target_l0", value)
    if target >= n_latents:
        raise ValueError(f"target_l0: expected a number in (0, n_latents={n_latents}), got {value!r}")
    return float(target)


def step_initial_coefficient(cut: float) -> float:
    """The initial lambda of an L0 (step) penalty: cut^2, with cut the first batch's uniform
    threshold. A latent whose pre-activation sits at the threshold, with its decoder row along the
    residual, lowers the squared error by cut^2 when it fires, so at lambda = cut^2 the latents at
    the threshold are exactly worth their cost: the threshold starts in balance."""
    return cut * cut if cut > 0 and math.isfinite(cut) else 1.0


def l1_initial_coefficient(residual: torch.Tensor, W_dec: torch.Tensor, active: torch.Tensor) -> float:
    """The initial lambda of a decoder-norm-weighted (or unit-decoder) L1 penalty:
    2 * L1_INITIAL_SHRINKAGE * the mean projection of the residual [rows, d] on the unit decoder
    rows of the active (row, latent) pairs (`active` [rows, n] bool). With |x - x_hat - f w|^2 +
    lambda f |w| the optimal f is (residual . w_unit) - lambda / 2, so this lambda starts by
    shrinking the typical active latent by L1_INITIAL_SHRINKAGE of its value."""
    acc = torch.promote_types(residual.dtype, torch.float32)
    unit = torch.nn.functional.normalize(W_dec.detach().to(acc), dim=1)
    projection = residual.detach().to(acc) @ unit.T
    mean = float(projection[active].mean()) if bool(active.any()) else 0.0
    value = 2 * L1_INITIAL_SHRINKAGE * mean
    return value if value > 0 and math.isfinite(value) else 1.0


def data_scale_of(residual: torch.Tensor) -> float:
    """The per-coordinate root-mean-square of a batch of residuals x - b_dec [rows, d]: the standard
    deviation of their projection on a random unit direction, the scale of pre-activations (1.0 for
    an all-zero batch)."""
    values = residual.detach().to(torch.promote_types(residual.dtype, torch.float32))
    scale = float(values.pow(2).mean().sqrt())
    return scale if scale > 0 and math.isfinite(scale) else 1.0


@torch.no_grad()
def lower_biases_(b_enc: torch.Tensor, W_enc: torch.Tensor, shift: torch.Tensor, data_scale: torch.Tensor) -> None:
    """The shift of an encoder-bias architecture: b_enc_i -= shift * |W_enc_i| * data_scale (shift in
    standard deviations of latent i's pre-activation)."""
    scale = W_enc.detach().to(torch.float32).norm(dim=1) * data_scale.to(torch.float32)
    b_enc.sub_((shift.to(torch.float32) * scale).to(b_enc.dtype))
