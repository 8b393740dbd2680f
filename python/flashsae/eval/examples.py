"""Top-activating examples: for every latent, the tokens where it fired most strongly, kept while the
activations stream by (memory: n_latents x per_latent entries, never [tokens, n_latents]).

Each batch's active (latent, value, token) triples are merged with the running top lists by one
sort on (latent, value descending); ties keep the earlier token. At the end the examples of the
chosen latents become token windows for display.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from ..outputs import SparseLatents


@dataclass
class Example:
    """One top-activating token of a latent, in its context."""

    activation: float
    """The latent's activation at the highlighted token."""
    tokens: list[str]
    """The window of context tokens, as text."""
    highlight: int
    """Index in ``tokens`` of the token where the latent fired."""

    def to_dict(self) -> dict[str, Any]:
        return {"activation": self.activation, "tokens": self.tokens, "highlight": self.highlight}


@dataclass
class LatentExamples:
    """A latent with its firing statistics and top-activating examples."""

    latent: int
    density: float
    """Fraction of the evaluated tokens on which it fired."""
    max_activation: float
    examples: list[Example]

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent": self.latent,
            "density": self.density,
            "max_activation": self.max_activation,
            "examples": [example.to_dict() for example in self.examples],
        }


class TopExamples:
    """Running top `per_latent` (activation, token) pairs of every latent."""

    def __init__(self, n_latents: int, per_latent: int, device: torch.device) -> None:
        self.n_latents = n_latents
        self.per_latent = per_latent
        self.values = torch.full((n_latents, per_latent), float("-inf"), dtype=torch.float32, device=device)
        self.tokens = torch.full((n_latents, per_latent), -1, dtype=torch.int64, device=device)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input_ids, attention_mask) on the CPU
        self.offsets: list[int] = []  # global index of each batch's first token slot
        self._next_offset = 0

    def add_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """Records a batch's tokens; returns the global index of its first token slot."""
        offset = self._next_offset
        self.batches.append((input_ids.detach().cpu(), attention_mask.detach().cpu()))
        self.offsets.append(offset)
        self._next_offset += input_ids.numel()
        return offset

    @torch.no_grad()
    def update(self, latents: SparseLatents, token_ids: torch.Tensor) -> None:
        """latents [N, m] of N tokens whose global indices are token_ids [N]."""
        values, indices = latents
        device = self.values.device
        values, indices = values.to(device).float(), indices.to(device).long()
        active = (values > 0) & (indices >= 0)
        if not bool(active.any()):
            return
        slots = token_ids.to(device).unsqueeze(-1).expand_as(indices)
        new_latents, new_values, new_tokens = indices[active], values[active], slots[active]
        k = self.per_latent
        own = torch.arange(self.n_latents, device=device).repeat_interleave(k)
        latent = torch.cat([own, new_latents])
        value = torch.cat([self.values.flatten(), new_values])
        token = torch.cat([self.tokens.flatten(), new_tokens])
        # by value descending, then (stable) by latent: each latent's candidates end up best first;
        # the running entries come first, so equal values keep the earlier token
        order = torch.argsort(value, descending=True, stable=True)
        order = order[torch.argsort(latent[order], stable=True)]
        sizes = k + torch.bincount(new_latents, minlength=self.n_latents)
        starts = torch.cumsum(sizes, 0) - sizes
        latent_sorted = latent[order]
        rank = torch.arange(order.numel(), device=device) - starts[latent_sorted]
        best = order[rank < k]  # exactly k per latent, in latent order
        self.values = value[best].view(self.n_latents, k)
        self.tokens = token[best].view(self.n_latents, k)

    def _locate(self, token: int) -> tuple[int, int, int]:
        """(batch, row, position) of a global token index."""
        batch = bisect.bisect_right(self.offsets, token) - 1
        input_ids = self.batches[batch][0]
        row, position = divmod(token - self.offsets[batch], input_ids.shape[1])
        return batch, row, position

    def examples(
        self, latents: list[int], density: torch.Tensor, tokenizer: Any, *, before: int = 16, after: int = 4
    ) -> list[LatentExamples]:
        """The chosen latents' examples as token windows (`before` tokens of context, `after` after)."""
        values = self.values.cpu()
        tokens = self.tokens.cpu()
        result = []
        for latent in latents:
            examples = []
            for value, token in zip(values[latent].tolist(), tokens[latent].tolist(), strict=True):
                if token < 0:
                    continue
                batch, row, position = self._locate(token)
                input_ids, attention_mask = self.batches[batch]
                start, stop = max(0, position - before), min(input_ids.shape[1], position + after + 1)
                shown = [p for p in range(start, stop) if attention_mask[row, p]]  # padding left out
                ids = input_ids[row, shown].tolist()
                examples.append(Example(value, token_texts(tokenizer, ids), shown.index(position)))
            maximum = examples[0].activation if examples else 0.0
            result.append(LatentExamples(latent, float(density[latent]), maximum, examples))
        return result


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token of a window as the text it adds to the decoded window, so that the pieces join
    into the window's text: WordPiece's spaces between words and its '##' continuations come out
    right ('the', ' cat', 's'), which decoding tokens one at a time loses ("#1234" without a
    tokenizer). A byte-level token holding part of a multi-byte character gets the character when
    it completes; the partial ones show as the replacement character (their own decoding)."""
    if tokenizer is None:
        return [f"#{token_id}" for token_id in ids]
    pieces = []
    previous = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], clean_up_tokenization_spaces=False)
        stable = text.rstrip("\ufffd") if end < len(ids) else text  # an unfinished character waits
        piece = stable[len(previous) :] if stable.startswith(previous) else ""
        pieces.append(piece or tokenizer.decode(ids[end - 1 : end], clean_up_tokenization_spaces=False))
        previous = stable
    return pieces
