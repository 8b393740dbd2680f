"""Calibrating the inference threshold of a BatchTopK-family SAE (BatchTopK, Matryoshka) on a
sample of activations, so that its eval-mode encode gives L0 = k.

During training the threshold is a running estimate (an EMA of each batch's smallest selected
activation, see :mod:`flashsae.modules.batchtopk`); it lags the weights, most in a short run, and
``flashsae train`` therefore sets it once more before saving::

    threshold = the value t with  #{(row, latent): act > t} = rows * k  on the sample

where act = relu((x - b_dec) W_enc^T + b_enc), i.e. the threshold that reproduces one batch
top-k selection over the whole sample (the midpoint between its (rows * k)-th and next largest
activation). The trainer calibrates on ``calibration_tokens`` held-out rows: the eval part's tokens
after the ``eval_tokens`` on which it measures its final metrics (so that their L0 stays a
measurement), or rows of the train part when fewer than 1024 such tokens exist. Held-out text
because the demo's eval documents activate more latents than its train documents: calibrated on
the train part, BatchTopK measured L0 37.5 on the held-out tokens instead of 32. Exports of the SAE as a
JumpReLU (:meth:`~flashsae.BatchTopKSAE.to_jumprelu`, the SAELens and circuit-tracer formats) carry
the calibrated value.

Exact and sparse in memory: each row keeps its top ``4k`` activations (a row block of the dense
[rows, n] activations at a time); when some row's smallest kept value is above the threshold that
row might have more, and the pass is repeated with 4x as many per row.
"""

from __future__ import annotations

import torch

from ..modules import BatchTopKSAE
from ..ops._common import acc_dtype

#: Elements of the dense activations computed at a time (16M: 64 MiB in float32).
BLOCK_ELEMENTS = 1 << 24


@torch.no_grad()
def threshold_for_l0(sae: BatchTopKSAE, x: torch.Tensor) -> float:
    """The threshold that gives `sae` exactly k active latents per row on average over x [rows, d_in]
    (the module docstring's rule; 0 when fewer than rows * k activations are positive). Tied
    activations at the threshold all fall below it (repeated rows, such as a model's first position
    in every context, tie all of theirs), so the count can then come out a few under rows * k."""
    rows = sae._rows(x)
    count = rows.shape[0] * sae.k
    acc = acc_dtype(sae.dtype)
    W_enc, b_enc, b_dec = sae.W_enc.to(acc), sae.b_enc.to(acc), sae.b_dec.to(acc)
    block = max(1, BLOCK_ELEMENTS // sae.n_latents)
    kept = min(sae.n_latents, 4 * sae.k)
    while True:
        values, smallest = [], []
        for start in range(0, rows.shape[0], block):
            act = ((rows[start : start + block].to(acc) - b_dec) @ W_enc.T + b_enc).relu()
            top = torch.topk(act, kept, dim=1).values
            values.append(top.reshape(-1))
            smallest.append(top[:, -1])
        pooled = torch.cat(values)
        if count >= pooled.numel():  # every activation kept: kept == n_latents
            return 0.0
        ranked = torch.topk(pooled, count + 1).values
        threshold = float((ranked[-2] + ranked[-1]) / 2)
        if kept == sae.n_latents or not bool((torch.cat(smallest) > threshold).any()):
            return max(threshold, 0.0)
        kept = min(sae.n_latents, 4 * kept)  # a row may hold more values above it than were kept


@torch.no_grad()
def calibrate_threshold(sae: BatchTopKSAE, x: torch.Tensor) -> float:
    """Sets ``sae.threshold`` to :func:`threshold_for_l0` of the sample x [rows, d_in] (in the
    scale the SAE is trained on) and returns it."""
    if not isinstance(sae, BatchTopKSAE):
        raise TypeError(f"sae: expected a BatchTopKSAE or MatryoshkaSAE, got {type(sae).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty [rows, d_in] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    threshold = threshold_for_l0(sae, x)
    sae.threshold.fill_(threshold)
    return threshold
