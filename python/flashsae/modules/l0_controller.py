"""L0Controller: steers a penalty-based SAE (JumpReLU, ReLU-L1, Gated) during training so that its
L0 (mean active latents per row) reaches a target, by adapting its sparsity coefficient lambda.

Each training batch gives the shift s that would have given it exactly the target L0: the uniform
change of the sparsity parameters (in the log of every JumpReLU threshold, or in every ReLU / Gated
encoder bias counted in standard deviations of the latent's pre-activation) such that
target_l0 * rows pre-activations clear them (:func:`uniform_cut` on the batch's pre-activations).
Two loops act on it:

    fast:  the architecture applies FAST_GAIN * s before its next training forward (all
           thresholds times exp(0.3 s), or every bias lowered by 0.3 s standard deviations);
    slow:  log lambda_t = clamp(log lambda_{t-1} + COEFFICIENT_GAIN * clamp(s_t, -1, 1),
                                log lambda_0 +- MAX_DECADES decades)

lambda is the integral of the shift in log space: while the fast loop keeps raising the thresholds
(s > 0) the penalty is too weak to hold them against the reconstruction gradient, and lambda grows
until the gradients keep them in place on their own, so the shifts fade as training settles.

Why both, measured on the demo (MiniLM, 256 steps of Adam at lr 1.9e-3): Adam moves each encoder
weight by up to lr per step, which moves a pre-activation by up to lr * |x|_1 (~0.5 standard
deviations per step at d = 384), while a log-parametrized threshold moves by lr (0.2%) per step.
A controller on lambda alone cannot follow the encoder: JumpReLU's L0 fell from 32 to 6 within 40
steps, and an error-proportional shift of at most 0.05 standard deviations a step let Gated's L0
run from 32 to 1547 in 10 steps. The batch's own cut follows such a drift within a few steps.

Why each piece:
    * log space: the coefficient that gives an L0 spans decades across data sets, scales and
      architectures, and a multiplicative step is as fast at every scale.
    * the slow loop's input is clamped to +-1: one odd batch moves lambda by at most
      COEFFICIENT_GAIN in log.
    * the clamp of log lambda is the anti-windup: while it holds, no error accumulates beyond it.

The architectures also start at the target (see their modules): the first training batch applies
its cut at once, and lambda starts at a balance estimated on that batch
(:func:`step_initial_coefficient`, :func:`l1_initial_coefficient`), in the data's own units, so no
setting depends on the scale of the data.

State: ``log_coefficient``, ``log_initial`` (the anti-windup range's center), ``data_scale`` (the
first batch's per-coordinate root-mean-square of x - b_dec: the unit of pre-activations) and
``pending_shift`` (float64 scalar buffers) and ``started`` (bool buffer: whether the first-batch
initialization has run). They are saved and loaded with the SAE's state dict, so a resumed run
continues exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import positive_number

#: Gain of log lambda per unit of shift per step: a decade in ~46 steps at full shift.
COEFFICIENT_GAIN = 0.05
#: Share of each batch's shift that the fast loop applies: the whole of it made JumpReLU and Gated
#: chase every batch's noise (synthetic known-answer runs: Gated recovered 83% on one of 3 seeds
#: with 1.0, 96-100% on all with 0.3); 0.3 still closes 97% of a gap within 10 steps.
FAST_GAIN = 0.3
#: Largest |shift| a single batch contributes to the slow loop.
MAX_SHIFT = 1.0
#: lambda stays within initial * 10^(+-MAX_DECADES) (the anti-windup clamp).
MAX_DECADES = 8.0
#: The initial L1 lambda shrinks the first batch's typical active latent by this share of its value.
#: It also sets the final lambda: the fast loop (on the biases) and the slow loop (on log lambda)
#: integrate the same shift, so how the work splits between them is whatever it was at the start,
#: and lambda stays near its initial value (Gated on the demo: 1.54 at the start, 1.91 after 256
#: steps). ReLU's penalty shrinks the values it reconstructs with, so it wants a weak one: on the
#: synthetic known-answer data (3 seeds) it ended at FVU 0.17-0.24 with 0.1 and 0.40-0.42 with 0.3.
#: Gated's penalty acts only on the gate path (its magnitudes are free): a strong one holds the
#: gate biases with the gradients instead of the controller's shifts fighting the auxiliary loss
#: every step. Demo, --target-l0 32, held-out explained variance / L0 / dead: 0.651 / 33.9 / 11.4%
#: with 0.1, 0.760 / 34.8 / 5.6% with 0.3, 0.847 / 37.0 / 0.0% with 1.0.
RELU_INITIAL_SHRINKAGE = 0.1
GATED_INITIAL_SHRINKAGE = 1.0


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
    def update(self, shift: torch.Tensor) -> None:
        """One controller step from the batch's shift (a scalar tensor, the owner's
        :func:`uniform_cut` of this batch; no host sync): moves lambda (the slow loop) and keeps the
        shift in ``pending_shift``, which the architecture applies before its next training forward
        (:meth:`take_shift`; not in this step: the parameters are saved for backward)."""
        shift = shift.detach().to(torch.float64)
        span = MAX_DECADES * math.log(10)
        moved = self.log_coefficient + COEFFICIENT_GAIN * shift.clamp(-MAX_SHIFT, MAX_SHIFT)
        low, high = self.log_initial - span, self.log_initial + span
        self.log_coefficient.copy_(torch.minimum(torch.maximum(moved, low), high))
        self.pending_shift.copy_(FAST_GAIN * shift)

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


def uniform_cut(pre: torch.Tensor, target_l0: float) -> torch.Tensor:
    """The value c (a float32 or float64 scalar tensor; no host sync) such that ``(pre > c)`` holds
    for target_l0 entries per row of `pre` [rows, n] on average: the midpoint between the
    (rows * target)-th and the next largest entries."""
    rows, n = pre.shape
    count = min(max(1, round(rows * target_l0)), rows * n - 1)
    flat = pre.detach().reshape(-1)
    top = torch.topk(flat.to(torch.promote_types(flat.dtype, torch.float32)), count + 1).values
    return (top[count - 1] + top[count]) / 2


@torch.no_grad()
def log_threshold_shift(
    pre: torch.Tensor, theta: torch.Tensor, target_l0: float, data_scale: torch.Tensor
) -> torch.Tensor:
    """The shift of a JumpReLU's log thresholds: log of the factor that, applied to every threshold
    theta [n], gives the pre-activations `pre` [rows, n] target_l0 active latents per row (clamped to
    +-1: a batch with fewer positive pre-activations than the target lowers the thresholds by at
    most a factor e per step). Thresholds below 1e-30 * data_scale count as that."""
    acc = torch.promote_types(pre.dtype, torch.float32)
    floor = 1e-30 * data_scale.to(acc)
    ratio = pre.detach().to(acc) / torch.maximum(theta.detach().to(acc), floor)
    cut = uniform_cut(ratio, target_l0)
    return cut.clamp_min(math.exp(-1.0)).log().clamp(-1.0, 1.0)


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


def l1_initial_coefficient(
    residual: torch.Tensor, W_dec: torch.Tensor, active: torch.Tensor, shrinkage: float
) -> float:
    """The initial lambda of a decoder-norm-weighted (or unit-decoder) L1 penalty:
    2 * shrinkage * the mean projection of the residual [rows, d] on the unit decoder
    rows of the active (row, latent) pairs (`active` [rows, n] bool). With |x - x_hat - f w|^2 +
    lambda f |w| the optimal f is (residual . w_unit) - lambda / 2, so this lambda starts by
    shrinking the typical active latent by `shrinkage` of its value."""
    acc = torch.promote_types(residual.dtype, torch.float32)
    unit = torch.nn.functional.normalize(W_dec.detach().to(acc), dim=1)
    projection = residual.detach().to(acc) @ unit.T
    mean = float(projection[active].mean()) if bool(active.any()) else 0.0
    value = 2 * shrinkage * mean
    return value if value > 0 and math.isfinite(value) else 1.0


def data_scale_of(residual: torch.Tensor) -> float:
    """The per-coordinate root-mean-square of a batch of residuals x - b_dec [rows, d]: the standard
    deviation of their projection on a random unit direction, the scale of pre-activations (1.0 for
    an all-zero batch)."""
    values = residual.detach().to(torch.promote_types(residual.dtype, torch.float32))
    scale = float(values.pow(2).mean().sqrt())
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def bias_units(W_enc: torch.Tensor, data_scale: torch.Tensor) -> torch.Tensor:
    """[n] float32: |W_enc_i| * data_scale, the standard deviation of latent i's pre-activation for
    isotropic data of that scale: the unit of an encoder-bias architecture's shift."""
    return (W_enc.detach().to(torch.float32).norm(dim=1) * data_scale.to(torch.float32)).clamp_min(1e-30)


