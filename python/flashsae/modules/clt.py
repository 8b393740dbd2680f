"""CrossLayerTranscoder: one dictionary per layer that reads that layer's input site and writes to
the output sites of that layer and of every later one (a cross-layer transcoder, CLT: Ameisen et
al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language Models"; the replacement
model of attribution graphs, the layout circuit-tracer reads).

    latents_i = act(x_i W_enc_i^T + b_enc_i)                     x_i: layer i's input  [..., d_in]
    y_hat_j   = b_dec_j + sum_{i <= j} latents_i W_dec_i[:, j - i]  (+ x_j W_skip_j^T)
    loss      = mean_j fvu(y_j, y_hat_j) + auxk_alpha * auxk_loss   y_j: layer j's target [..., d_out]

``act`` is one of (``activation``):

- ``"topk"``: the k largest of relu(pre) per row and layer; AuxK with a dead mask.
- ``"batchtopk"``: in training the rows * k largest of relu(pre) over the batch, per layer (Bussmann
  et al. 2024; :func:`~flashsae.ops.batch_topk`), AuxK as TopK; at inference (eval mode) a JumpReLU
  with one threshold per layer, the EMA of each batch's smallest selected activation, set by the
  first training batch (BatchTopKSAE's estimator, ``threshold_beta``); the buffer
  ``threshold_estimate`` [L] (-1: not estimated) holds them.
- ``"jumprelu"``: pre where pre > threshold_i, trained thresholds (parameters ``threshold_i`` [n],
  kept >= 0: circuit-tracer's values themselves) with an L0 penalty lambda_i * S_i,
  S_i = mean_rows #(active latents of layer i), through JumpReLUSAE's straight-through estimators
  (rectangle kernel, bandwidth eps), applied to sparse slots (:mod:`flashsae.modules.slot_jumprelu`).
- ``"relu"``: relu(pre) (thresholds 0) with an L1 penalty lambda_i * mean_rows sum_f f |W_dec_i[f]|,
  the decoder-row norm taken as a constant of each step (its gradient would be a dense one for the
  whole decoder, which the row-sparse optimizer path does not take).

The penalized ones add ``sparsity_loss = sum_i lambda_i S_i`` to the loss. With ``target_l0`` each
layer has an :class:`~flashsae.modules.l0_controller.L0Controller` (``l0_controllers[i]``): its first
training batch centres b_enc_i on the batch mean of x_i and cuts the thresholds (JumpReLU) or the
encoder biases (ReLU) to give that batch target_l0 active latents; each later batch applies the
controller's pending shift (thresholds times exp(shift); biases lowered by shift * |W_enc_f| *
data_scale) and measures the next one, while lambda_i follows the shifts in log space (the module
l0_controller). The SAEs measure the cut on the batch's dense pre-activations; a CLT measures it on
CUT_SAMPLE_ROWS rows spread over the batch (a no-grad [128, n] product per layer), so no [batch, n]
tensor exists. The bandwidth then counts in units of data_scale, the first batch's per-coordinate
root-mean-square of x_i - mean, so one default works at any scale. Controller state lives in buffers
and resumes exactly. The encoders read x_i itself (no decoder bias subtracted): b_dec lives in the
output space.

Every op is sparse. Encoder i is one :func:`~flashsae.ops.topk_encode` (BatchTopK in training:
:func:`~flashsae.ops.batch_topk`; JumpReLU / ReLU and BatchTopK at inference:
:func:`~flashsae.ops.threshold_encode`, in JumpReLU training at threshold - eps / 2 so that the
estimator's window is among the slots): the [batch, n] pre-activations are never written. Decoder i
is stored as ``W_dec_i`` [n, (L - i) * d_out]: latent-major, the contiguous memory of circuit-tracer's
[n, L - i, d_out] (:meth:`CrossLayerTranscoder.decoder` gives that view), so the latents of layer i
decode to all their target layers in one :func:`~flashsae.ops.sparse_decode` ([batch, (L - i) * d_out],
backward over the active rows only); the output of target j sums the j - i'th slice of each. No
[batch, L * n] tensor and no dense per-layer latent tensor exists in forward or backward, and with
:class:`flashsae.optim.SparseAdam` no [n, d] gradient either (each matrix is a 2-D parameter, so the
row-sparse gradient path applies as it does to an SAE).

Inputs are stacked by layer: ``x`` [..., L, d_in], ``y`` [..., L, d_out]; latents come back as
[..., L, k] (indices local to each layer's dictionary).

AuxK (TopK and BatchTopK in training, with ``dead_mask`` [L, n]; JumpReLU / ReLU accept and ignore
it): per layer the aux_k largest pre-activations among its dead latents reconstruct, through that
layer's decoder, the residual y - y_hat of every layer it writes to (detached); normalized by that
residual's variance, scaled by min(n_dead / aux_k, 1) as in sparsify, averaged over the layers.

Initialization follows flashsae's (sparsify's) transcoder: unit-norm random encoder rows, zero
decoders and biases. Decoder rows are not renormalized in training (``unit_norm_decoder = False``);
:meth:`CrossLayerTranscoder.normalize_decoder_` rescales a latent's row (its decoder vectors to all
of its target layers together) on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

import math

from .._checks import boolean, choice, fraction, non_negative, positive_int, positive_number
from ..ops import sparse_decode, topk_encode
from ..ops._common import acc_dtype, row_blocks
from ..ops.batch_topk import batch_topk
from ..ops.threshold_encode import threshold_encode
from ..outputs import SparseLatents
from ..registry import register
from . import _shared, base
from .l0_controller import (
    L0Controller,
    bias_shift,
    center_encoder_bias_,
    check_target_l0,
    data_scale_of,
    log_threshold_shift,
    lower_biases_,
    step_initial_coefficient,
    uniform_cut,
)
from .slot_jumprelu import slot_jumprelu, slot_step
from .topk import TOPK_PRECISIONS
from .base import ConfigField, SAE, SAEConfig, sample_center, unit_rows

#: Values of CrossLayerTranscoderConfig.activation.
CLT_ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
#: Activations whose L0 a controller steers (target_l0) through a sparsity penalty.
PENALIZED = ("jumprelu", "relu")
#: Rows of each batch (spread over it) on which the controller measures its cut: a no-grad
#: [128, n] product per layer, ~3% of the encode at batch 4096. 128 rows at L0 32 put 4096
#: activations above the cut, so its count is known to ~1.6% (1 / sqrt(4096)).
CUT_SAMPLE_ROWS = 128
#: bandwidth of the JumpReLU estimator without a target L0 (data units, JumpReLUSAE's default) and
#: with one (units of each layer's data_scale, JumpReLUSAE's relative default).
DEFAULT_BANDWIDTH, DEFAULT_RELATIVE_BANDWIDTH = 0.001, 0.1
#: The initial L1 lambda of a ReLU CLT shrinks a typical contribution by this share (as ReLUSAE).
RELU_INITIAL_SHRINKAGE = 0.1


@dataclass
class CrossLayerTranscoderConfig(SAEConfig):
    """Configuration of a :class:`CrossLayerTranscoder`. d_in is the width of each layer's input
    site, n_latents the dictionary size of each layer (L * n_latents latents in all)."""

    n_layers: int | None = None
    """Number of layers L (required): L encoders, L * (L + 1) / 2 decoder blocks."""
    d_out: int | None = None
    """Width of each layer's target site; None means d_in."""
    activation: str = "topk"
    """"topk" (the k largest per row and layer; AuxK), "batchtopk" (the batch's rows * k largest per
    layer in training, a per-layer threshold at inference; AuxK), "jumprelu" (per-latent trained
    thresholds threshold_i, an L0 penalty) or "relu" (an L1 penalty; thresholds 0). See the module
    docstring."""
    k: int = 32
    """Active latents per row and layer ("topk"; "batchtopk": on average), 1 <= k <= n_latents."""
    target_l0: float | None = None
    """"jumprelu" / "relu": the mean active latents per row and layer to train for, in (0, n_latents):
    one controller per layer adapts that layer's sparsity coefficient (sparsity_coefficient is then
    unused) and bandwidth counts in units of the layer's data scale. None: the fixed
    sparsity_coefficient. "topk" / "batchtopk": None or k (k is their L0)."""
    sparsity_coefficient: float = 1.0
    """lambda of "jumprelu" (L0 penalty) and "relu" (L1 penalty) without target_l0 (>= 0), in the
    loss's units (fvu averaged over the layers)."""
    bandwidth: float | None = None
    """eps of the JumpReLU threshold estimator (> 0). None: 0.001 in the data's units without
    target_l0, 0.1 units of each layer's data scale with it (as JumpReLUConfig.bandwidth)."""
    threshold_init: float = 0.001
    """Initial JumpReLU threshold without target_l0 (> 0; with it the first batch sets them)."""
    threshold_beta: float = 0.99
    """"batchtopk": decay of each layer's inference-threshold moving average, in [0, 1) (as
    BatchTopKConfig.threshold_beta; the first training batch sets it)."""
    aux_k: int | None = None
    """Size of each layer's AuxK selection among its dead latents; None means min(d_out // 2,
    n_latents). Used only when forward gets a dead_mask."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss in ``loss = mean fvu + auxk_alpha * auxk_loss`` (>= 0)."""
    skip: bool = False
    """A linear skip connection per layer, y_hat_j += x_j W_skip_j^T (W_skip_j [d_out, d_in])."""
    cross_layer: bool = True
    """True: layer i's latents write to layer i and every later layer (a CLT). False: to layer i
    only, W_dec_i [n, d_out]: L per-layer transcoders trained together (circuit-tracer's per-layer
    transcoder set, flashsae.io.transcoder_set)."""
    precision: str = "exact"
    """How the TopK encoders score latents, as TopKConfig.precision: "exact", "certified" (exact's
    results from bfloat16 GEMM scores and a proven bound), "fast" or "auto" (certified where this CPU's bfloat16 GEMM is fast, else exact)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_layers", self.n_layers)
        if self.d_out is None:
            self.d_out = self.d_in
        positive_int("d_out", self.d_out)
        choice("activation", self.activation, CLT_ACTIVATIONS)
        _shared.check_topk_fields(self, reconstruction_width=self.d_out)
        self.target_l0 = check_target_l0(self.target_l0, self.n_latents)
        if self.activation not in PENALIZED and self.target_l0 not in (None, self.k):
            raise ValueError(
                f"target_l0: a {self.activation} CLT's L0 is k={self.k}; got target_l0={self.target_l0} "
                "(set k, or use activation 'jumprelu' / 'relu')"
            )
        self.sparsity_coefficient = non_negative("sparsity_coefficient", self.sparsity_coefficient)
        if self.bandwidth is None:
            self.bandwidth = DEFAULT_BANDWIDTH if self.target_l0 is None else DEFAULT_RELATIVE_BANDWIDTH
        self.bandwidth = positive_number("bandwidth", self.bandwidth)
        self.threshold_init = positive_number("threshold_init", self.threshold_init)
        self.threshold_beta = fraction("threshold_beta", self.threshold_beta)
        self.auxk_alpha = non_negative("auxk_alpha", self.auxk_alpha)
        boolean("skip", self.skip)
        boolean("cross_layer", self.cross_layer)
        choice("precision", self.precision, TOPK_PRECISIONS)


class CLTOutput(NamedTuple):
    """What :meth:`CrossLayerTranscoder.forward` returns: ForwardOutput's fields (same meaning; fvu
    and mse averaged over the layers) and the per-layer figures."""

    x_hat: torch.Tensor
    """[..., L, d_out] prediction of every layer's target."""
    latents: SparseLatents
    """[..., L, slots] per-layer latents (indices into that layer's dictionary; -1 = empty slot)."""
    fvu: torch.Tensor
    """Mean over the layers of each layer's fraction of variance unexplained."""
    mse: torch.Tensor
    """Mean squared error over batch, layers and features."""
    auxk_loss: torch.Tensor
    """AuxK loss averaged over the layers (0 without a dead_mask)."""
    loss: torch.Tensor
    """The training objective: fvu + auxk_alpha * auxk_loss."""
    fvu_per_layer: torch.Tensor
    """[L] each target layer's fraction of variance unexplained (detached)."""
    sparsity_loss: torch.Tensor | None = None
    """"jumprelu" / "relu" CLTs: the penalty term in ``loss``, sum over layers of lambda_i * S_i
    (None for the other activations)."""


