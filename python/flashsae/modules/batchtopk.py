"""BatchTopKSAE: the BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse
Autoencoders", arXiv:2412.06410), on flashsae's sparse kernels.

Training (``self.training``):
    act     = relu((x - b_dec) W_enc^T + b_enc)
    latents = the batch * k largest entries of act over the whole batch (rows get varying counts)
    x_hat   = b_dec + sum of the latents' decoder rows
    loss    = fvu + auxk_alpha * auxk_loss          (AuxK as in TopK, when a dead_mask is given)
Inference (eval mode): a latent is active iff act > threshold, one threshold for all latents,
estimated during training as an exponential moving average of the smallest selected activation of
each batch (dictionary_learning's estimator; SAELens' is the same EMA). The smallest selected value
of a batch is the threshold that reproduces that batch's selection exactly (L0 = k on it). Unlike
dictionary_learning (first update at step 1000, beta 0.999) the estimate starts at step 0 with beta
0.99 (a memory of ~100 batches): the demo's 256-step run otherwise saved an SAE with no threshold at
all, which encoded ~800 latents per token instead of 32. ``flashsae train`` then calibrates the
threshold once more on a sample of tokens before saving (flashsae.train.calibrate_threshold), so the
saved SAE's eval-mode L0 is k. The inference rule is a JumpReLU with a uniform threshold, so
:meth:`BatchTopKSAE.to_jumprelu` exports the SAE exactly.

Latents are padded to [..., m], m = the largest count of any row in the batch; empty slots hold
value 0 and index -1 (an active slot always has a value > 0).

Every op runs sparse: :func:`~flashsae.ops.batch_topk` (per-row candidates from topk_encode, then the
global selection among them, exact; see its docstring for the check and the retry), sae_loss for the
reconstruction and AuxK losses, threshold_encode at inference. Nothing of size [batch, n] is built
unless a row activates almost every latent (the exact dense worst case of the retry).

Schedule state (buffers, saved with the checkpoint): ``num_steps`` counts training steps (see
:mod:`flashsae.modules._shared`); ``threshold`` is the running estimate (-1 until the first update, in
which case inference uses 0, i.e. every positive activation). Each training step with
num_steps >= threshold_start_step updates it: the first update sets it, later ones do
threshold = beta * threshold + (1 - beta) * min(selected activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import fraction, non_negative_int
from ..ops import sae_loss
from ..ops._common import acc_dtype
from ..ops.batch_topk import batch_topk
from ..ops.threshold_encode import threshold_encode
from ..outputs import ForwardOutput, SparseLatents
from ..registry import register
from . import _shared
from .base import ConfigField, KeywordConfigSAE, SAEConfig
from .jumprelu import JumpReLUSAE


@dataclass
class BatchTopKConfig(SAEConfig):
    """Configuration of a :class:`BatchTopKSAE`."""

    k: int = 32
    """Mean active latents per row: batch * k are selected per batch (1 <= k <= n_latents)."""
    aux_k: int | None = None
    """Size of the AuxK selection among dead latents per row (Gao et al. 2024, A.2); None means
    min(d_in // 2, n_latents). Used only when forward gets a dead_mask."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss in ``loss = fvu + auxk_alpha * auxk_loss`` (>= 0; Gao et al.: 1/32)."""
    threshold_beta: float = 0.99
    """Decay of the inference-threshold moving average, in [0, 1) (0.99: ~100 batches of memory, so
    the estimate follows the activations of a short run; dictionary_learning: 0.999)."""
    threshold_start_step: int = 0
    """First training step (num_steps) whose batch updates the threshold estimate (>= 0; 0: from
    the first batch, so an SAE has a threshold after one step; dictionary_learning: 1000)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _shared.check_topk_fields(self, reconstruction_width=self.d_in)
        self.threshold_beta = fraction("threshold_beta", self.threshold_beta)
        non_negative_int("threshold_start_step", self.threshold_start_step)


@register
class BatchTopKSAE(KeywordConfigSAE):
    """A BatchTopK sparse autoencoder (Bussmann et al. 2024, arXiv:2412.06410).

    Args:
        d_in: input width d. n_latents: dictionary size n. k: mean active latents per row.
        aux_k, auxk_alpha, threshold_beta, threshold_start_step: see :class:`BatchTopKConfig`.
        dtype, device, backend: as for :class:`~flashsae.TopKSAE`.

    Parameters: ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d], ``b_dec`` [d] (Gao et al. init,
    as TopKSAE). Buffers: ``num_steps`` and ``threshold`` (module docstring). Decoder rows are kept at
    unit norm (``unit_norm_decoder``): call remove_decoder_parallel_grads_ before the optimizer step
    and normalize_decoder_ after it, as for TopK.

    Training mode selects the batch top-k; eval mode applies the threshold (so an eval-mode forward
    has no AuxK term). ``encode(x, use_threshold=...)`` chooses explicitly.
    """

    architecture = "batchtopk"
    config_class = BatchTopKConfig
    config: BatchTopKConfig
    required_fields = ("k",)

    def _build(self) -> None:
        self.init_weights_()
        _shared.register_step_counter(self, self._init_device)
        # float32 (float64 for a float64 SAE): an EMA of small steps needs more than bfloat16's 8 bits
        estimate = torch.full((), -1.0, dtype=acc_dtype(self._init_dtype), device=self._init_device)
        self.register_buffer("threshold", estimate)
        self._candidates = 4 * self.config.k

    k = ConfigField()
    aux_k = ConfigField()

    def inference_threshold(self) -> torch.Tensor:
        """[n_latents] threshold of the inference rule in the SAE's dtype (0 before any estimate)."""
        return self.threshold.clamp_min(0).to(self.dtype).expand(self.n_latents).contiguous()

    # ----------------------------------------------------------------------------- forward pieces

    def _select(self, rows: torch.Tensor, use_threshold: bool, dead_mask: torch.Tensor | None):
        """(values, indices, aux_values, aux_indices) of rows [batch, d_in], padded layout."""
        if use_threshold:
            values, indices = threshold_encode(
                rows, self.W_enc, self.b_enc, self.inference_threshold(), self.b_dec, candidates=self._candidates,
                backend=self.backend,
            )  # fmt: skip
            aux = (None, None)
        else:
            aux_k = self.aux_k if dead_mask is not None else 0
            values, indices, *aux = batch_topk(
                rows, self.W_enc, self.b_enc, self.k, self.b_dec, candidates=self._candidates, dead_mask=dead_mask,
                aux_k=aux_k, backend=self.backend,
            )  # fmt: skip
        self._candidates = _shared.next_candidates(self._candidates, values, self.n_latents)
        return values, indices, *aux

    def encode(self, x: torch.Tensor, use_threshold: bool | None = None) -> SparseLatents:
        """The latents of x [..., d_in], padded to [..., m] (empty slots: value 0, index -1).

        use_threshold: True applies the inference threshold, False the batch top-k (over all rows
        of x); None (default) picks the threshold in eval mode and the batch top-k in training mode.
        """
        use_threshold = not self.training if use_threshold is None else use_threshold
        values, indices, _, _ = self._select(self._rows(x), use_threshold, None)
        return _shared.shaped((values, indices), x.shape[:-1])

    def decode(self, latents: SparseLatents) -> torch.Tensor:
        """x_hat [..., d_in] from padded latents (sparse_decode; index -1 = empty slot)."""
        return _shared.decode_latents(latents, self.W_dec, self.b_dec, self.backend)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encodes, decodes and scores x [..., d_in] (see :class:`~flashsae.outputs.ForwardOutput`).

        dead_mask: optional [n_latents] bool, latents counted as dead; enables the AuxK loss
        (training mode only). A training-mode forward with autograd on advances ``num_steps`` and
        updates the threshold estimate (module docstring).
        """
        rows = self._rows(x)
        if dead_mask is not None:
            _shared.check_dead_mask(dead_mask, self.n_latents, self.device)
        values, indices, aux_values, aux_indices = self._select(rows, not self.training, dead_mask)
        x_hat, fvu, mse, auxk_loss, loss = self._objective(rows, values, indices, aux_values, aux_indices, dead_mask)
        if _shared.is_training_step(self):
            self._update_threshold(values)
            _shared.advance(self)
        return ForwardOutput(
            x_hat=x_hat.reshape(*x.shape[:-1], self.d_in),
            latents=_shared.shaped((values, indices), x.shape[:-1]),
            fvu=fvu,
            mse=mse,
            auxk_loss=auxk_loss,
            loss=loss,
        )

    def _objective(self, rows, values, indices, aux_values, aux_indices, dead_mask):
        """(x_hat, fvu, mse, auxk_loss, loss) of the selected latents: fvu + auxk_alpha * auxk_loss."""
        aux = (aux_values, aux_indices) if aux_values is not None else (None, None)
        out = sae_loss(rows, values, indices, self.W_dec, self.b_dec, *aux, backend=self.backend)
        auxk_loss = self._scaled_auxk(out.auxk_loss, dead_mask, aux_values is not None)
        return out.x_hat, out.fvu, out.mse, auxk_loss, out.fvu + self.config.auxk_alpha * auxk_loss

    def _scaled_auxk(self, auxk_loss: torch.Tensor, dead_mask: torch.Tensor | None, used: bool) -> torch.Tensor:
        if not used:
            return auxk_loss
        # sparsify's scale, as in TopKSAE: fewer dead latents than aux slots weigh proportionally less
        return auxk_loss * (dead_mask.sum().to(auxk_loss.dtype) / self.aux_k).clamp(max=1.0)

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        """One EMA step of the inference threshold from this batch's selection (no host sync)."""
        updated = _shared.ema_threshold(self.threshold, values, self.config.threshold_beta)
        self.threshold.copy_(torch.where(self.num_steps >= self.config.threshold_start_step, updated, self.threshold))

    # ------------------------------------------------------------------------------------ export

    def to_jumprelu(self):
        """This SAE's inference rule as a :class:`~flashsae.JumpReLUSAE`: the same weights, every
        latent's threshold = the estimated threshold, b_dec subtracted before encoding
        (apply_b_dec_to_input=True). Its encode / forward latents equal this SAE's eval-mode ones.
        Raises ValueError while no threshold has been estimated (train in training mode first)."""
        estimate = float(self.threshold)
        if estimate <= 0:
            raise ValueError(
                f"threshold: not estimated yet (value {estimate}); train in training mode for more than "
                f"threshold_start_step={self.config.threshold_start_step} steps before exporting"
            )
        jump = JumpReLUSAE(
            self.d_in, self.n_latents, threshold_init=estimate, apply_b_dec_to_input=True, dtype=self.dtype,
            device=self.device, backend=self.backend,
        )  # fmt: skip
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(jump, name).copy_(getattr(self, name))
            jump.log_threshold.fill_(math.log(estimate))
        jump.metadata = dict(self.metadata)
        return jump
