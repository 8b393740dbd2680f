"""Transcoder: a TopK sparse coder that reads one activation and predicts another (Dunefsky, Chlenski &
Nanda 2024, "Transcoders Find Interpretable LLM Feature Circuits", arXiv:2406.11944), optionally with
a linear skip connection (the skip transcoder of Paulo, Shabalin & Belrose 2025, "Transcoders Beat
Sparse Autoencoders for Interpretability", arXiv:2501.18823), TopK-activated as in sparsify.

    latents = TopK_k(relu(x W_enc^T + b_enc))             x: the input hookpoint [..., d_in]
    y_hat   = b_dec + sum_j values_j W_dec[indices_j]  (+ x W_skip^T)
    loss    = fvu(y, y_hat) + auxk_alpha * auxk_loss        y: the target hookpoint [..., d_out]

Unlike an SAE the encoder does not subtract b_dec (it lives in the output space). fvu and the AuxK
normalization use the total variance of the target y. ``forward(x, y)``: with y omitted the target
is x itself (an SAE without the pre-encoder bias; needs d_out == d_in).

Initialization follows sparsify: encoder rows random with unit norm, W_dec = 0, b_enc = b_dec = 0,
W_skip = 0 (so the skip path starts as the identity of nothing and learns the linear part).

Every op runs sparse: topk_encode, and one fused sae_loss against the residual target y - x W_skip^T
(the skip product is a dense [batch, d_out] x [d_out, d_in] GEMM, independent of n_latents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._checks import boolean, positive_int
from ..ops import sae_loss, topk_encode
from ..ops._common import acc_dtype, row_blocks
from ..outputs import ForwardOutput, SparseLatents
from ..registry import register
from . import _shared, base
from .base import ConfigField, KeywordConfigSAE, SAEConfig, sample_center, unit_rows


@dataclass
class TranscoderConfig(SAEConfig):
    """Configuration of a :class:`Transcoder`. d_in is the width of the input hookpoint."""

    d_out: int | None = None
    """Width of the target hookpoint; None means d_in."""
    k: int = 32
    """Active latents per input row, 1 <= k <= n_latents."""
    aux_k: int | None = None
    """Size of the AuxK selection among dead latents; None means min(d_out // 2, n_latents).
    Used only when forward gets a dead_mask."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss in ``loss = fvu + auxk_alpha * auxk_loss`` (>= 0)."""
    skip: bool = False
    """Add the linear skip connection x W_skip^T (a skip transcoder, Paulo et al. 2025)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_out is None:
            self.d_out = self.d_in
        positive_int("d_out", self.d_out)
        _shared.check_topk_fields(self, reconstruction_width=self.d_out)
        boolean("skip", self.skip)


@register
class Transcoder(KeywordConfigSAE):
    """A TopK transcoder, optionally with a skip connection (module docstring).

    Args:
        d_in: input width. n_latents: dictionary size n. k: active latents per row.
        d_out: target width (default d_in). aux_k, auxk_alpha, skip: see :class:`TranscoderConfig`.
        dtype, device, backend: as for :class:`~flashsae.TopKSAE`.

    Parameters: ``W_enc`` [n, d_in], ``b_enc`` [n], ``W_dec`` [n, d_out], ``b_dec`` [d_out] and, with
    skip, ``W_skip`` [d_out, d_in]. Decoder rows are kept at unit norm like TopK
    (``unit_norm_decoder``; rows still at zero are left alone by normalize_decoder_).

    A training loop must pass the target: ``out = tc(x, y, dead_mask=...)``.
    """

    architecture = "transcoder"
    config_class = TranscoderConfig
    config: TranscoderConfig
    required_fields = ("k",)

    def init_weights_(self) -> None:
        """sparsify's transcoder init: unit-norm random encoder rows, zero decoder, biases and skip."""
        n, d_in, d_out = self.n_latents, self.d_in, self.d_out
        dtype, device = self._init_dtype, self._init_device
        W_enc = torch.empty(n, d_in, dtype=dtype, device=device)
        for rows in row_blocks(n, d_in, base.INIT_CHUNK_ELEMENTS):
            W_enc[rows] = unit_rows(torch.randn(rows.stop - rows.start, d_in, dtype=torch.float32, device=device))
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.zeros(n, d_out, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        if self.config.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype, device=device))

    d_out = ConfigField()
    k = ConfigField()
    aux_k = ConfigField()

    @torch.no_grad()
    def init_b_dec_(self, y: torch.Tensor, method: str = "geometric_median") -> None:
        """Sets b_dec from a sample of the TARGET activations y [..., d_out]: their geometric median
        (default) or mean (b_dec lives in the output space)."""
        rows = self._rows(y, "y", self.d_out, "d_out")
        self.b_dec.copy_(sample_center(rows, method).to(self.dtype))

    # ----------------------------------------------------------------------------- forward pieces

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The top-k latents of the input x [..., d_in]: values and int32 indices, each [..., k]."""
        values, indices = topk_encode(self._rows(x), self.W_enc, self.b_enc, self.k, backend=self.backend)
        return _shared.shaped((values, indices), x.shape[:-1])

    def decode(self, latents: SparseLatents, x: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat [..., d_out] from latents; a skip transcoder also needs the input x [..., d_in]."""
        y_hat = _shared.decode_latents(latents, self.W_dec, self.b_dec, self.backend)
        if self.config.skip:
            if x is None:
                raise ValueError("x: a skip transcoder's decode needs the input x [..., d_in] for x W_skip^T")
            y_hat = y_hat + (self._rows(x) @ self.W_skip.T).reshape(y_hat.shape)
        return y_hat

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, dead_mask: torch.Tensor | None = None
    ) -> ForwardOutput:
        """Encodes x [..., d_in], predicts y [..., d_out] (default: x itself) and scores the
        prediction against y; ``x_hat`` in the output is y_hat and fvu is measured against y.

        dead_mask: optional [n_latents] bool, latents counted as dead; enables the AuxK loss.
        """
        rows = self._rows(x)
        if y is None:
            if self.d_out != self.d_in:
                raise ValueError(f"y: required when d_out ({self.d_out}) != d_in ({self.d_in})")
            y = x
        elif not isinstance(y, torch.Tensor) or y.shape[:-1] != x.shape[:-1]:
            shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected shape {[*x.shape[:-1], self.d_out]} (x's leading shape), got {shape}")
        target = self._rows(y, "y", self.d_out, "d_out")
        if dead_mask is not None:
            _shared.check_dead_mask(dead_mask, self.n_latents, self.device)
        aux_k = self.aux_k if dead_mask is not None else 0
        encoded = topk_encode(
            rows, self.W_enc, self.b_enc, self.k, dead_mask=dead_mask, aux_k=aux_k, backend=self.backend
        )
        values, indices = encoded[:2]
        aux = encoded[2:] if aux_k else (None, None)
        skip_out = rows @ self.W_skip.T if self.config.skip else None
        residual_target = target if skip_out is None else (target - skip_out).contiguous()
        out = sae_loss(residual_target, values, indices, self.W_dec, self.b_dec, *aux, backend=self.backend)
        # fvu and AuxK against the variance of y itself, not of y - x W_skip^T
        variance = _total_variance(target)
        fvu = out.mse * target.numel() / variance
        auxk_loss = out.auxk_loss
        if skip_out is not None:
            auxk_loss = auxk_loss * _total_variance(residual_target) / variance
        if aux_k:
            auxk_loss = auxk_loss * (dead_mask.sum().to(auxk_loss.dtype) / aux_k).clamp(max=1.0)
        y_hat = out.x_hat if skip_out is None else out.x_hat + skip_out
        lead = x.shape[:-1]
        return ForwardOutput(
            x_hat=y_hat.reshape(*lead, self.d_out),
            latents=_shared.shaped((values, indices), lead),
            fvu=fvu,
            mse=out.mse,
            auxk_loss=auxk_loss,
            loss=fvu + self.config.auxk_alpha * auxk_loss,
        )


def _total_variance(rows: torch.Tensor) -> torch.Tensor:
    values = rows.to(acc_dtype(rows.dtype))
    return (values - values.mean(0)).pow(2).sum()