@register
class CrossLayerTranscoder(SAE):
    """A cross-layer transcoder (module docstring).

    ``CrossLayerTranscoder(n_layers, d_in, n_latents, k=32, ...)`` or
    ``flashsae.create("clt", n_layers=L, d_in=d, n_latents=n, k=k)``; options as in
    :class:`CrossLayerTranscoderConfig`; dtype, device, backend as for :class:`~flashsae.TopKSAE`.

    Parameters per layer i: ``W_enc_i`` [n, d_in], ``b_enc_i`` [n], ``W_dec_i`` [n, (L - i) * d_out]
    (view [n, L - i, d_out] by :meth:`decoder`), ``b_dec_i`` [d_out], with skip ``W_skip_i``
    [d_out, d_in]; buffers ``threshold_i`` [n] (JumpReLU / ReLU) -- circuit-tracer's tensor names.

    A training loop passes inputs and targets stacked by layer: ``out = clt(x, y, dead_mask=...)``.
    """

    architecture = "clt"
    config_class = CrossLayerTranscoderConfig
    config: CrossLayerTranscoderConfig
    #: Decoder rows are free (as in circuit-tracer's CLTs): TopK needs no norm constraint, and a
    #: trainer with SparseAdam can then update rows during backward (update_in_backward).
    unit_norm_decoder = False
    #: A batch names nearly every row of every matrix (B * k slots over n latents per layer): with
    #: SparseAdam the trainer updates each chunk of rows during backward, so no L * n * d gradient exists.
    update_in_backward = True

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        n_latents: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        **options,
    ) -> None:
        config = CrossLayerTranscoderConfig(d_in=d_in, n_latents=n_latents, n_layers=n_layers, **options)
        super().__init__(config, dtype=dtype, device=device, backend=backend)
        self._build()

    n_layers = ConfigField()
    d_out = ConfigField()
    k = ConfigField()
    aux_k = ConfigField()
    activation = ConfigField()

    # ------------------------------------------------------------------------------ parameters

    def init_weights_(self) -> None:
        """Unit-norm random encoder rows; zero decoders, biases (and skips); zero thresholds."""
        n, d_in, d_out, L = self.n_latents, self.d_in, self.d_out, self.n_layers
        dtype, device = self._init_dtype, self._init_device
        for i in range(L):
            W_enc = torch.empty(n, d_in, dtype=dtype, device=device)
            for rows in row_blocks(n, d_in, base.INIT_CHUNK_ELEMENTS):
                W_enc[rows] = unit_rows(torch.randn(rows.stop - rows.start, d_in, dtype=torch.float32, device=device))
            self.register_parameter(f"W_enc_{i}", nn.Parameter(W_enc))
            self.register_parameter(f"b_enc_{i}", nn.Parameter(torch.zeros(n, dtype=dtype, device=device)))
            width = self.span(i) * d_out
            self.register_parameter(f"W_dec_{i}", nn.Parameter(torch.zeros(n, width, dtype=dtype, device=device)))
            self.register_parameter(f"b_dec_{i}", nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device)))
            if self.config.skip:
                W_skip = torch.zeros(d_out, d_in, dtype=dtype, device=device)
                self.register_parameter(f"W_skip_{i}", nn.Parameter(W_skip))
            if self.activation == "jumprelu":  # trained (directly, kept >= 0: the layout's own values)
                start = torch.full((n,), self.config.threshold_init, dtype=dtype, device=device)
                self.register_parameter(f"threshold_{i}", nn.Parameter(start))
            elif self.activation == "relu":
                self.register_buffer(f"threshold_{i}", torch.zeros(n, dtype=dtype, device=device))
        if self.activation == "batchtopk":
            # float32 at least (an EMA of small steps needs more than bfloat16's 8 bits); -1: not yet
            estimate = torch.full((L,), -1.0, dtype=acc_dtype(dtype), device=device)
            self.register_buffer("threshold_estimate", estimate)
        if self.config.target_l0 is not None and self.activation in PENALIZED:
            self.l0_controllers = nn.ModuleList(L0Controller(self.config.target_l0, device) for _ in range(L))
        if self.activation != "topk":
            # threshold_encode's / batch_topk's first-attempt slots per layer, growing to twice the
            # largest count seen. A buffer, saved and resumed: the hint does not change the latents,
            # but which attempt finds them changes the backward's float summation order (a resumed
            # run with a fresh hint differed from the uninterrupted one in the last bits)
            self.register_buffer("encode_slots", torch.full((L,), min(n, 4 * self.k), dtype=torch.int64, device=device))

    def encoder(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc_i [n, d_in], b_enc_i [n]) of layer i."""
        return getattr(self, f"W_enc_{i}"), getattr(self, f"b_enc_{i}")

    def decoder(self, i: int) -> torch.Tensor:
        """W_dec_i as [n, L - i, d_out] (circuit-tracer's layout; a view of the stored matrix); [n, 1,
        d_out] without cross_layer."""
        return getattr(self, f"W_dec_{i}").view(self.n_latents, self.span(i), self.d_out)

    def span(self, i: int) -> int:
        """How many target layers layer i's latents write to: L - i, or 1 without cross_layer."""
        return self.n_layers - i if self.config.cross_layer else 1

    def decoder_matrices(self) -> list[nn.Parameter]:
        """The L decoder matrices W_dec_i [n, (L - i) * d_out], one row per latent."""
        return [getattr(self, f"W_dec_{i}") for i in range(self.n_layers)]

    def threshold(self, i: int) -> torch.Tensor:
        """threshold_i [n] of a JumpReLU / ReLU CLT; a BatchTopK CLT's inference threshold of layer i
        (its running estimate, one value for every latent; 0 before the first training step)."""
        if self.activation == "topk":
            raise ValueError("activation: a TopK CLT has no thresholds (see flashsae.io.circuit_tracer)")
        if self.activation == "batchtopk":
            return self.threshold_estimate[i].clamp_min(0).to(self.dtype).expand(self.n_latents).contiguous()
        return getattr(self, f"threshold_{i}")

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec_0.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec_0.device

    @property
    def W_dec(self) -> torch.Tensor:  # the SAE interface's single decoder does not exist here
        raise AttributeError("W_dec: a CLT has one decoder per layer: decoder(i) or decoder_matrices()")

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Rescales every latent's decoder row (all its target layers together) to unit L2 norm."""
        for W in self.decoder_matrices():
            norms = W.to(acc_dtype(W.dtype)).norm(dim=1, keepdim=True)
            W.div_(torch.where(norms < eps, torch.ones_like(norms), norms).to(W.dtype))

    @torch.no_grad()
    def remove_decoder_parallel_grads_(self) -> None:
        """Removes from each dense W_dec_i.grad its component along the decoder rows."""
        for W in self.decoder_matrices():
            if W.grad is None:
                continue
            rows = W.to(acc_dtype(W.dtype))
            along = torch.linalg.vecdot(W.grad.to(rows.dtype), rows) / torch.linalg.vecdot(rows, rows).clamp_min(1e-12)
            W.grad.sub_((along.unsqueeze(1) * rows).to(W.grad.dtype))

    @torch.no_grad()
    def fold_activation_scale_(self, scales: dict[str, list[float]]) -> None:
        """Makes a CLT trained on inputs x_i * s_i and targets y_j * t_j take and predict raw
        activations: W_enc_i * s_i, the slices W_dec_i[:, j - i] / t_j, b_dec_j / t_j, W_skip_j * s_j / t_j
        (latent values and thresholds unchanged). scales: {"inputs": [s_i], "targets": [t_j]}."""
        inputs, targets = scales["inputs"], scales["targets"]
        for i in range(self.n_layers):
            getattr(self, f"W_enc_{i}").mul_(inputs[i])
            decoder = self.decoder(i)
            for j in range(i, i + self.span(i)):
                decoder[:, j - i].div_(targets[j])
            getattr(self, f"b_dec_{i}").div_(targets[i])
            if self.config.skip:
                getattr(self, f"W_skip_{i}").mul_(inputs[i] / targets[i])

    @torch.no_grad()
    def init_b_dec_(self, y: torch.Tensor, method: str = "geometric_median") -> None:
        """Sets each b_dec_j from a sample of the targets y [..., L, d_out]: per layer its geometric
        median (default) or mean."""
        stacked = self._stacked(y, "y", self.d_out, "d_out")
        for j in range(self.n_layers):
            getattr(self, f"b_dec_{j}").copy_(sample_center(stacked[:, j], method).to(self.dtype))

    @torch.no_grad()
    def to_jumprelu(self, x: torch.Tensor | None = None) -> CrossLayerTranscoder:
        """A JumpReLU CLT with this TopK or BatchTopK CLT's weights and thresholds calibrated on a
        sample of inputs x [..., L, d_in]: threshold_i (one value for all of layer i's latents) lies
        halfway between the smallest of the rows * k largest activations of layer i over the sample
        (BatchTopK's cut, Bussmann et al. 2024) and the next smaller one, so on the sample the
        JumpReLU CLT keeps exactly those: a mean of k latents per row and layer, the batch's top
        activations instead of each row's top k. A BatchTopK CLT without x keeps its running
        thresholds (its inference rule is that JumpReLU exactly). circuit-tracer's layout
        (flashsae.io.circuit_tracer) holds JumpReLU CLTs, not TopK ones."""
        if self.activation not in ("topk", "batchtopk"):
            raise ValueError(
                f"activation: to_jumprelu converts a TopK or BatchTopK CLT, this one is {self.activation!r}"
            )
        if x is None and self.activation == "topk":
            raise ValueError("x: a TopK CLT's thresholds are calibrated on a sample of inputs [..., L, d_in]")
        fields = {**self.config.to_dict(), "activation": "jumprelu", "target_l0": None}
        converted = type(self).from_config(
            self.config_class(**fields), dtype=self.dtype, device=self.device, backend=self.backend
        )
        state = {key: value for key, value in self.state_dict().items() if key != "threshold_estimate"}
        converted.load_state_dict(state, strict=False)
        converted.metadata = dict(self.metadata)
        if x is None:
            for i in range(self.n_layers):
                converted.threshold(i).copy_(self.threshold(i))
            return converted
        for i, cut in enumerate(self._calibrated_cuts(x)):
            if cut is not None:  # None: nothing fires on the sample, threshold 0 (ReLU) for this layer
                converted.threshold(i).fill_(cut)
        return converted

    @torch.no_grad()
    def calibrate_thresholds_(self, x: torch.Tensor) -> list[float]:
        """Sets a BatchTopK CLT's inference thresholds to the values that reproduce one batch top-k
        selection over the sample x [..., L, d_in] (to_jumprelu's rule, per layer; a layer where
        nothing fires keeps its estimate), so eval-mode L0 is k per layer on the sample. Returns
        the thresholds (flashsae train calls it before saving, as for a BatchTopK SAE)."""
        if self.activation != "batchtopk":
            raise ValueError(
                f"activation: calibrate_thresholds_ sets a BatchTopK CLT's thresholds, this one is {self.activation!r}"
            )
        for i, cut in enumerate(self._calibrated_cuts(x)):
            if cut is not None:
                self.threshold_estimate[i] = cut
        return self.threshold_estimate.clamp_min(0).tolist()

    @torch.no_grad()
    def _calibrated_cuts(self, x: torch.Tensor) -> list[float | None]:
        """Per layer, the threshold halfway between the smallest of the rows * k largest activations
        on the sample x [..., L, d_in] and the next smaller one (None where nothing fires)."""
        rows = self._stacked(x, "x", self.d_in, "d_in")
        cuts: list[float | None] = []
        for i in range(self.n_layers):
            W_enc, b_enc = self.encoder(i)
            x_i = rows[:, i].contiguous()
            values = batch_topk(x_i, W_enc, b_enc, self.k, backend=self.backend).values
            selected = values[values > 0]
            if not selected.numel():
                cuts.append(None)
                continue
            cut = selected.min()
            # the largest activation left out: among each row's top (m + 1), m = most selected in a row
            slots = min(self.n_latents, values.shape[1] + 1)
            candidates = topk_encode(x_i, W_enc, b_enc, slots, backend=self.backend)[0]
            left_out = candidates[candidates < cut]
            below = left_out.max().clamp_min(0) if left_out.numel() else cut.new_zeros(())
            # halfway between: the JumpReLU keeps exactly the selected activations on the sample,
            # with the gap (not one rounding) between the threshold and either side
            cuts.append(float((cut + below) / 2))
        return cuts

    # --------------------------------------------------------------------------------- pieces

    def _stacked(self, x: torch.Tensor, name: str, width: int, width_name: str) -> torch.Tensor:
        """x [..., L, width] as [rows, L, width] in the CLT's dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        L = self.n_layers
        if x.dim() < 2 or x.shape[-2:] != (L, width):
            raise ValueError(f"{name}: expected shape [..., n_layers={L}, {width_name}={width}], got {list(x.shape)}")
        return x.reshape(-1, L, width).to(self.dtype)

    def _encode_layer(
        self, x_i: torch.Tensor, i: int, dead: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(values, indices, aux or None) of layer i's rows x_i [rows, d_in]."""
        W_enc, b_enc = self.encoder(i)
        if self.activation == "topk":
            aux_k = self.aux_k if dead is not None else 0
            encoded = topk_encode(
                x_i, W_enc, b_enc, self.k, dead_mask=dead, aux_k=aux_k, backend=self.backend,
                precision=self.config.precision,
            )
            return encoded[0], encoded[1], (encoded[2], encoded[3]) if aux_k else None
        if self.activation == "batchtopk" and self.training:
            aux_k = self.aux_k if dead is not None else 0
            out = batch_topk(
                x_i, W_enc, b_enc, self.k, candidates=self._slots(i), dead_mask=dead, aux_k=aux_k,
                backend=self.backend,
            )  # fmt: skip
            self._grow_slots(i, out.values)
            return out.values, out.indices, (out.aux_values, out.aux_indices) if aux_k else None
        values, indices = threshold_encode(
            x_i, W_enc, b_enc, self.threshold(i).detach(), candidates=self._slots(i), backend=self.backend
        )
        self._grow_slots(i, values)
        return values, indices, None

    def _slots(self, i: int) -> int:
        return int(self.encode_slots[i])

    @torch.no_grad()
    def _grow_slots(self, i: int, values: torch.Tensor) -> None:
        self.encode_slots[i] = _shared.next_candidates(self._slots(i), values, self.n_latents)

    def _penalized_layer(
        self, x_i: torch.Tensor, y_i: torch.Tensor, i: int, training_step: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values to decode, indices, lambda_i * S_i) of layer i of a JumpReLU / ReLU CLT (module
        docstring); the controller acts first on a training step."""
        W_enc, b_enc = self.encoder(i)
        acc = acc_dtype(self.dtype)
        rows = x_i.shape[0]
        controlled = hasattr(self, "l0_controllers")
        if self.activation == "jumprelu" and training_step:
            with torch.no_grad():  # projected, not clamped in the graph (that would zero its gradient)
                self.threshold(i).clamp_(min=0)
        if controlled and training_step:
            coefficient = self._steer(i, x_i, y_i)
        elif controlled:
            coefficient = self.l0_controllers[i].coefficient()
        else:
            coefficient = torch.tensor(self.config.sparsity_coefficient, dtype=torch.float64, device=self.device)
        if self.activation == "relu":
            values, indices = threshold_encode(
                x_i, W_enc, b_enc, self.threshold(i), candidates=self._slots(i), backend=self.backend
            )
            # the decoder-norm weight is a constant of the step: its gradient would be a dense
            # [n, (L - i) * d_out] one for W_dec_i, which the row-sparse optimizer path cannot take
            norms = getattr(self, f"W_dec_{i}").detach().to(acc).norm(dim=1)
            sparsity = (values.to(acc) * norms[indices.clamp_min(0).long()]).sum() / rows
        else:
            theta = self.threshold(i)
            eps = self.config.bandwidth
            if controlled:
                eps = eps * self.l0_controllers[i].data_scale.to(theta.dtype)
            # with autograd the estimator needs the slots within eps / 2 below the threshold too
            low = (theta.detach() - eps / 2) if torch.is_grad_enabled() else theta.detach()
            pre, indices = threshold_encode(
                x_i, W_enc, b_enc, low.to(W_enc.dtype), candidates=self._slots(i), backend=self.backend
            )
            values = slot_jumprelu(pre, indices, theta, eps)
            sparsity = slot_step(pre, indices, theta, eps).to(acc).sum() / rows
        self._grow_slots(i, values)
        return values, indices, coefficient.to(acc) * sparsity

    @torch.no_grad()
    def _steer(self, i: int, x_i: torch.Tensor, y_i: torch.Tensor) -> torch.Tensor:
        """The target-L0 controller of layer i on a training batch (module docstring): started on the
        first batch (encoder bias centred, thresholds or biases cut to the target on the batch's cut
        sample, lambda and the data scale estimated), else its pending shift applied; then the shift
        measured on the cut sample. Returns lambda_i for this step (read before the update)."""
        controller = self.l0_controllers[i]
        W_enc, b_enc = self.encoder(i)
        target = self.config.target_l0
        sample = x_i[:: max(1, x_i.shape[0] // CUT_SAMPLE_ROWS)][:CUT_SAMPLE_ROWS]
        jump = self.activation == "jumprelu"
        if not controller.is_started():
            mean = x_i.mean(0)
            center_encoder_bias_(W_enc, b_enc, mean)
            scale = data_scale_of(x_i - mean)
            y_acc = y_i.to(acc_dtype(y_i.dtype))
            variance = float((y_acc - y_acc.mean(0)).pow(2).sum(1).mean())
            variance = variance if variance > 0 and math.isfinite(variance) else 1.0
            pre = sample @ W_enc.T + b_enc
            if jump:
                cut = max(float(uniform_cut(pre, target)), 1e-6 * scale)
                self.threshold(i).fill_(cut)
                # step_initial_coefficient balances a latent at the threshold in squared-error units;
                # the loss counts squared error in units of L * (the target's per-row variance)
                initial = step_initial_coefficient(cut) / (self.n_layers * variance)
            else:
                b_enc.sub_(uniform_cut(pre, target).to(b_enc.dtype))
                # shrinks a typical contribution (the target's per-coordinate rms) by that share:
                # with loss |r - f w|^2 / (L v) + lambda f |w| the optimum lowers f |w| by lambda L v / 2
                typical = math.sqrt(variance / self.d_out)
                initial = 2 * RELU_INITIAL_SHRINKAGE * typical / (self.n_layers * variance)
            controller.start(initial, scale)
        else:
            shift = controller.take_shift()
            if jump:
                self.threshold(i).mul_(shift.exp().to(self.dtype))
            else:
                lower_biases_(b_enc, W_enc, shift, controller.data_scale)
        pre = sample @ W_enc.T + b_enc
        coefficient = controller.coefficient()
        if jump:
            shift = log_threshold_shift(pre, self.threshold(i), target, controller.data_scale)
        else:
            shift = bias_shift(pre, W_enc, controller.data_scale, target)
        controller.update(shift)
        return coefficient

    @torch.no_grad()
    def _update_estimate(self, i: int, values: torch.Tensor) -> None:
        """One EMA step of layer i's BatchTopK inference threshold from its batch selection."""
        estimate = self.threshold_estimate
        estimate[i] = _shared.ema_threshold(estimate[i], values, self.config.threshold_beta)

    def _decode_layers(
        self,
        latents: list[tuple[torch.Tensor, torch.Tensor]],
        x: torch.Tensor | None,
        aux: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(y_hat [rows, L, d_out], aux decodes) from each layer's (values, indices) [rows, slots]: one
        sparse_decode per source layer to all its targets, then per target the sum of its slices.
        With `aux` (AuxK latents per layer), the aux rows decode in the same sparse_decode as the
        main ones (stacked below them), so each decoder is read once per step: what an optimizer
        updating rows during backward needs. Returns each layer's aux decode [rows, (L - i) * d_out]."""
        L = self.n_layers
        decoded, aux_decoded = [], []
        for i, ((values, indices), W) in enumerate(zip(latents, self.decoder_matrices(), strict=True)):
            rows = values.shape[0]
            if aux is not None:
                values, indices = _stack_slots((values, indices), aux[i])
            out = sparse_decode(values.contiguous(), indices.contiguous(), W, None, backend=self.backend)
            if aux is None:
                decoded.append(out)
            else:
                # split, not two slices: its backward concatenates the two gradients instead of
                # zero-filling a full [2 rows, (L - i) d] tensor for each and adding them
                main, extra = out.split([rows, out.shape[0] - rows])
                decoded.append(main)
                aux_decoded.append(extra)
        b_dec = torch.stack([getattr(self, f"b_dec_{j}") for j in range(L)])
        if self.config.cross_layer:
            y_hat = _target_sums(b_dec, decoded)
        else:  # a transcoder set: target j is layer j's own decode
            y_hat = torch.stack(decoded, dim=-2) + b_dec
        if self.config.skip:
            skips = [x[:, j] @ getattr(self, f"W_skip_{j}").T for j in range(L)]
            y_hat = y_hat + torch.stack(skips, dim=1)
        return y_hat, aux_decoded if aux is not None else None

    # ------------------------------------------------------------------------------ interface

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """Every layer's latents of x [..., L, d_in]: values and int32 indices [..., L, slots]
        (slots = k for TopK; the largest per-row count, padded with (0, -1), for JumpReLU / ReLU)."""
        rows = self._stacked(x, "x", self.d_in, "d_in")
        per_layer = [self._encode_layer(rows[:, i].contiguous(), i, None)[:2] for i in range(self.n_layers)]
        return _stack_latents(per_layer, x.shape[:-2])

    def encode_layer(self, x_i: torch.Tensor, i: int) -> SparseLatents:
        """Layer i's latents of its input x_i [..., d_in]: values and int32 indices [..., slots]
        (one encoder: what a splice into a running model calls as each layer's input appears)."""
        rows = self._layer_rows(x_i, i, "x_i", self.d_in, "d_in")
        values, indices, _ = self._encode_layer(rows, i, None)
        return SparseLatents(values.reshape(*x_i.shape[:-1], -1), indices.reshape(*x_i.shape[:-1], -1))

    def decode_layer(self, latents_i: SparseLatents, i: int) -> torch.Tensor:
        """What layer i's latents [..., slots] write to each target j >= i: [..., L - i, d_out]
        (one sparse_decode; no bias, no skip: target j's prediction is b_dec_j + the sum over i <= j of
        slice j - i of these (+ x_j W_skip_j^T)). Without cross_layer: [..., 1, d_out], layer i only."""
        values, indices = latents_i
        if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise TypeError("latents_i: expected SparseLatents (values, indices) of torch.Tensors")
        if values.dim() < 1 or indices.shape != values.shape:
            raise ValueError(f"latents_i: expected values and indices [..., slots], got {list(values.shape)}")
        flat_v = self._layer_rows(values, i, "latents_i", values.shape[-1], "slots")
        flat_i = indices.reshape(-1, values.shape[-1]).contiguous()
        out = sparse_decode(flat_v, flat_i, getattr(self, f"W_dec_{i}"), None, backend=self.backend)
        lead = values.shape[:-1]
        return out.reshape(*lead, self.span(i), self.d_out)

    def _layer_rows(self, x: torch.Tensor, i: int, name: str, width: int, width_name: str) -> torch.Tensor:
        """x [..., width] of layer i as [rows, width] in the CLT's dtype (checks i and the width)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers:
            raise ValueError(f"i: expected a layer in [0, {self.n_layers}), got {i!r}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != width:
            raise ValueError(f"{name}: expected shape [..., {width_name}={width}], got {list(x.shape)}")
        return x.reshape(-1, width).to(self.dtype).contiguous()

    def decode(self, latents: SparseLatents, x: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat [..., L, d_out] from latents [..., L, slots]; a skip CLT also needs x [..., L, d_in]."""
        values, indices = latents
        L = self.n_layers
        if values.dim() < 2 or values.shape[-2] != L or indices.shape != values.shape:
            shape = list(values.shape)
            raise ValueError(f"latents: expected values and indices [..., n_layers={L}, slots], got {shape}")
        lead = values.shape[:-2]
        slots = values.shape[-1]
        flat_v, flat_i = values.reshape(-1, L, slots), indices.reshape(-1, L, slots)
        rows = None
        if self.config.skip:
            if x is None:
                raise ValueError("x: a skip CLT's decode needs the inputs x [..., n_layers, d_in] for x W_skip^T")
            rows = self._stacked(x, "x", self.d_in, "d_in")
        y_hat, _ = self._decode_layers([(flat_v[:, i], flat_i[:, i]) for i in range(L)], rows)
        return y_hat.reshape(*lead, L, self.d_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor, dead_mask: torch.Tensor | None = None) -> CLTOutput:
        """Encodes every layer of x [..., L, d_in], predicts y [..., L, d_out] and scores it (see
        :class:`CLTOutput`). dead_mask: optional bool [L, n_latents] (TopK), the latents counted as
        dead per layer; enables the AuxK loss."""
        rows = self._stacked(x, "x", self.d_in, "d_in")
        if not isinstance(y, torch.Tensor) or y.shape[:-2] != x.shape[:-2]:
            shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected shape {[*x.shape[:-2], self.n_layers, self.d_out]}, got {shape}")
        target = self._stacked(y, "y", self.d_out, "d_out")
        L = self.n_layers
        if dead_mask is not None:
            dead_mask = _check_layer_mask(dead_mask, L, self.n_latents, self.device)
            if self.activation in PENALIZED:  # accepted for the trainer's common interface: no AuxK
                dead_mask = None
        training_step = _shared.is_training_step(self)
        sparsity_loss = None
        if self.activation in PENALIZED:
            layers = [self._penalized_layer(rows[:, i].contiguous(), target[:, i], i, training_step) for i in range(L)]
            encoded = [(v, idx, None) for v, idx, _ in layers]
            sparsity_loss = torch.stack([p for _, _, p in layers]).sum()
        else:
            encoded = [
                self._encode_layer(rows[:, i].contiguous(), i, None if dead_mask is None else dead_mask[i])
                for i in range(L)
            ]
            if self.activation == "batchtopk" and training_step:
                for i, (values, _, _) in enumerate(encoded):
                    self._update_estimate(i, values)
        aux = [a for _, _, a in encoded]
        aux = aux if dead_mask is not None and all(a is not None for a in aux) else None  # eval BatchTopK: none
        y_hat, aux_decoded = self._decode_layers([(v, idx) for v, idx, _ in encoded], rows, aux)
        acc = acc_dtype(self.dtype)
        error = y_hat.to(acc) - target.to(acc)
        target_acc = target.to(acc)
        sse = error.pow(2).sum(dim=(0, 2))  # [L]
        variance = (target_acc - target_acc.mean(0)).pow(2).sum(dim=(0, 2))
        fvu_per_layer = sse / variance
        fvu = fvu_per_layer.mean()
        auxk_loss = fvu.new_zeros(())
        if aux_decoded is not None:
            auxk_loss = self._auxk_loss(aux_decoded, error.detach(), dead_mask)
        lead = x.shape[:-2]
        loss = fvu + self.config.auxk_alpha * auxk_loss
        if sparsity_loss is not None:
            loss = loss + sparsity_loss
        # JumpReLU's window slots (inactive, decoded with value 0 for the estimator) are not latents
        reported = [
            (v, idx.masked_fill(v.detach() <= 0, -1) if self.activation == "jumprelu" else idx) for v, idx, _ in encoded
        ]
        return CLTOutput(
            x_hat=y_hat.reshape(*lead, L, self.d_out),
            latents=_stack_latents(reported, lead),
            fvu=fvu,
            mse=sse.sum() / target.numel(),
            auxk_loss=auxk_loss,
            loss=loss,
            fvu_per_layer=fvu_per_layer.detach(),
            sparsity_loss=sparsity_loss,
        )

    def _auxk_loss(self, aux_decoded: list[torch.Tensor], error: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the AuxK loss (module docstring); error = y_hat - y [rows, L, d_out]."""
        total = error.new_zeros(())
        rows = error.shape[0]
        for i, aux_hat in enumerate(aux_decoded):
            residual = (-error[:, i : i + self.span(i)]).reshape(rows, -1)  # y - y_hat where latents_i write
            variance = (residual - residual.mean(0)).pow(2).sum()
            sse = (aux_hat.to(residual.dtype) - residual).pow(2).sum()
            scale = (dead_mask[i].sum().to(total.dtype) / self.aux_k).clamp(max=1.0)
            total = total + sse / variance * scale
        return total / self.n_layers


class _TargetSums(torch.autograd.Function):
    """y_hat [..., L, d] from b_dec [L, d] and each source layer's decode decoded_i [..., (L - i) d]:
    y_hat[..., j, :] = b_dec[j] + sum_{i <= j} decoded_i[..., j - i, :] (decoded_i viewed [..., L - i, d]).

    Written as slices of each decoded_i summed per target (21 slices at L = 6), autograd's backward
    zero-fills a full-size [rows, (L - i) d] gradient per slice and adds them up: 91 [rows, d] blocks
    written twice at L = 6 where 21 are needed. Here the gradient of decoded_i is the slice
    grad[..., i:, :] itself, flattened (one copy), and the forward is L in-place adds."""

    generate_vmap_rule = True  # the forward is plain torch ops on the trailing dims: vmap-able

    @staticmethod
    def forward(b_dec: torch.Tensor, *decoded: torch.Tensor) -> torch.Tensor:
        L, d = b_dec.shape
        # a new tensor from decoded_0 (batched under vmap as the other decodes are; dtype promoted as
        # b_dec + decoded_i promotes: fp32 under autocast's bf16 decodes), then in-place adds
        out = decoded[0].unflatten(-1, (L, d)) + b_dec
        for i in range(1, L):
            out[..., i:, :] += decoded[i].unflatten(-1, (L - i, d))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.lead = output.dim() - 2
        ctx.dtypes = [t.dtype for t in inputs]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        L = grad.shape[-2]
        db_dec = grad.sum(dim=tuple(range(ctx.lead))) if ctx.lead else grad
        parts = (grad[..., i:, :].flatten(-2) for i in range(L))
        return tuple(g.to(dtype) for g, dtype in zip((db_dec, *parts), ctx.dtypes, strict=True))


def _target_sums(b_dec: torch.Tensor, decoded: list[torch.Tensor]) -> torch.Tensor:
    """_TargetSums.apply: y_hat [..., L, d] of the stacked biases and the per-layer decodes."""
    return _TargetSums.apply(b_dec, *decoded)


def _check_layer_mask(mask: object, L: int, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"dead_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (L, n) or mask.device != device:
        raise ValueError(
            f"dead_mask: expected a bool tensor [n_layers={L}, n_latents={n}] on {device}, got "
            f"{mask.dtype} {list(mask.shape)} on {mask.device}"
        )
    return mask


def _stack_slots(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two padded latent sets [rows, s1] and [rows, s2] stacked as [2 rows, max(s1, s2)] (empty slots
    (0, -1) fill the narrower one)."""
    slots = max(first[0].shape[1], second[0].shape[1])
    values, indices = [], []
    for v, idx in (first, second):
        pad = slots - v.shape[1]
        values.append(torch.nn.functional.pad(v, (0, pad)) if pad else v)
        indices.append(torch.nn.functional.pad(idx, (0, pad), value=-1) if pad else idx)
    return torch.cat(values), torch.cat(indices)


def _stack_latents(per_layer: list[tuple[torch.Tensor, torch.Tensor]], lead: torch.Size) -> SparseLatents:
    """Per-layer (values, indices) [rows, slots_i] as SparseLatents [..., L, max slots], shorter
    layers padded with empty slots (0, -1)."""
    slots = max(v.shape[1] for v, _ in per_layer)
    values, indices = [], []
    for v, idx in per_layer:
        pad = slots - v.shape[1]
        if pad:
            v = torch.nn.functional.pad(v, (0, pad))
            idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
        values.append(v)
        indices.append(idx)
    L = len(per_layer)
    return SparseLatents(
        torch.stack(values, dim=1).reshape(*lead, L, slots), torch.stack(indices, dim=1).reshape(*lead, L, slots)
    )
