"""The shuffle buffer between the model and the SAEs.

Consecutive tokens of one context are strongly correlated; a batch taken straight from the model
would hold a few contexts only. The buffer holds ``capacity`` tokens (of every hookpoint, the same
tokens in the same rows); whenever it is half empty it is topped up with new chunks and its rows are
permuted, and batches are taken from its end. So each batch mixes tokens from about
capacity / ctx_len contexts, half of them from earlier refills.

Its state (rows still held, the permutation generator, the source's position) goes into the
training checkpoint, which is what makes ``--resume`` exact.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Chunk = dict[str, torch.Tensor]


class ChunkSource(Protocol):
    """What feeds the buffer (flashsae.train.activations.ModelActivations is one)."""

    widths: dict[str, int]
    """{hookpoint: d}, in hookpoint order."""
    max_chunk_tokens: int
    """The most rows one chunk can have."""
    dtype: torch.dtype
    device: torch.device

    def next_chunk(self) -> Chunk | None:
        """{hookpoint: [m, d]}, the same m tokens for every hookpoint; None when exhausted."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShuffleBuffer:
    """Shuffled batches of `batch_size` rows from the chunks of an endless `source`.

    Args:
        source: the chunks (its position is part of the buffer's state).
        capacity: tokens held when full (>= 2 x batch_size); the storage has room for one more chunk.
        batch_size: rows per batch.
        seed: of the permutation generator.
    """

    def __init__(self, source: ChunkSource, *, capacity: int, batch_size: int, seed: int) -> None:
        if capacity < 2 * batch_size:
            raise ValueError(f"buffer_tokens: expected at least 2 x batch_size = {2 * batch_size}, got {capacity}")
        self.source = source
        self.widths = dict(source.widths)
        self.hookpoints = list(source.widths)
        self.capacity = capacity
        self.batch_size = batch_size
        rows = capacity + source.max_chunk_tokens
        self.rows = {
            name: torch.empty(rows, d, device=source.device, dtype=source.dtype) for name, d in self.widths.items()
        }
        self.filled = 0
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def _refill(self) -> None:
        while self.filled < self.capacity:
            chunk = self.source.next_chunk()
            if chunk is None:
                raise ValueError("buffer: the activation source ran out (it must cycle over its dataset)")
            m = next(iter(chunk.values())).shape[0]
            for name, storage in self.rows.items():
                storage[self.filled : self.filled + m] = chunk[name]
            self.filled += m
        # one permutation for every hookpoint keeps their rows aligned (same token in the same row)
        order = torch.randperm(self.filled, generator=self.generator).to(next(iter(self.rows.values())).device)
        for storage in self.rows.values():
            storage[: self.filled] = storage[: self.filled].index_select(0, order)

    def _ensure(self) -> None:
        if self.filled <= self.capacity // 2:
            self._refill()

    def peek(self, count: int) -> Chunk:
        """Up to `count` rows of the (filled, shuffled) buffer without taking them: a data sample
        for initialization."""
        self._ensure()
        return {name: storage[: min(count, self.filled)] for name, storage in self.rows.items()}

    def next_batch(self) -> Chunk:
        """The next batch: {hookpoint: [batch_size, d]} (copies; the buffer moves on)."""
        self._ensure()
        start = self.filled - self.batch_size
        batch = {name: storage[start : self.filled].clone() for name, storage in self.rows.items()}
        self.filled = start
        return batch

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON part, tensors): the source's position, the rows still held, the generator state."""
        tensors = {f"rows/{name}": storage[: self.filled].to("cpu", copy=True) for name, storage in self.rows.items()}
        tensors["generator"] = self.generator.get_state()
        return {"filled": self.filled, "source": self.source.state_dict()}, tensors

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.source.load_state_dict(state["source"])
        filled = state["filled"]
        for name, storage in self.rows.items():
            held = tensors.get(f"rows/{name}")
            if held is None or held.shape != (filled, storage.shape[1]):
                got = None if held is None else list(held.shape)
                raise ValueError(
                    f"checkpoint: buffer rows of {name} are {got}, expected [{filled}, {storage.shape[1]}]"
                )
            storage[:filled] = held.to(storage.device, storage.dtype)
        self.filled = filled
        self.generator.set_state(tensors["generator"])