@torch.no_grad()
def bias_shift(pre: torch.Tensor, W_enc: torch.Tensor, data_scale: torch.Tensor, target_l0: float) -> torch.Tensor:
    """The shift s (in bias_units) such that lowering every bias by s units gives the batch's
    pre-activations [rows, n] target_l0 active latents per row."""
    return uniform_cut(pre.detach().to(torch.float32) / bias_units(W_enc, data_scale), target_l0)


@torch.no_grad()
def lower_biases_(b_enc: torch.Tensor, W_enc: torch.Tensor, shift: torch.Tensor, data_scale: torch.Tensor) -> None:
    """The fast loop of an encoder-bias architecture: b_enc_i -= shift * bias_units_i."""
    b_enc.sub_((shift.to(torch.float32) * bias_units(W_enc, data_scale)).to(b_enc.dtype))


def steer_encoder_biases_(sae: nn.Module, centered: torch.Tensor, training_step: bool) -> bool:
    """Before the forward of an encoder-bias architecture with a target L0 (ReLU, Gated): on its first
    training batch b_enc is centered (when b_dec is not subtracted from the input, see
    center_encoder_bias_) and then lowered uniformly so that this batch has target_l0 active latents
    per row; on later training batches the controller's pending shift is applied (lower_biases_).
    Returns whether this batch starts the controller (penalty_coefficient then starts it)."""
    controller = getattr(sae, "l0_controller", None)
    if controller is None or not training_step:
        return False
    if controller.is_started():
        lower_biases_(sae.b_enc, sae.W_enc, controller.take_shift(), controller.data_scale)
        return False
    with torch.no_grad():
        if not sae.config.apply_b_dec_to_input:
            center_encoder_bias_(sae.W_enc, sae.b_enc, sae.b_dec)
        sae.b_enc.sub_(uniform_cut(centered @ sae.W_enc.T + sae.b_enc, sae.config.target_l0))
    return True


def penalty_coefficient(
    sae: nn.Module,
    rows: torch.Tensor,
    pre: torch.Tensor,
    penalized: torch.Tensor,
    initial_shrinkage: float,
    *,
    starting: bool,
    training_step: bool,
) -> torch.Tensor:
    """lambda of this step from the controller of an encoder-bias architecture: started on the first
    batch (lambda from l1_initial_coefficient over the latents `penalized` > 0, the data scale from
    the residual), then the fast loop's next shift measured on this batch's pre-activations `pre`."""
    controller = sae.l0_controller
    if starting:
        residual = rows - sae.b_dec
        initial = l1_initial_coefficient(residual, sae.W_dec, penalized > 0, initial_shrinkage)
        controller.start(initial, data_scale_of(residual))
    coefficient = controller.coefficient()
    if training_step:
        controller.update(bias_shift(pre, sae.W_enc, controller.data_scale, sae.config.target_l0))
    return coefficient
