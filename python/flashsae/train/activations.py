"""Activations from a Hugging Face ``transformers`` model (loaded by flashsae.model_loading): hookpoints
by module path or glob, and one forward pass that feeds every hookpoint and stops right after the
last of them (the layers after it never run).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import model_loading
from ..hookpoints import resolve_hookpoints
from ..model_loading import resolve_device
from .config import ActivationSourceConfig
from .split import CorpusPart
from .text import ContextPacker, Tokenization, document_source


def load_model(config: ActivationSourceConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of `config` in eval mode on `device` (the base model, no head)."""
    return model_loading.load_model(
        config.model, device=device, model_dtype=config.model_dtype, trust_remote_code=config.trust_remote_code
    )


# ------------------------------------------------------------------------------------- hookpoints
# Resolution (paths, globs, the optional base-model prefix) lives in flashsae.hookpoints, shared
# with flashsae.hooks and flashsae.eval.


class _StopForward(BaseException):
    """Raised by the last hook to end the forward pass early (BaseException: model code that
    catches Exception must not swallow it)."""


def _output_tensor(name: str, output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "to_tuple"):
        output = output.to_tuple()[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 3:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"hookpoints: {name} outputs {shape}, expected a [batch, tokens, d] tensor")
    return output


class HookedModel:
    """Runs a model and returns the outputs of its hookpoints, stopping after the last one."""

    def __init__(self, model: nn.Module, hookpoints: list[str]) -> None:
        self.model = model
        self.hookpoints = hookpoints
        self._modules = dict(model.named_modules())

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        wanted = len(self.hookpoints)

        def capture(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if name in captured:  # a module run twice (shared weights): the first call counts
                    return
                captured[name] = _output_tensor(name, output)
                if len(captured) == wanted:
                    raise _StopForward

            return hook

        handles = [self._modules[name].register_forward_hook(capture(name)) for name in self.hookpoints]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.hookpoints if name not in captured]
        if missing:
            raise ValueError(f"hookpoints: {', '.join(missing)} did not run in the model's forward pass")
        return captured


#: How the hookpoints of a second model (TrainConfig.model_b, model diffing) are named.
MODEL_B_PREFIX = "model_b:"


def check_same_tokenizer(first: Any, second: Any, names: tuple[str, str]) -> None:
    """ValueError naming model_b unless both tokenizers give the same ids (vocabulary, special tokens
    and the ids of a probe text): two models read on the same token ids must mean the same text."""
    probe = "Sparse autoencoders read activations; 12 tokens, café, über!\n  def f(x): return x"
    same = (
        first.get_vocab() == second.get_vocab()
        and first.all_special_ids == second.all_special_ids
        and first(probe)["input_ids"] == second(probe)["input_ids"]
    )
    if not same:
        raise ValueError(
            f"model_b: {names[1]}'s tokenizer differs from {names[0]}'s (vocabulary, special tokens or the "
            "ids of a probe text); a crosscoder reads both models on the same tokens"
        )


class ModelActivations:
    """Text -> model -> activations of every hookpoint, chunk by chunk.

    Each chunk holds the same tokens for every hookpoint ([tokens, d_h] each, in context order),
    without padding and, by option, without special tokens. `part` is the side of the corpus
    split read (train, eval or all; split by config.eval_fraction). State: the packer's position.
    With config.model_b (model diffing) a second model runs on the same token ids; its hookpoints
    follow the first model's, named MODEL_B_PREFIX + module path.
    """

    def __init__(
        self,
        config: ActivationSourceConfig,
        *,
        cycle: bool,
        device: torch.device | None = None,
        part: str = "train",
    ) -> None:
        self.config = config
        self.device = device if device is not None else resolve_device(config.device)
        self.model, tokenizer = load_model(config, self.device)
        self.hookpoints = resolve_hookpoints(self.model, config.model_hookpoints())
        self.hooked = HookedModel(self.model, self.hookpoints)
        self.hooked_b = None
        model_b = getattr(config, "model_b", None)
        if model_b is not None:
            self.model_b, tokenizer_b = model_loading.load_model(
                model_b, device=self.device, model_dtype=config.model_dtype, trust_remote_code=config.trust_remote_code
            )
            check_same_tokenizer(tokenizer, tokenizer_b, (config.model, model_b))
            self.hooked_b = HookedModel(self.model_b, resolve_hookpoints(self.model_b, config.model_hookpoints()))
            self.hookpoints = self.hookpoints + [MODEL_B_PREFIX + name for name in self.hooked_b.hookpoints]
        self.tokenization = Tokenization(tokenizer)
        documents = document_source(
            config.dataset, text_field=config.text_field, split=config.dataset_split, config=config.dataset_config
        )
        self.dataset_description = documents.description
        self.part = CorpusPart(part, config.eval_fraction)
        self.packer = ContextPacker(documents, self.tokenization, config.ctx_len, cycle=cycle, part=self.part)
        self.special_ids = self.tokenization.special_ids.to(self.device)
        self.widths = self._probe_widths()
        self._kept_this_pass = 0
        self.max_chunk_tokens = config.model_batch_size * config.ctx_len
        self.dtype = next(self.model.parameters()).dtype

    def _probe_widths(self) -> dict[str, int]:
        ids = torch.tensor([self.tokenization.prefix + [self.tokenization.pad_id] * 2 + self.tokenization.suffix])
        outputs = self._run(ids.to(self.device), torch.ones_like(ids).to(self.device))
        return {name: out.shape[-1] for name, out in outputs.items()}

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every hookpoint's output on these tokens: the model's, then model_b's (prefixed)."""
        outputs = self.hooked(input_ids, attention_mask)
        if self.hooked_b is not None:
            second = self.hooked_b(input_ids, attention_mask)
            outputs.update({MODEL_B_PREFIX + name: out for name, out in second.items()})
        return outputs

    def other_part(self, part: str, *, cycle: bool = False) -> ModelActivations:
        """The same model, hookpoints and corpus, reading `part` from its start (no second model load)."""
        other = copy.copy(self)
        other.part = CorpusPart(part, self.config.eval_fraction)
        other.packer = ContextPacker(
            self.packer.documents, self.tokenization, self.config.ctx_len, cycle=cycle, part=other.part
        )
        other._kept_this_pass = 0
        return other

    def state_dict(self) -> dict[str, int]:
        return self.packer.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.packer.load_state_dict(state)

    def next_chunk(self) -> dict[str, torch.Tensor] | None:
        """Activations of the next model batch (None after the last pass of a non-cycling source)."""
        while True:
            passes = self.packer.passes
            contexts = self.packer.next_contexts(self.config.model_batch_size)
            if contexts is None:
                return None
            input_ids, attention_mask = (t.to(self.device) for t in contexts)
            keep = attention_mask.bool()
            if self.config.exclude_special_tokens:
                keep &= ~torch.isin(input_ids, self.special_ids)
            keep = keep.flatten()
            outputs = self._run(input_ids, attention_mask)
            chunk = {name: out.reshape(-1, out.shape[-1])[keep] for name, out in outputs.items()}
            kept = int(keep.sum())
            self._kept_this_pass += kept
            if self.packer.passes != passes:
                if self._kept_this_pass == 0:
                    raise ValueError(f"dataset: {self.dataset_description} yields no tokens besides special ones")
                self._kept_this_pass = 0
            if kept:
                return chunk

    def chunks(self) -> Iterator[dict[str, torch.Tensor]]:
        while (chunk := self.next_chunk()) is not None:
            yield chunk
