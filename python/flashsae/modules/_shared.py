"""Pieces the SAE family shares: config checks, the training-step counter (warm-ups, the BatchTopK
threshold), the dense reconstruction of the L1/L0-penalty architectures, decoding padded latents, and
the per-row input normalizations some foreign SAEs apply before encoding (OpenAI's TopK SAEs, SAELens).

Training schedule (every architecture with a warm-up or a running estimate):
    ``num_steps`` is an int64 buffer, saved and restored with the checkpoint. ``forward`` adds 1
    whenever it runs as a training step, i.e. in training mode with autograd enabled, so a plain loop
    (``out = sae(x); out.loss.backward(); ...``) advances every schedule without further calls.
    A loop that runs several forwards per optimizer step (gradient accumulation), resumes elsewhere or
    trains through torch.func transforms (which never count a step) sets the count itself:
    ``sae.num_steps.fill_(step)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_latents, non_negative, positive_int
from ..ops import _functorch, sparse_decode
from ..ops._common import acc_dtype
from ..ops.threshold_encode import padded_rows, threshold_encode
from ..outputs import ForwardOutput, SparseLatents
from .base import KeywordConfigSAE


def check_topk_fields(config: Any, reconstruction_width: int) -> None:
    """Checks k and aux_k (1 <= each <= n_latents) and auxk_alpha (>= 0) of a TopK-family config;
    aux_k None becomes min(reconstruction_width // 2, n_latents), sparsify's AuxK size."""
    n = config.n_latents
    positive_int("k", config.k)
    if config.k > n:
        raise ValueError(f"k: expected 1 <= k <= n_latents ({n}), got {config.k}")
    if config.aux_k is None:
        config.aux_k = max(1, min(reconstruction_width // 2, n))
    positive_int("aux_k", config.aux_k)
    if config.aux_k > n:
        raise ValueError(f"aux_k: expected 1 <= aux_k <= n_latents ({n}), got {config.aux_k}")
    config.auxk_alpha = non_negative("auxk_alpha", config.auxk_alpha)


def check_dead_mask(dead_mask: object, n_latents: int, device: torch.device) -> torch.Tensor:
    """dead_mask must be a bool [n_latents] tensor on the SAE's device."""
    if not isinstance(dead_mask, torch.Tensor):
        raise TypeError(f"dead_mask: expected a torch.Tensor, got {type(dead_mask).__name__}")
    if dead_mask.dtype != torch.bool or tuple(dead_mask.shape) != (n_latents,) or dead_mask.device != device:
        raise ValueError(
            f"dead_mask: expected a bool tensor [n_latents={n_latents}] on {device}, got "
            f"{dead_mask.dtype} {list(dead_mask.shape)} on {dead_mask.device}"
        )
    return dead_mask


# ------------------------------------------------------------------------------- training schedule


def register_step_counter(module: torch.nn.Module, device: torch.device | str | None) -> None:
    """Adds the ``num_steps`` buffer (int64 scalar, 0)."""
    module.register_buffer("num_steps", torch.zeros((), dtype=torch.int64, device=device))


def is_training_step(module: torch.nn.Module) -> bool:
    """A forward counts as a training step in training mode with autograd enabled, outside torch.func
    transforms: under grad / vmap / functional_call the forward is a pure function of its inputs
    (functorch refuses in-place updates of captured buffers), so it neither advances ``num_steps``
    nor updates running estimates; a functional training loop sets them itself."""
    return module.training and torch.is_grad_enabled() and not _functorch.transforms_active()


@torch.no_grad()
def advance(module: torch.nn.Module) -> None:
    module.num_steps += 1


@torch.no_grad()
def ema_threshold(current: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """The next BatchTopK inference threshold (no host sync) from the running estimate `current` (a
    scalar, < 0 while unset) and a batch selection `values` (active slots > 0): the smallest selected
    value sets it the first time, then beta * current + (1 - beta) * smallest; unchanged when
    nothing was selected."""
    positive = values.detach().to(current.dtype)
    smallest = positive.masked_fill(positive <= 0, math.inf).min()
    blended = torch.where(current < 0, smallest, beta * current + (1 - beta) * smallest)
    return torch.where(torch.isfinite(smallest), blended, current)


def warmed_up(coefficient: float, warmup_steps: int, num_steps: torch.Tensor) -> torch.Tensor:
    """coefficient * min(1, num_steps / warmup_steps): linear warm-up from 0 (no host sync).
    The first training step (num_steps = 0) uses 0 when warm-up is on."""
    if warmup_steps == 0:
        return torch.tensor(coefficient, dtype=torch.float64, device=num_steps.device)
    return coefficient * (num_steps.to(torch.float64) / warmup_steps).clamp(max=1.0)


# ------------------------------------------------------------------------- dense reconstruction


def dense_losses(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sse_per_row_mean, mse, fvu) of a reconstruction, in the accumulation dtype (float32; float64
    for float64), normalized as sae_loss does: mse = sse / (batch * d), fvu = sse / total variance,
    and the papers' reconstruction term sum_b |x_b - x_hat_b|^2 / batch."""
    acc = acc_dtype(x.dtype)
    x_acc = x.to(acc)
    sse = (x_hat.to(acc) - x_acc).pow(2).sum()
    total_variance = (x_acc - x_acc.mean(0)).pow(2).sum()
    return sse / x.shape[0], sse / x.numel(), sse / total_variance


# ---------------------------------------------------------------------------------------- decoding


def decode_latents(
    latents: SparseLatents, W_dec: torch.Tensor, b_dec: torch.Tensor, backend: str | None
) -> torch.Tensor:
    """x_hat [..., d] = b_dec + sum of the latents' decoder rows; empty slots (index -1) skipped."""
    values, indices = check_latents(latents)
    lead = values.shape[:-1]
    slots = values.shape[-1]
    x_hat = sparse_decode(
        values.reshape(-1, slots).to(W_dec.dtype).contiguous(),
        indices.reshape(-1, slots).contiguous(),
        W_dec,
        b_dec,
        backend=backend,
    )
    return x_hat.reshape(*lead, W_dec.shape[1])


class DenseActivationSAE(KeywordConfigSAE):
    """What ReLU, JumpReLU and Gated share: b_dec optionally subtracted before encoding
    (config.apply_b_dec_to_input), the latents above a per-latent threshold found sparsely by
    threshold_encode, and padded latents decoded by sparse_decode."""

    def _input_bias(self) -> torch.Tensor | None:
        return self.b_dec if self.config.apply_b_dec_to_input else None

    def _zero_threshold(self) -> torch.Tensor:
        return torch.zeros(self.n_latents, dtype=self.dtype, device=self.device)

    def _latents_above(self, x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (values, indices) [rows, m] of the pre-activations of x above `threshold` [n]; the
        next call's candidate count follows the largest row count seen."""
        latents = threshold_encode(
            self._rows(x), self.W_enc, self.b_enc, threshold, self._input_bias(),
            candidates=self._candidates, backend=self.backend,
        )  # fmt: skip
        self._candidates = next_candidates(self._candidates, latents[0], self.n_latents)
        return latents

    def decode(self, latents: SparseLatents) -> torch.Tensor:
        """x_hat [..., d_in] from padded latents (sparse_decode; index -1 = empty slot)."""
        return decode_latents(latents, self.W_dec, self.b_dec, self.backend)


def dense_output(
    module: Any,
    x: torch.Tensor,
    f: torch.Tensor,
    x_hat: torch.Tensor,
    *,
    fvu: torch.Tensor,
    mse: torch.Tensor,
    loss: torch.Tensor,
) -> ForwardOutput:
    """The ForwardOutput of a dense-activation architecture (ReLU, JumpReLU, Gated) from its
    activations f [rows, n] and reconstruction x_hat [rows, d_in]: advances the step counter on a
    training step, keeps the active latents padded per row and updates the candidate count."""
    if is_training_step(module):
        advance(module)
    latents = padded_rows(f, f > 0)
    module._candidates = next_candidates(module._candidates, latents[0], module.n_latents)
    return ForwardOutput(
        x_hat=x_hat.reshape(*x.shape[:-1], module.d_in),
        latents=shaped(latents, x.shape[:-1]),
        fvu=fvu,
        mse=mse,
        auxk_loss=fvu.new_zeros(()),
        loss=loss,
    )


def shaped(latents: tuple[torch.Tensor, torch.Tensor], lead: torch.Size) -> SparseLatents:
    """Padded [rows, m] latents as SparseLatents with the input's leading shape [..., m]."""
    values, indices = latents
    m = values.shape[-1]
    return SparseLatents(values.reshape(*lead, m), indices.reshape(*lead, m))


def next_candidates(current: int, latents: torch.Tensor, n_latents: int) -> int:
    """The slot hint for the next variable-count encode: twice the largest row count seen so far,
    so a typical batch fits in one pass (the hint never changes results, only speed)."""
    return min(n_latents, max(current, 2 * latents.shape[-1]))


# --------------------------------------------------------------------------- input normalization

#: Per-row input normalizations (the SAE encodes the normalized row and maps its reconstruction back):
#:   "none"                   identity
#:   "layer_norm"             OpenAI sparse_autoencoder's LN (= SAELens' "layer_norm"):
#:                            x_n = (x - mean) / (std + 1e-5), std the unbiased (n - 1) standard
#:                            deviation over features; x_hat = x_hat_n * std + mean (no epsilon
#:                            on the way back, as in both libraries)
#:   "constant_norm_rescale"  SAELens' "constant_norm_rescale" (= lm-saes' "token-wise"):
#:                            x_n = x * sqrt(d) / |x|; x_hat = x_hat_n * |x| / sqrt(d)
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")
#: OpenAI's LN epsilon, added to the standard deviation (not to the variance).
LAYER_NORM_EPS = 1e-5

#: Per-row statistics of a normalization: x_n = (x - shift) / scale_in, x_hat = x_hat_n * scale_out + shift.
RowStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def normalize_rows(rows: torch.Tensor, kind: str) -> tuple[torch.Tensor, RowStats | None]:
    """(normalized rows, per-row statistics) in the rows' dtype; the statistics are computed in
    float32 at least (a bfloat16 mean over thousands of features is too coarse). kind "none"
    returns the rows themselves and None."""
    if kind == "none":
        return rows, None
    acc = torch.promote_types(rows.dtype, torch.float32)
    values = rows.to(acc)
    if kind == "layer_norm":
        shift = values.mean(-1, keepdim=True)
        scale_out = (values - shift).std(-1, keepdim=True)
        scale_in = scale_out + LAYER_NORM_EPS
    elif kind == "constant_norm_rescale":
        shift = torch.zeros_like(values[..., :1])
        scale_out = scale_in = values.norm(dim=-1, keepdim=True) / math.sqrt(rows.shape[-1])
    else:  # pragma: no cover - configs validate kind
        raise ValueError(f"input_norm: expected one of {INPUT_NORMS}, got {kind!r}")
    normalized = ((values - shift) / scale_in).to(rows.dtype)
    return normalized.contiguous(), (scale_in, scale_out, shift)


def denormalize_rows(rows: torch.Tensor, stats: RowStats | None) -> torch.Tensor:
    """Maps reconstructions of normalized rows back to the input space (identity for None)."""
    if stats is None:
        return rows
    _, scale_out, shift = stats
    return (rows.to(scale_out.dtype) * scale_out + shift).to(rows.dtype)
