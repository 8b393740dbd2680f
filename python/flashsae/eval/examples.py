"""Top-activating examples: for every latent, the tokens where it fired most strongly, kept while the
activations stream by (memory: n_latents x per_latent entries, never [tokens, n_latents]).

Each batch's active (latent, value, token) triples are merged with the running top lists by one
sort on (latent, value descending); ties keep the earlier token. At the end the examples of the
chosen latents become token windows for display.

Which latents to show (:func:`choose_latents`): the busiest latents of an SAE fire on 10-40% of
tokens and are the hardest to read, so by default ("spread") a quarter of the cards go to the
strongest latents (highest activation seen) and the rest are spread over the density range: the
alive latents are put in decade buckets of density (fires on 0.01-0.1% of tokens, 0.1-1%, ...),
the cards are dealt to the buckets in turn from the rarest, and within a bucket the latents are
taken at evenly spaced density ranks. "busiest" shows the most frequently firing latents.
"""

from __future__ import annotations

import bisect
import math
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
    group: str = ""
    """Why it was chosen (choose_latents): 'strongest', a density bucket such as 'fires on
    0.1%-1% of tokens', or 'busiest'."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent": self.latent,
            "density": self.density,
            "max_activation": self.max_activation,
            "group": self.group,
            "examples": [example.to_dict() for example in self.examples],
        }


#: Values of EvalConfig.latent_selection.
LATENT_SELECTIONS = ("spread", "busiest")
STRONGEST = "strongest"
BUSIEST = "busiest"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.10g}%"


def density_bucket(density: float) -> str:
    """The decade of density a latent is in, as a card label: 'fires on 0.1%-1% of tokens'."""
    decade = min(math.floor(math.log10(density)), -1)
    return f"fires on {_percent(10.0**decade)}-{_percent(10.0 ** (decade + 1))} of tokens"


def choose_latents(
    density: torch.Tensor, max_activation: torch.Tensor, count: int, selection: str = "spread"
) -> list[tuple[int, str]]:
    """Up to `count` alive latents to show, as (latent, group) in display order (see the module
    docstring). density and max_activation are [n_latents]; dead latents are never chosen."""
    if selection not in LATENT_SELECTIONS:
        raise ValueError(f"latent_selection: expected one of {', '.join(LATENT_SELECTIONS)}, got {selection!r}")
    density = density.double().cpu()
    alive = [int(i) for i in torch.argsort(density, descending=True, stable=True) if density[i] > 0]
    if selection == BUSIEST:
        return [(latent, BUSIEST) for latent in alive[:count]]
    strength = max_activation.double().cpu()
    strongest = sorted(alive, key=lambda latent: (-float(strength[latent]), latent))[: count // 4 if count > 1 else 0]
    chosen = [(latent, STRONGEST) for latent in strongest]
    buckets: dict[str, list[int]] = {}
    for latent in reversed(alive):  # from the rarest, so buckets are in rising density
        if latent not in strongest:
            buckets.setdefault(density_bucket(float(density[latent])), []).append(latent)
    slots = dict.fromkeys(buckets, 0)
    remaining = min(count - len(chosen), sum(len(members) for members in buckets.values()))
    while remaining > 0:
        for label, members in buckets.items():
            if remaining and slots[label] < len(members):
                slots[label] += 1
                remaining -= 1
    for label, members in buckets.items():
        taken = slots[label]
        # evenly spaced ranks through the bucket (members run from rarest to densest)
        chosen += [(members[(2 * j + 1) * len(members) // (2 * taken)], label) for j in range(taken)]
    return chosen


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

    def max_activation(self) -> torch.Tensor:
        """[n_latents]: the highest activation seen of each latent (-inf: never fired)."""
        return self.values[:, 0]

    def examples(
        self,
        latents: list[int] | list[tuple[int, str]],
        density: torch.Tensor,
        tokenizer: Any,
        *,
        before: int = 16,
        after: int = 4,
    ) -> list[LatentExamples]:
        """The chosen latents' examples as token windows (`before` tokens of context, `after` after);
        latents are ids or (id, group) pairs."""
        values = self.values.cpu()
        tokens = self.tokens.cpu()
        result = []
        for entry in latents:
            latent, group = entry if isinstance(entry, tuple) else (entry, "")
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
            result.append(LatentExamples(latent, float(density[latent]), maximum, examples, group))
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
