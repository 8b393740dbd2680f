"""What evaluation runs the model on: batches of token ids with a mask of the tokens to evaluate,
from text (packed into contexts exactly as ``flashsae train`` packs them) or from token ids; and
loading a model for evaluation (with its LM head when it has one, for the downstream CE).

A dataset named by a string is read from its eval part by default (flashsae.train.split: the
documents ``flashsae train`` held out with the same eval_fraction), so an SAE is measured on text it
was not trained on; texts, token ids and batches given directly are evaluated as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model_loading import load_model
from ..train.split import DEFAULT_EVAL_FRACTION, CorpusPart
from ..train.text import ContextPacker, DocumentSource, Tokenization, document_source


@dataclass
class TokenBatch:
    """One model batch."""

    inputs: dict[str, torch.Tensor]
    """Keyword arguments of the model call: input_ids [B, T], attention_mask [B, T] (and whatever
    else a batch of the caller's carried)."""
    keep: torch.Tensor
    """[B, T] bool: the tokens evaluated (real, not special unless asked, within n_tokens)."""

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]


def _texts_source(texts: Sequence[str]) -> DocumentSource:
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"data: a list of texts must hold only str, item {number} is {type(text).__name__}")
    return DocumentSource(f"{len(texts)} texts", lambda start: iter(texts[start:]))


def _contexts_from_text(
    documents: DocumentSource, tokenizer: Any, ctx_len: int, batch_size: int, part: CorpusPart | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    packer = ContextPacker(documents, Tokenization(tokenizer), ctx_len, cycle=False, part=part)
    while (contexts := packer.next_contexts(batch_size)) is not None:
        input_ids, attention_mask = contexts
        yield {"input_ids": input_ids, "attention_mask": attention_mask}


def _contexts_from_ids(ids: torch.Tensor, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] == 0:
        raise ValueError(f"data: token ids must be an int tensor [contexts, tokens], got {ids.dtype} {list(ids.shape)}")
    for start in range(0, ids.shape[0], batch_size):
        rows = ids[start : start + batch_size].long()
        yield {"input_ids": rows, "attention_mask": torch.ones_like(rows)}


def _contexts_from_batches(batches: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    for number, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
            raise TypeError(f"data: batch {number} is not a mapping with an 'input_ids' tensor")
        inputs = dict(batch)
        if inputs["input_ids"].dim() != 2:
            shape = list(inputs["input_ids"].shape)
            raise ValueError(f"data: batch {number} input_ids must be [batch, tokens], got {shape}")
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
        yield inputs


def token_batches(
    data: Any,
    *,
    tokenizer: Any,
    n_tokens: int,
    ctx_len: int,
    batch_size: int,
    exclude_special_tokens: bool,
    device: torch.device,
    text_field: str = "text",
    dataset_split: str = "train",
    dataset_config: str | None = None,
    part: str = "eval",
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> Iterator[TokenBatch]:
    """Batches of `data` until n_tokens tokens are marked for evaluation (the last batch's mask is
    cut so that exactly n_tokens are, unless the data runs out first).

    data: a dataset as ``flashsae train --dataset`` takes it ('pydoc', a .txt / .jsonl file, a folder
    of them, a saved or hub dataset), a list of texts (both need `tokenizer`; packed into contexts of
    ctx_len tokens), an int tensor of token ids [contexts, tokens], or an iterable of model-input
    dicts holding input_ids [batch, tokens] (and optionally attention_mask, token_type_ids, ...).
    Special tokens are recognized through `tokenizer`; without one every real token is evaluated.
    A dataset is read from its `part` (eval, train or all; split by eval_fraction).
    """
    if isinstance(data, str):
        if tokenizer is None:
            raise ValueError("tokenizer: needed to tokenize the dataset given as data")
        contexts = _contexts_from_text(
            document_source(data, text_field=text_field, split=dataset_split, config=dataset_config),
            tokenizer,
            ctx_len,
            batch_size,
            CorpusPart(part, eval_fraction),
        )
    elif isinstance(data, torch.Tensor):
        contexts = _contexts_from_ids(data, batch_size)
    elif isinstance(data, Sequence) and data and all(isinstance(item, str) for item in data):
        if tokenizer is None:
            raise ValueError("tokenizer: needed to tokenize the texts given as data")
        contexts = _contexts_from_text(_texts_source(data), tokenizer, ctx_len, batch_size)
    elif isinstance(data, Iterable) and not isinstance(data, (bytes, Mapping)):
        contexts = _contexts_from_batches(data)
    else:
        raise TypeError(
            "data: expected a dataset name or path, a list of texts, a token id tensor [contexts, tokens] "
            f"or an iterable of input dicts, got {type(data).__name__}"
        )
    special = Tokenization(tokenizer).special_ids if (tokenizer is not None and exclude_special_tokens) else None
    remaining = n_tokens
    for inputs in contexts:
        if remaining <= 0:
            return
        inputs = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in inputs.items()}
        keep = inputs["attention_mask"].bool()
        if special is not None and special.numel():
            keep &= ~torch.isin(inputs["input_ids"], special.to(device))
        # row-major order: the first `remaining` evaluated tokens of this batch
        keep &= (keep.flatten().cumsum(0) <= remaining).view_as(keep)
        remaining -= int(keep.sum())
        yield TokenBatch(inputs, keep)


# --------------------------------------------------------------------------------- the model


def load_eval_model(
    name: str, *, device: torch.device, model_dtype: str = "auto", head: str = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in eval mode on `device`. head: 'auto' loads a causal LM with its LM head
    (AutoModelForCausalLM, for the downstream CE) and anything else as AutoModel; 'causal_lm' and
    'none' force one or the other."""
    return load_model(name, device=device, model_dtype=model_dtype, head=head, trust_remote_code=trust_remote_code)
