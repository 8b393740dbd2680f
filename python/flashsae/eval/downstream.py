"""Downstream metrics: how much of the model's behaviour survives when the SAE replaces a hookpoint.

Each batch runs three forwards: clean, spliced (the SAE's reconstruction replaces the hookpoint's
activation at the evaluated tokens; elsewhere, e.g. at special tokens, the model's own activation
stays) and zero-ablated (zeros at the same tokens).

Causal language models (SAELens' keys in brackets; same definitions):
- ``ce_clean``, ``ce_spliced``, ``ce_ablation``: mean next-token cross-entropy (nats) over the
  positions whose input token is evaluated and whose next token is real (not padding)
  [ce_loss_without_sae, ce_loss_with_sae, ce_loss_with_ablation].
- ``ce_loss_recovered`` = (ce_ablation − ce_spliced) / (ce_ablation − ce_clean): 1 when splicing
  costs nothing, 0 when it is as bad as zero-ablating the hookpoint [ce_loss_score].
- ``ce_loss_increase`` = ce_spliced − ce_clean.
- ``kl_spliced``, ``kl_ablation``: mean KL(p_clean ‖ p) of the next-token distributions over the
  evaluated positions [kl_div_with_sae, kl_div_with_ablation]; ``kl_recovered`` =
  (kl_ablation − kl_spliced) / kl_ablation [kl_div_score]. Computed from log-softmax (SAELens
  takes log(softmax), which underflows to -inf for very unlikely tokens).
One difference: SAELens zero-ablates every position, flashsae only the positions it splices, so
that ablation and splicing differ only in what replaces the same activations.

Encoders (and models without an LM head): the pooled embedding, the attention-mask mean of the last
hidden state over a sequence (sentence-transformers' mean pooling), clean vs spliced:
- ``embedding_cosine``: mean over sequences of cos(pooled clean, pooled spliced);
  ``embedding_cosine_ablation`` the same with the zero-ablated model;
- ``embedding_cosine_recovered`` = (embedding_cosine − embedding_cosine_ablation) /
  (1 − embedding_cosine_ablation).
Sequences without an evaluated token are left out (splicing cannot change them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hookpoints import output_tensor
from .data import TokenBatch

DOWNSTREAM_KINDS = ("auto", "causal_lm", "embedding", "none")


def causal_lm_classes() -> set[str]:
    """Class names of transformers' causal language models (AutoModelForCausalLM's targets)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return set()
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def model_kind(model: nn.Module) -> str:
    """'causal_lm' for a transformers causal LM (its output has logits), 'embedding' for another
    transformers model, 'none' for any other module (pass downstream explicitly for those)."""
    if type(model).__name__ in causal_lm_classes():
        return "causal_lm"
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return "none"
    return "embedding" if isinstance(model, PreTrainedModel) else "none"


def logits_of(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output_tensor(output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            "downstream: 'causal_lm' needs the model to return logits [batch, tokens, vocab], "
            f"got {type(output).__name__}"
        )
    return logits


def hidden_of(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and getattr(output, "logits", None) is not None:
        raise ValueError(
            "downstream: 'embedding' needs the model's last hidden state, but it returns logits; "
            "load it without its LM head (AutoModel) or use downstream='causal_lm'"
        )
    if hidden is None:
        hidden = output_tensor(output)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(
            f"downstream: 'embedding' needs the model to return hidden states [batch, tokens, d], "
            f"got {type(output).__name__}"
        )
    return hidden


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else math.nan


class CausalLMStats:
    """Sums of CE and KL over evaluated positions, for the clean / spliced / ablated forwards."""

    def __init__(self) -> None:
        self.ce = {"clean": 0.0, "spliced": 0.0, "ablation": 0.0}
        self.kl = {"spliced": 0.0, "ablation": 0.0}
        self.ce_positions = 0
        self.kl_positions = 0

    @torch.no_grad()
    def update(self, outputs: dict[str, Any], batch: TokenBatch) -> None:
        """outputs: {'clean'|'spliced'|'ablation': model output} of `batch` (keep [B, T]: evaluated tokens)."""
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        logits = {name: logits_of(out) for name, out in outputs.items()}
        keep = batch.keep.to(input_ids.device)
        # position t predicts token t+1: counted when t is evaluated and t+1 is a real token
        predicts = keep[:, :-1] & attention_mask[:, 1:].bool()
        targets = input_ids[:, 1:][predicts]
        for name, value in logits.items():
            self.ce[name] += float(F.cross_entropy(value[:, :-1][predicts].float(), targets, reduction="sum"))
        self.ce_positions += int(predicts.sum())
        clean = F.log_softmax(logits["clean"][keep].float(), dim=-1)
        for name in ("spliced", "ablation"):
            other = F.log_softmax(logits[name][keep].float(), dim=-1)
            self.kl[name] += float((clean.exp() * (clean - other)).sum())
        self.kl_positions += int(keep.sum())

    def finalize(self) -> dict[str, float]:
        if self.ce_positions == 0:
            raise ValueError("data: no position with a next token to predict (contexts of one token?)")
        ce = {name: total / self.ce_positions for name, total in self.ce.items()}
        kl = {name: total / self.kl_positions for name, total in self.kl.items()}
        return {
            "ce_clean": ce["clean"],
            "ce_spliced": ce["spliced"],
            "ce_ablation": ce["ablation"],
            "ce_loss_recovered": _ratio(ce["ablation"] - ce["spliced"], ce["ablation"] - ce["clean"]),
            "ce_loss_increase": ce["spliced"] - ce["clean"],
            "kl_spliced": kl["spliced"],
            "kl_ablation": kl["ablation"],
            "kl_recovered": _ratio(kl["ablation"] - kl["spliced"], kl["ablation"]),
        }


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, d]: mean of hidden [B, T, d] over the real tokens of each sequence."""
    weights = attention_mask.to(hidden.device, torch.float64).unsqueeze(-1)
    return (hidden.double() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class EmbeddingStats:
    """Sums of the pooled-embedding cosines (spliced and ablated vs clean) over sequences."""

    def __init__(self) -> None:
        self.cos = {"spliced": 0.0, "ablation": 0.0}
        self.sequences = 0

    @torch.no_grad()
    def update(self, outputs: dict[str, Any], batch: TokenBatch) -> None:
        """outputs: {'clean'|'spliced'|'ablation': model output} of `batch`; a sequence counts when
        it has an evaluated token."""
        rows = batch.keep.any(-1).to(batch.input_ids.device)
        pooled = {name: mean_pool(hidden_of(out), batch.attention_mask)[rows] for name, out in outputs.items()}
        for name in ("spliced", "ablation"):
            self.cos[name] += float(F.cosine_similarity(pooled["clean"], pooled[name], dim=-1, eps=1e-12).sum())
        self.sequences += int(rows.sum())

    def finalize(self) -> dict[str, float]:
        if self.sequences == 0:
            raise ValueError("data: no sequence holds an evaluated token")
        spliced = self.cos["spliced"] / self.sequences
        ablation = self.cos["ablation"] / self.sequences
        return {
            "embedding_cosine": spliced,
            "embedding_cosine_ablation": ablation,
            "embedding_cosine_recovered": _ratio(spliced - ablation, 1.0 - ablation),
        }
