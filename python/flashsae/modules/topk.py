"""TopKSAE: the TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", arXiv:2406.04093), on flashsae's sparse kernels.

    latents = TopK_k(relu((x - b_dec) W_enc^T + b_enc))          (topk_encode: no [batch, n] tensor)
    x_hat   = b_dec + sum_j latents.values[j] W_dec[latents.indices[j]]   (sae_loss / sparse_decode)

Every op in forward and backward runs sparse: the only O(n_latents * d) work per step is the
encoder GEMM (tile by tile) and writing the dense parameter gradients torch's optimizers expect.

Multi-TopK (Gao et al. 2024, section 5.3; ``multi_topk=True``): the loss adds the reconstruction with
4k latents, ``L(k) + L(4k) / 8``, so the SAE also works at larger k at inference. One topk_encode of
4k slots serves both (its first k are the top-k) and one more fused sae_loss scores the 4k latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import sae_loss, sparse_decode, topk_encode
from ..outputs import ForwardOutput, SparseLatents
from .base import SAE, SAEConfig, non_negative, positive_int, register


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

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("k", self.k)
        if self.k > self.n_latents:
            raise ValueError(f"k: expected 1 <= k <= n_latents ({self.n_latents}), got {self.k}")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_in // 2, self.n_latents))
        positive_int("aux_k", self.aux_k)
        if self.aux_k > self.n_latents:
            raise ValueError(f"aux_k: expected 1 <= aux_k <= n_latents ({self.n_latents}), got {self.aux_k}")
        self.auxk_alpha = non_negative("auxk_alpha", self.auxk_alpha)
        if not isinstance(self.multi_topk, bool):
            raise ValueError(f"multi_topk: expected True or False, got {self.multi_topk!r}")


#: Multi-TopK (Gao et al. 2024, 5.3): the second reconstruction uses MULTI_TOPK_FACTOR * k latents
#: and enters the loss with weight MULTI_TOPK_WEIGHT.
MULTI_TOPK_FACTOR = 4
MULTI_TOPK_WEIGHT = 1 / 8


@register
class TopKSAE(SAE):
    """A TopK sparse autoencoder as a plain ``nn.Module`` (Gao et al. 2024).

    Args:
        d_in: input width d.
        n_latents: dictionary size n.
        k: active latents per input row, 1 <= k <= n_latents.
        aux_k, auxk_alpha: AuxK settings, see :class:`TopKConfig`.
        multi_topk: add the Multi-TopK term L(4k) / 8 to the loss, see :class:`TopKConfig`.
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

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        aux_k: int | None = None,
        auxk_alpha: float = 1 / 32,
        multi_topk: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        config = TopKConfig(
            d_in=d_in, n_latents=n_latents, k=k, aux_k=aux_k, auxk_alpha=auxk_alpha, multi_topk=multi_topk
        )
        super().__init__(config, dtype=dtype, device=device, backend=backend)
        self._build()

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def aux_k(self) -> int:
        return self.config.aux_k

    # ----------------------------------------------------------------------------- forward pieces

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The top-k latents of x [..., d_in]: values and int32 indices, each [..., k]."""
        values, indices = topk_encode(self._rows(x), self.W_enc, self.b_enc, self.k, self.b_dec, backend=self.backend)
        lead = x.shape[:-1]
        return SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))

    def decode(self, latents: SparseLatents) -> torch.Tensor:
        """x_hat [..., d_in] from latents ([..., k] values and indices)."""
        values, indices = latents
        lead = values.shape[:-1]
        k = values.shape[-1]
        x_hat = sparse_decode(
            values.reshape(-1, k).contiguous(),
            indices.reshape(-1, k).contiguous(),
            self.W_dec,
            self.b_dec,
            backend=self.backend,
        )
        return x_hat.reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encodes, decodes and scores x [..., d_in] (see :class:`~flashsae.outputs.ForwardOutput`).

        dead_mask: optional [n_latents] bool, latents counted as dead (e.g. no activation in the
        last 10M tokens); enables the AuxK loss over the aux_k most active of them.
        """
        rows = self._rows(x)
        aux_k = self.aux_k if dead_mask is not None else 0
        slots = min(MULTI_TOPK_FACTOR * self.k, self.n_latents) if self.config.multi_topk else self.k
        encoded = topk_encode(
            rows, self.W_enc, self.b_enc, slots, self.b_dec, dead_mask=dead_mask, aux_k=aux_k, backend=self.backend
        )
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
            x_hat=loss.x_hat.reshape(*lead, self.d_in),
            latents=SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k)),
            fvu=loss.fvu,
            mse=loss.mse,
            auxk_loss=auxk_loss,
            loss=objective,
        )
