"""TopKSAE: the TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", arXiv:2406.04093), on flashsae's sparse kernels.

    latents = TopK_k(relu((x - b_dec) W_enc^T + b_enc))          (topk_encode: no [batch, n] tensor)
    x_hat   = b_dec + sum_j latents.values[j] W_dec[latents.indices[j]]   (sae_loss / sparse_decode)

Every op in forward and backward runs sparse: the only O(n_latents * d) work per step is the
encoder GEMM (tile by tile) and writing the dense parameter gradients torch's optimizers expect.

Multi-TopK (Gao et al. 2024, section 5.3; ``multi_topk=True``): the loss adds the reconstruction with
4k latents, ``L(k) + L(4k) / 8``, so the SAE also works at larger k at inference. One topk_encode of
4k slots serves both (its first k are the top-k) and one more fused sae_loss scores the 4k latents.

Two options express SAEs trained elsewhere exactly (both off by default):
``apply_b_dec_to_input=False`` encodes x itself instead of x - b_dec (SAELens' field of that name),
and ``input_norm`` normalizes every row before encoding and maps the reconstruction back, as
OpenAI's TopK SAEs ("layer_norm") and SAELens' normalize_activations do (see
:data:`flashsae.modules._shared.INPUT_NORMS`). With an input norm the losses (fvu, mse, AuxK) are
measured in the normalized space the SAE works in, as OpenAI trains; x_hat is in the input's space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import boolean, check_latents, choice
from ..ops import sae_loss, sparse_decode, topk_encode
from ..ops.topk_encode import PRECISIONS
from ..outputs import ForwardOutput, SparseLatents
from ..registry import register
from . import _shared
from .base import ConfigField, KeywordConfigSAE, SAEConfig


#: Values of TopKConfig.precision: topk_encode's precisions ("auto" among them).
TOPK_PRECISIONS = PRECISIONS


@dataclass
class TopKConfig(SAEConfig):
    """Configuration of a :class:`TopKSAE`."""

    k: int = 32
    """Active latents per input row, 1 <= k <= n_latents."""
    aux_k: int | None = None
    """Size of the AuxK selection among dead latents (Gao et al. 2024, appendix A.2); None means
    min(d_in // 2, n_latents), as in sparsify. Used only when forward gets a dead_mask."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss in ``loss = fvu + auxk_alpha * auxk_loss`` (Gao et al.: 1/32)."""
    multi_topk: bool = False
    """Multi-TopK loss (Gao et al. 2024, 5.3): ``loss = fvu + fvu_4k / 8 + auxk_alpha * auxk_loss``
    where fvu_4k reconstructs with the top min(4k, n_latents) latents. Outputs stay those of k."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (Gao et al.; False encodes x itself, as some
    SAELens SAEs do)."""
    input_norm: str = "none"
    """Per-row normalization before encoding, undone on the reconstruction: "none", "layer_norm"
    (OpenAI's TopK SAEs: (x - mean) / (std + 1e-5)) or "constant_norm_rescale" (x * sqrt(d) / |x|).
    See :data:`flashsae.modules._shared.INPUT_NORMS`."""
    precision: str = "exact"
    """How the encoder scores latents (:func:`flashsae.ops.topk_encode`'s precision): "exact",
    "certified" (exact's results, bit for bit, from bfloat16 GEMM scores, a proven error bound and
    exact rescoring of a few candidates per row), "fast" (bfloat16 scores as computed) or "auto":
    "certified" where torch's bfloat16 GEMM is fast on this CPU (AMX or AVX-512 BF16: measured once
    per process, flashsae.ops._topk_encode_cpu.AUTO_CERTIFIED_BELOW), else "exact", in training and
    at inference alike. Either never changes a result; certified runs at the bfloat16 GEMM's speed
    (rows the bound cannot prove, under 1% on real activations, are recomputed exactly), but on CPUs
    that emulate bfloat16 its GEMM is 2-4.5x slower than float32's. "fast" is never chosen
    automatically: it changes which latents win near-ties."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _shared.check_topk_fields(self, reconstruction_width=self.d_in)
        boolean("multi_topk", self.multi_topk)
        boolean("apply_b_dec_to_input", self.apply_b_dec_to_input)
        choice("input_norm", self.input_norm, _shared.INPUT_NORMS)
        choice("precision", self.precision, TOPK_PRECISIONS)


#: Multi-TopK (Gao et al. 2024, 5.3): the second reconstruction uses MULTI_TOPK_FACTOR * k latents
#: and enters the loss with weight MULTI_TOPK_WEIGHT.
MULTI_TOPK_FACTOR = 4
MULTI_TOPK_WEIGHT = 1 / 8


@register
class TopKSAE(KeywordConfigSAE):
    """A TopK sparse autoencoder as a plain ``nn.Module`` (Gao et al. 2024).

    Args:
        d_in: input width d.
        n_latents: dictionary size n.
        k: active latents per input row, 1 <= k <= n_latents.
        aux_k, auxk_alpha: AuxK settings, see :class:`TopKConfig`.
        multi_topk: add the Multi-TopK term L(4k) / 8 to the loss, see :class:`TopKConfig`.
        apply_b_dec_to_input, input_norm: how the input is prepared, see :class:`TopKConfig`.
        precision: how the encoder scores latents, see :class:`TopKConfig`.
        dtype, device: of the parameters (float32 default; bfloat16, float16, float64 work).
        backend: kernel backend for every op ("auto" default; see flashsae._backend).

    Parameters: ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d] (one row per latent in both
    matrices), ``b_dec`` [d]. Initialization follows Gao et al.: decoder rows random with unit norm,
    encoder = decoder (tied at init), zero biases; call :meth:`init_b_dec_` on a data sample.
    In training, call :meth:`remove_decoder_parallel_grads_` before the optimizer step and
    :meth:`normalize_decoder_` after it to keep decoder rows at unit norm.

    Sparse ops: all of them (topk_encode, sae_loss, sparse_decode); see the module docstring.
    """

    architecture = "topk"
    config_class = TopKConfig
    config: TopKConfig
    required_fields = ("k",)

    k = ConfigField()
    aux_k = ConfigField()

    # ----------------------------------------------------------------------------- forward pieces

    def _input_bias(self) -> torch.Tensor | None:
        return self.b_dec if self.config.apply_b_dec_to_input else None

    def _prepared_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, _shared.RowStats | None]:
        """x [..., d_in] as [rows, d_in] in the SAE's dtype, normalized per input_norm."""
        return _shared.normalize_rows(self._rows(x), self.config.input_norm)

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The top-k latents of x [..., d_in]: values and int32 indices, each [..., k]."""
        rows, _ = self._prepared_rows(x)
        values, indices = topk_encode(
            rows, self.W_enc, self.b_enc, self.k, self._input_bias(), backend=self.backend,
            precision=self.config.precision,
        )  # fmt: skip
        lead = x.shape[:-1]
        return SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))

    def decode(self, latents: SparseLatents, x: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat [..., d_in] from latents ([..., k] values and indices). With an input_norm, x (the
        input the latents came from) is required: its per-row statistics undo the normalization."""
        values, indices = check_latents(latents)
        lead = values.shape[:-1]
        k = values.shape[-1]
        x_hat = sparse_decode(
            values.reshape(-1, k).to(self.dtype).contiguous(),
            indices.reshape(-1, k).contiguous(),
            self.W_dec,
            self.b_dec,
            backend=self.backend,
        )
        if self.config.input_norm != "none":
            if x is None:
                raise ValueError(
                    f"x: decode needs the input x [..., d_in] to undo input_norm={self.config.input_norm!r}"
                )
            _, stats = self._prepared_rows(x)
            if stats[0].shape[0] != x_hat.shape[0]:
                raise ValueError(f"x: expected the input of these latents ({x_hat.shape[0]} rows), got {list(x.shape)}")
            x_hat = _shared.denormalize_rows(x_hat, stats)
        return x_hat.reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encodes, decodes and scores x [..., d_in] (see :class:`~flashsae.outputs.ForwardOutput`).

        dead_mask: optional [n_latents] bool, latents counted as dead (e.g. no activation in the
        last 10M tokens); enables the AuxK loss over the aux_k most active of them.
        """
        rows, stats = self._prepared_rows(x)
        aux_k = self.aux_k if dead_mask is not None else 0
        slots = min(MULTI_TOPK_FACTOR * self.k, self.n_latents) if self.config.multi_topk else self.k
        encoded = topk_encode(
            rows, self.W_enc, self.b_enc, slots, self._input_bias(), dead_mask=dead_mask, aux_k=aux_k,
            backend=self.backend, precision=self.config.precision,
        )  # fmt: skip
        values, indices = encoded[:2]
        wide = (values, indices)
        if slots != self.k:  # the top-k are the first k of the sorted top-4k
            values, indices = values[:, : self.k].contiguous(), indices[:, : self.k].contiguous()
        aux = encoded[2:] if aux_k else (None, None)
        loss = sae_loss(rows, values, indices, self.W_dec, self.b_dec, *aux, backend=self.backend)
        auxk_loss = loss.auxk_loss
        if aux_k:
            # sparsify's scale: fewer dead latents than aux slots get proportionally less weight
            scale = (dead_mask.sum().to(auxk_loss.dtype) / aux_k).clamp(max=1.0)
            auxk_loss = auxk_loss * scale
        objective = loss.fvu + self.config.auxk_alpha * auxk_loss
        if self.config.multi_topk:
            wide_loss = sae_loss(rows, *wide, self.W_dec, self.b_dec, backend=self.backend)
            objective = objective + MULTI_TOPK_WEIGHT * wide_loss.fvu
        lead = x.shape[:-1]
        return ForwardOutput(
            x_hat=_shared.denormalize_rows(loss.x_hat, stats).reshape(*lead, self.d_in),
            latents=SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k)),
            fvu=loss.fvu,
            mse=loss.mse,
            auxk_loss=auxk_loss,
            loss=objective,
        )
