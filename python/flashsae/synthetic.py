"""Activations with a known answer: sparse non-negative combinations of a known dictionary of unit
directions plus small noise, in the style of Elhage et al. 2022, "Toy Models of Superposition"
(features sparse, non-negative, more features than dimensions). An SAE trained on them should find
the dictionary again, which makes them a test of an architecture and a training setup::

    data = flashsae.synthetic.SyntheticDictionary(d=32, n_features=48, mean_active=3, seed=0)
    x = data.sample(4096)                        # [4096, 32]
    ...train an SAE on x...
    report = data.recovery(sae.W_dec)            # max cosine of each true direction with a row
    report.fraction                              # share of directions with max cosine >= 0.9

Each sample is ``x = sum_i c_i D_i + noise`` with D_i the unit directions (rows of
``directions`` [n_features, d], random, so n_features > d gives superposition), c_i = 0 with
probability 1 - p_i and else uniform in ``magnitude_range``, and noise ~ N(0, noise_std^2) per
coordinate. Feature frequencies p_i follow a power law p_i ∝ (i + 1)^-frequency_decay (0: all
equal) scaled so that a sample has ``mean_active`` active features on average.

For transcoders, sample the codes and map them through a second dictionary::

    x, codes = data_in.sample(4096, return_codes=True)
    y = data_out.decode(codes, noise=True)       # the same features, other directions

Randomness comes from the object's own generator (seeded), never from torch's global state, so a
seed gives the same dictionary and the same stream of samples on every machine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import FLOAT_DTYPES, integer, is_number, non_negative, positive_int


class RecoveryReport(NamedTuple):
    """How well learned rows recover the true directions."""

    max_cosine: torch.Tensor
    """[n_features] for each true direction, its largest cosine similarity with any learned row."""
    fraction: float
    """Share of true directions whose max_cosine is >= threshold."""
    threshold: float
    """The cosine a direction needs to count as recovered."""


def max_cosine_similarity(true_directions: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each row of `true_directions` [n_true, d], its largest cosine similarity with a row of
    `learned` [m, d] (e.g. an SAE's W_dec), in float64. Zero rows of `learned` count as cosine 0."""
    for name, value in (("true_directions", true_directions), ("learned", learned)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty 2-d tensor [rows, d], got {_describe(value)}")
    if true_directions.shape[1] != learned.shape[1]:
        raise ValueError(
            f"learned: expected rows of width d={true_directions.shape[1]} (that of true_directions), "
            f"got {list(learned.shape)}"
        )
    a = torch.nn.functional.normalize(true_directions.detach().double().cpu(), dim=1)
    b = torch.nn.functional.normalize(learned.detach().double().cpu(), dim=1)
    return (a @ b.T).max(dim=1).values


class SyntheticDictionary:
    """A known dictionary of unit directions and a sampler of sparse activations built from it.

    Args:
        d: width of the activations (>= 1).
        n_features: number of true directions (>= 1; > d gives superposition).
        mean_active: expected number of active features per sample (> 0, at most n_features; with
            frequency_decay > 0 the most frequent feature's probability must stay <= 1).
        frequency_decay: power-law exponent of the feature frequencies (>= 0; 0: all equal).
        magnitude_range: (low, high), 0 <= low <= high: active coefficients are uniform in it.
        noise_std: standard deviation of the Gaussian noise per coordinate (>= 0).
        seed: seeds the directions and the stream of samples.
        dtype, device: of the directions and the samples (float32 on CPU by default).

    Attributes: ``directions`` [n_features, d] (unit rows), ``probabilities`` [n_features].
    """

    def __init__(
        self,
        d: int,
        n_features: int,
        *,
        mean_active: float = 3.0,
        frequency_decay: float = 0.0,
        magnitude_range: tuple[float, float] = (0.5, 1.5),
        noise_std: float = 0.01,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        positive_int("d", d)
        positive_int("n_features", n_features)
        if not _is_number(mean_active) or not 0 < mean_active <= n_features:
            raise ValueError(f"mean_active: expected a number in (0, n_features={n_features}], got {mean_active!r}")
        non_negative("frequency_decay", frequency_decay)
        if (
            not isinstance(magnitude_range, (tuple, list))
            or len(magnitude_range) != 2
            or not all(_is_number(v) for v in magnitude_range)
            or not 0 <= magnitude_range[0] <= magnitude_range[1]
        ):
            raise ValueError(f"magnitude_range: expected (low, high) with 0 <= low <= high, got {magnitude_range!r}")
        non_negative("noise_std", noise_std)
        integer("seed", seed)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        weights = torch.arange(1, n_features + 1, dtype=torch.float64) ** -float(frequency_decay)
        probabilities = weights * (mean_active / weights.sum())
        if probabilities.max() > 1:
            raise ValueError(
                f"mean_active: {mean_active} with frequency_decay={frequency_decay} would give the most frequent "
                f"feature probability {probabilities.max().item():.3f} > 1; lower one of them"
            )
        self.d, self.n_features = d, n_features
        self.magnitude_range = (float(magnitude_range[0]), float(magnitude_range[1]))
        self.noise_std = float(noise_std)
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self._generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_features, d, dtype=torch.float64, generator=self._generator)
        self.directions = torch.nn.functional.normalize(directions, dim=1).to(self.device, dtype)
        self.probabilities = probabilities.to(self.device, dtype)
        self._probabilities64 = probabilities

    def sample(self, n_samples: int, *, return_codes: bool = False):
        """`n_samples` activations [n_samples, d] (and, with return_codes, the coefficients
        [n_samples, n_features] that made them), drawn from the object's generator."""
        positive_int("n_samples", n_samples)
        shape = (n_samples, self.n_features)
        active = torch.rand(shape, dtype=torch.float64, generator=self._generator) < self._probabilities64
        low, high = self.magnitude_range
        magnitude = low + (high - low) * torch.rand(shape, dtype=torch.float64, generator=self._generator)
        codes = (active * magnitude).to(self.device, self.dtype)
        x = self.decode(codes, noise=True)
        return (x, codes) if return_codes else x

    def decode(self, codes: torch.Tensor, *, noise: bool = False) -> torch.Tensor:
        """codes [..., n_features] @ directions (+ the sampler's noise when `noise`), [..., d]."""
        if not isinstance(codes, torch.Tensor) or codes.dim() == 0 or codes.shape[-1] != self.n_features:
            raise ValueError(f"codes: expected a tensor [..., n_features={self.n_features}], got {_describe(codes)}")
        x = codes.to(torch.float64).cpu() @ self.directions.to(torch.float64).cpu()
        if noise and self.noise_std:
            x = x + self.noise_std * torch.randn(x.shape, dtype=torch.float64, generator=self._generator)
        return x.to(self.device, self.dtype)

    def recovery(self, learned: torch.Tensor, threshold: float = 0.9) -> RecoveryReport:
        """How many true directions some row of `learned` [m, d] (an SAE's W_dec) matches with cosine
        >= threshold: the per-direction max cosine and the recovered fraction."""
        if not _is_number(threshold) or not -1 <= threshold <= 1:
            raise ValueError(f"threshold: expected a cosine in [-1, 1], got {threshold!r}")
        best = max_cosine_similarity(self.directions, learned)
        return RecoveryReport(best, float((best >= threshold).double().mean()), float(threshold))


def _is_number(value: object) -> bool:
    return is_number(value) and value == value  # not NaN


def _describe(value: object) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
