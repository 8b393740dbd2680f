"""Crosscoder: one TopK dictionary read from several sites at once and decoded to each of them (an
acausal crosscoder, Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing"): the sites are layers of one model, or the same layer of two models (model diffing).

    latents = TopK_k(relu(sum_s x_s W_enc[:, s]^T + b_enc))          x_s: site s  [..., d_in]
    x_hat_s = b_dec_s + sum_j values_j W_dec[indices_j, s]
    loss    = mean_s fvu(x_s, x_hat_s) + auxk_alpha * auxk_loss

The S sites are one [S * d_in] vector to the kernels: ``W_enc`` [n, S * d_in] is read by one
:func:`~flashsae.ops.topk_encode` of the concatenated sites, and ``W_dec`` [n, S * d_in] (latent-major:
:meth:`Crosscoder.decoder` views it as [n, S, d_in]) by one :func:`~flashsae.ops.sparse_decode` that
writes every site, backward over the active rows only. No [batch, n] tensor exists. AuxK as in TopK
(the aux_k largest dead pre-activations reconstruct the detached residual of all sites), decoded in
the same sparse_decode as the main latents so the decoder is read once per step. Initialization as
Gao et al.: unit-norm random decoder rows (a row spans all sites), encoder tied to it, zero biases;
rows are kept at unit norm in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import positive_int
from ..ops import sparse_decode, topk_encode
from ..ops._common import acc_dtype
from ..outputs import SparseLatents
from ..registry import register
from . import _shared
from .base import ConfigField, SAE, SAEConfig, sample_center
from .clt import CLTOutput, _stack_slots


@dataclass
class CrosscoderConfig(SAEConfig):
    """Configuration of a :class:`Crosscoder`. d_in is the width of each site."""

    n_sites: int | None = None
    """Number of sites S (required), e.g. the layers read, or 2 for two models' same layer."""
    k: int = 32
    """Active latents per row (shared by all sites), 1 <= k <= n_latents."""
    aux_k: int | None = None
    """Size of the AuxK selection among dead latents; None means min(S * d_in // 2, n_latents)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss in ``loss = mean fvu + auxk_alpha * auxk_loss`` (>= 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_sites", self.n_sites)
        _shared.check_topk_fields(self, reconstruction_width=self.n_sites * self.d_in)


@register
class Crosscoder(SAE):
    """An acausal TopK crosscoder over S sites (module docstring).

    ``flashsae.create("crosscoder", n_sites=S, d_in=d, n_latents=n, k=k)``. Parameters: ``W_enc``
    [n, S * d_in], ``b_enc`` [n], ``W_dec`` [n, S * d_in] (view [n, S, d_in] by :meth:`decoder`),
    ``b_dec`` [S * d_in]. Inputs are stacked by site: ``out = cc(x)`` with x [..., S, d_in]; the
    output's x_hat is [..., S, d_in] and fvu_per_layer holds each site's FVU.
    """

    architecture = "crosscoder"
    config_class = CrosscoderConfig
    config: CrosscoderConfig

    n_sites = ConfigField()
    k = ConfigField()
    aux_k = ConfigField()

    def init_weights_(self) -> None:
        """Gao et al.'s init over the concatenated width S * d_in (see :meth:`SAE.init_weights_`)."""
        d_in = self.config.d_in
        self.config.d_in = self.n_sites * d_in  # the base init reads d_in for the row width
        try:
            super().init_weights_()
        finally:
            self.config.d_in = d_in

    def decoder(self) -> torch.Tensor:
        """W_dec as [n, S, d_in] (a view)."""
        return self.W_dec.view(self.n_latents, self.n_sites, self.d_in)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., S, d_in] as [rows, S * d_in] in the SAE's dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        S, d = self.n_sites, self.d_in
        if x.dim() < 2 or x.shape[-2:] != (S, d):
            raise ValueError(f"x: expected shape [..., n_sites={S}, d_in={d}], got {list(x.shape)}")
        return x.reshape(-1, S * d).to(self.dtype).contiguous()

    @torch.no_grad()
    def fold_activation_scale_(self, scales: dict[str, list[float]]) -> None:
        """Makes a crosscoder trained on sites x_s * c_s take raw activations: W_enc and W_dec's
        columns of site s times / divided by c_s, b_dec's divided by c_s. scales: {"inputs": [c_s]}."""
        d = self.d_in
        for s, c in enumerate(scales["inputs"]):
            block = slice(s * d, (s + 1) * d)
            self.W_enc[:, block] *= c
            self.W_dec[:, block] /= c
            self.b_dec[block] /= c

    @torch.no_grad()
    def init_b_dec_(self, x: torch.Tensor, method: str = "geometric_median") -> None:
        """Sets b_dec per site from a sample x [..., S, d_in]: its geometric median (default) or mean."""
        rows = self._flat(x).view(-1, self.n_sites, self.d_in)
        for s in range(self.n_sites):
            center = sample_center(rows[:, s], method)
            self.b_dec[s * self.d_in : (s + 1) * self.d_in] = center.to(self.dtype)

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The top-k latents of x [..., S, d_in]: values and int32 indices [..., k]."""
        values, indices = topk_encode(self._flat(x), self.W_enc, self.b_enc, self.k, backend=self.backend)
        return _shared.shaped((values, indices), x.shape[:-2])

    def decode(self, latents: SparseLatents) -> torch.Tensor:
        """x_hat [..., S, d_in] from latents [..., k]."""
        x_hat = _shared.decode_latents(latents, self.W_dec, self.b_dec, self.backend)
        return x_hat.reshape(*x_hat.shape[:-1], self.n_sites, self.d_in)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> CLTOutput:
        """Encodes the sites x [..., S, d_in], reconstructs each and scores it (fvu: the mean of the
        sites' FVUs). dead_mask: optional [n_latents] bool, enables the AuxK loss."""
        rows = self._flat(x)
        if dead_mask is not None:
            _shared.check_dead_mask(dead_mask, self.n_latents, self.device)
        aux_k = self.aux_k if dead_mask is not None else 0
        encoded = topk_encode(
            rows, self.W_enc, self.b_enc, self.k, dead_mask=dead_mask, aux_k=aux_k, backend=self.backend
        )
        values, indices = encoded[:2]
        batch = rows.shape[0]
        slots = (values, indices) if not aux_k else _stack_slots((values, indices), (encoded[2], encoded[3]))
        decoded = sparse_decode(slots[0].contiguous(), slots[1].contiguous(), self.W_dec, None, backend=self.backend)
        x_hat = decoded[:batch] + self.b_dec
        acc = acc_dtype(self.dtype)
        S, d = self.n_sites, self.d_in
        target = rows.to(acc).view(batch, S, d)
        error = x_hat.to(acc).view(batch, S, d) - target
        sse = error.pow(2).sum(dim=(0, 2))
        variance = (target - target.mean(0)).pow(2).sum(dim=(0, 2))
        fvu_per_site = sse / variance
        fvu = fvu_per_site.mean()
        auxk_loss = fvu.new_zeros(())
        if aux_k:
            residual = -error.detach().view(batch, S * d)
            aux_sse = (decoded[batch:].to(acc) - residual).pow(2).sum()
            auxk_loss = aux_sse / (residual - residual.mean(0)).pow(2).sum()
            auxk_loss = auxk_loss * (dead_mask.sum().to(auxk_loss.dtype) / aux_k).clamp(max=1.0)
        lead = x.shape[:-2]
        return CLTOutput(
            x_hat=x_hat.reshape(*lead, S, d),
            latents=_shared.shaped((values, indices), lead),
            fvu=fvu,
            mse=sse.sum() / rows.numel(),
            auxk_loss=auxk_loss,
            loss=fvu + self.config.auxk_alpha * auxk_loss,
            fvu_per_layer=fvu_per_site.detach(),
        )

