"""The train / evaluation split of a corpus: every document belongs to exactly one part.

A document is in the evaluation part when the hash of its text, read as a number in [0, 1), is
below ``eval_fraction``: u(text) = first 8 bytes of BLAKE2b-64(UTF-8 text, person "flashsae-split")
/ 2^64. The rule needs nothing but the document itself, so it is

- deterministic: the same text is in the same part on every machine, run and Python version;
- streaming: a Hugging Face stream is split as it is read, without knowing its length;
- leak-free under duplication: two copies of a text land in the same part, so an evaluation
  document never appears among the training documents, however often the corpus repeats it.

The parts are about ``eval_fraction`` of the documents, not exactly: of the demo corpus' 79
documents (128k MiniLM tokens), 0.1 holds out 7 documents, 19.7k tokens, and leaves 72 documents,
108k tokens, to train on. ``flashsae train`` trains on the train part and measures its end-of-training
metrics on the evaluation part; ``flashsae cache`` stores both; ``flashsae eval`` and ``flashsae
report`` read the evaluation part by default.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: The parts a reader can ask for: one side of the split, or the whole corpus.
PARTS = ("train", "eval", "all")
#: Default share of documents held out for evaluation (TrainConfig / CacheConfig.eval_fraction).
DEFAULT_EVAL_FRACTION = 0.1
_PERSON = b"flashsae-split"


def split_score(text: str) -> float:
    """u(text) in [0, 1): where the document falls on the split's scale (below eval_fraction: eval)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big") / 2**64


class EmptyPartError(ValueError):
    """The part asked for holds none of the corpus' documents (a small corpus, or eval_fraction 0)."""


@dataclass(frozen=True)
class CorpusPart:
    """One part of a corpus split: which documents a reader keeps."""

    part: str = "all"
    """train, eval, or all (no split: every document)."""
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    """Documents whose split_score is below this are the eval part; the rest are the train part.
    0 puts every document in the train part (and none in the eval part)."""

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"split: expected one of {', '.join(PARTS)}, got {self.part!r}")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)):
            raise TypeError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction}")

    def keeps(self, text: str) -> bool:
        """Whether the document `text` belongs to this part."""
        if self.part == "all":
            return True
        return (split_score(text) < self.eval_fraction) == (self.part == "eval")

    def describe(self) -> str:
        """The part in words, e.g. 'eval part (10% of documents, by text hash)'."""
        if self.part == "all":
            return "all documents (no split)"
        share = self.eval_fraction if self.part == "eval" else 1 - self.eval_fraction
        return f"{self.part} part ({100 * share:.3g}% of documents, by text hash)"


def check_eval_fraction(value: object) -> None:
    """Raises the error CorpusPart raises for a bad eval_fraction (for configs that hold one)."""
    CorpusPart("all", value)  # type: ignore[arg-type]
