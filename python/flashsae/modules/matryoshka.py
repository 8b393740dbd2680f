"""MatryoshkaSAE: the Matryoshka BatchTopK sparse autoencoder (Bussmann, Nabeshima, Karvonen & Nanda
2025, "Learning Multi-Level Features with Matryoshka Sparse Autoencoders", arXiv:2503.17547).

A BatchTopK SAE (selection, AuxK, running threshold, eval-mode inference and JumpReLU export are
those of :class:`~flashsae.BatchTopKSAE`) whose loss makes every prefix of the dictionary a
dictionary of its own: with widths m_1 < m_2 < ... < m_L = n_latents,

    x_hat_l = b_dec + sum of the selected latents with index < m_l     (one BatchTopK selection)
    loss    = sum_l fvu(x, x_hat_l) + auxk_alpha * auxk_loss            (AuxK against x_hat_L)

so early latents must reconstruct on their own (general features first, no absorption into later
ones). The selection is made once over all latents, as in the paper and dictionary_learning (SAELens
re-selects within each prefix instead). The reported x_hat, fvu and mse are the full-width ones.

Every op runs sparse: batch_topk as BatchTopK, and one fused sae_loss per prefix on the same padded
latents with the slots of later latents emptied (index -1), O(batch * m * d) each.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from ..ops import sae_loss
from ..registry import register
from .base import ConfigField
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """Configuration of a :class:`MatryoshkaSAE` (the fields of :class:`BatchTopKConfig` plus the widths)."""

    matryoshka_widths: list[int] | None = None
    """Strictly increasing prefix widths m_1 < ... < m_L, each in [1, n_latents]; n_latents is
    appended when missing (the full dictionary is always a level). None: n/8, n/4, n/2, n (those >= 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_latents
        widths = self.matryoshka_widths
        if widths is None:
            widths = sorted({w for w in (n // 8, n // 4, n // 2) if w >= 1})
        if not isinstance(widths, (list, tuple)) or not all(
            isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= n for w in widths
        ):
            raise ValueError(f"matryoshka_widths: expected a list of ints in [1, n_latents={n}], got {widths!r}")
        widths = list(widths)
        if not widths or widths[-1] != n:
            widths.append(n)
        if any(a >= b for a, b in pairwise(widths)):
            raise ValueError(f"matryoshka_widths: expected strictly increasing widths, got {widths}")
        self.matryoshka_widths = widths


@register
class MatryoshkaSAE(BatchTopKSAE):
    """A Matryoshka BatchTopK sparse autoencoder (Bussmann et al. 2025, arXiv:2503.17547).

    Args:
        d_in, n_latents, k: as for :class:`~flashsae.BatchTopKSAE`.
        matryoshka_widths: the nested prefix widths (see :class:`MatryoshkaConfig`).
        aux_k, auxk_alpha, threshold_beta, threshold_start_step, dtype, device, backend: as for
            :class:`~flashsae.BatchTopKSAE`.

    Parameters and buffers are those of BatchTopKSAE; so are encode / decode, the eval-mode
    threshold rule and :meth:`to_jumprelu`. Only the training objective differs (module docstring).
    """

    architecture = "matryoshka"
    config_class = MatryoshkaConfig
    config: MatryoshkaConfig

    matryoshka_widths = ConfigField()

    def _objective(self, rows, values, indices, aux_values, aux_indices, dead_mask):
        """Sum of the prefixes' FVUs plus the AuxK term of the full reconstruction."""
        aux = (aux_values, aux_indices) if aux_values is not None else (None, None)
        full = sae_loss(rows, values, indices, self.W_dec, self.b_dec, *aux, backend=self.backend)
        auxk_loss = self._scaled_auxk(full.auxk_loss, dead_mask, aux_values is not None)
        total = full.fvu
        for width in self.matryoshka_widths[:-1]:
            inside = (indices >= 0) & (indices < width)
            prefix = sae_loss(
                rows, values * inside, indices.masked_fill(~inside, -1), self.W_dec, self.b_dec, backend=self.backend
            )
            total = total + prefix.fvu
        return full.x_hat, full.fvu, full.mse, auxk_loss, total + self.config.auxk_alpha * auxk_loss
