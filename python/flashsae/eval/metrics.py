"""Reconstruction and sparsity metrics of an SAE over a stream of activations, accumulated batch by
batch in float64 on the SAE's device (one host sync at the end, nothing of size [tokens, n_latents]).

Definitions (x: an activation row, x̂ its reconstruction, f its latent activations; N tokens, d dims;
means over the N evaluated tokens). Where SAELens' ``run_evals`` (sae_lens/evals.py) reports the same
quantity its key is given in brackets.

- ``mse``: Σ‖x − x̂‖² / (N·d), the mean over tokens and dimensions (ForwardOutput.mse's definition)
  [mse: SAELens divides each token's squared error by the batch's token count before averaging,
  so its figure is not comparable].
- ``fvu``: Σ‖x − x̂‖² / Σ‖x − x̄‖², with x̄ the mean activation over all N tokens: the fraction of
  the activations' total variance left unexplained (sparsify's and dictionary_learning's FVU, and
  the training loss's). ``explained_variance`` = 1 − fvu [explained_variance: SAELens means the
  same ratio, but its denominator E‖x‖² − (mean over dims of E[x_d²])² is not the variance of x, so
  the numbers differ where the activations are far from centred; not its per-token
  ``explained_variance_legacy`` either].
- ``cossim``: mean over tokens of cos(x, x̂) (0 for a zero vector) [cossim].
- ``l0``: mean number of active latents (f > 0) per token [l0]; ``l1``: mean Σ f per token [l1].
- ``l2_norm_in``, ``l2_norm_out``: mean ‖x‖ and ‖x̂‖ [l2_norm_in, l2_norm_out].
- ``shrinkage``: mean over tokens of ‖x̂‖ / ‖x‖ (‖x‖ < 1e-4 counts as 1, as SAELens does) [l2_ratio];
  below 1 the SAE shrinks its reconstructions (the L1 penalty's known bias).
- ``relative_reconstruction_bias``: Σ‖x̂‖² / Σ x·x̂ (Rajamanoharan et al. 2024, arXiv:2404.16014,
  eq. 10): 1 is unbiased, below 1 shrinks [relative_reconstruction_bias; SAELens takes the ratio
  per batch and averages batches, flashsae takes it over all tokens at once].
- ``dead_fraction``: fraction of latents that never fire on the N tokens; ``dense_fraction``:
  fraction firing on more than ``dense_threshold`` of them (default 10%). The per-latent firing
  frequency is the latent density [SAELens' feature_density].

For a transcoder x is the target activation and x̂ the prediction (its input only feeds the encoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..outputs import SparseLatents

#: Norms below this count as 1 in the shrinkage ratio (SAELens' guard against dividing by ~0).
SMALL_NORM = 1e-4


@dataclass
class DensityHistogram:
    """Histogram of log10(latent density) over the latents that fired at least once."""

    edges: list[float]
    """Bin edges in log10(density), len(counts) + 1 values from log10(1 / tokens) (one firing) to 0."""
    counts: list[int]
    """Latents per bin."""
    dead: int
    """Latents that never fired (density 0, log10 = -inf: not in any bin)."""

    def to_dict(self) -> dict[str, object]:
        return {"edges": self.edges, "counts": self.counts, "dead": self.dead}


def density_histogram(density: torch.Tensor, tokens: int, bins: int = 40) -> DensityHistogram:
    """Histogram of log10(density) of the alive latents, `bins` equal bins between one firing in
    `tokens` and firing on every token."""
    if tokens < 1:
        raise ValueError(f"tokens: expected at least 1, got {tokens}")
    alive = density[density > 0].double().cpu()
    low = math.floor(math.log10(1.0 / tokens) * 10) / 10  # a round edge at or below one firing
    high = 0.0
    if low >= high:  # a single token: every alive latent fired on all of it
        low = -1.0
    counts = torch.histc(alive.log10(), bins=bins, min=low, max=high) if alive.numel() else torch.zeros(bins)
    edges = [round(edge, 6) for edge in torch.linspace(low, high, bins + 1, dtype=torch.float64).tolist()]
    return DensityHistogram(edges, [int(c) for c in counts.tolist()], int((density == 0).sum()))


class ReconstructionStats:
    """Streaming sums behind the metrics of the module docstring."""

    def __init__(self, n_latents: int, device: torch.device) -> None:
        self.n_latents = n_latents
        self.tokens = 0
        self.width = 0
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.sse, self.centered_sq, self.norm_in, self.norm_out = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        self.ratio, self.dot, self.out_sq, self.cos, self.l0, self.l1 = (zero.clone() for _ in range(6))
        self.centered_sum: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.counts = torch.zeros(n_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, latents: SparseLatents) -> None:
        """One batch: x and x_hat [N, d], latents [N, m] (padded slots: index -1)."""
        if x.shape[0] == 0:
            return
        x64, r64 = x.double(), x_hat.double().to(x.device)
        if self.shift is None:
            # the first batch's mean centres the variance sums: Σ‖x − s‖² − ‖Σ(x − s)‖²/N loses no
            # digits to cancellation even where the activations' mean is far from 0
            self.shift = x64.mean(0)
            self.centered_sum = torch.zeros_like(self.shift)
            self.width = x.shape[-1]
        centered = x64 - self.shift
        self.centered_sum += centered.sum(0)
        self.centered_sq += centered.pow(2).sum()
        self.sse += (x64 - r64).pow(2).sum()
        norm_in, norm_out = x64.norm(dim=-1), r64.norm(dim=-1)
        self.norm_in += norm_in.sum()
        self.norm_out += norm_out.sum()
        self.ratio += (norm_out / torch.where(norm_in < SMALL_NORM, torch.ones_like(norm_in), norm_in)).sum()
        self.dot += (x64 * r64).sum()
        self.out_sq += r64.pow(2).sum()
        self.cos += F.cosine_similarity(x64, r64, dim=-1, eps=1e-12).sum()
        values, indices = latents
        values, indices = values.to(self.counts.device), indices.to(self.counts.device)
        active = (values > 0) & (indices >= 0)
        self.l0 += active.sum()
        self.l1 += torch.where(active, values.double(), 0.0).sum()
        self.counts += torch.bincount(indices[active].long(), minlength=self.n_latents)
        self.tokens += x.shape[0]

    def density(self) -> torch.Tensor:
        """[n_latents] float64: fraction of the tokens on which each latent fired."""
        return self.counts.double() / max(self.tokens, 1)

    def finalize(self, dense_threshold: float) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("data: no tokens were evaluated")
        n = self.tokens
        total_variance = self.centered_sq - self.centered_sum.pow(2).sum() / n
        sse = float(self.sse)
        fvu = sse / float(total_variance) if float(total_variance) > 0 else math.nan
        density = self.density()
        dot = float(self.dot)
        return {
            "mse": sse / (n * self.width),
            "explained_variance": 1.0 - fvu,
            "fvu": fvu,
            "cossim": float(self.cos) / n,
            "l0": float(self.l0) / n,
            "l1": float(self.l1) / n,
            "l2_norm_in": float(self.norm_in) / n,
            "l2_norm_out": float(self.norm_out) / n,
            "shrinkage": float(self.ratio) / n,
            "relative_reconstruction_bias": float(self.out_sq) / dot if dot != 0 else math.nan,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
        }
