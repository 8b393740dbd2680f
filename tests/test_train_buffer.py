"""The shuffle buffer: nothing lost or repeated, batches mix many chunks, hookpoints stay aligned,
refills at half, exact state round trip."""

import json

import pytest
import torch

from flashsae.train.buffer import ShuffleBuffer


class CountingSource:
    """Chunks of consecutive token ids; hookpoint 'b' holds -id (so alignment is checkable)."""

    widths = {"a": 3, "b": 2}  # noqa: RUF012
    max_chunk_tokens = 16
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, sizes=(7, 13, 5, 16)) -> None:
        self.next_id = 0
        self.calls = 0
        self.sizes = sizes

    def state_dict(self):
        return {"next_id": self.next_id, "calls": self.calls}

    def load_state_dict(self, state):
        self.next_id, self.calls = state["next_id"], state["calls"]

    def next_chunk(self):
        size = self.sizes[self.calls % len(self.sizes)]
        ids = torch.arange(self.next_id, self.next_id + size, dtype=torch.float32)
        self.next_id += size
        self.calls += 1
        return {"a": ids.unsqueeze(1).repeat(1, 3), "b": -ids.unsqueeze(1).repeat(1, 2)}


def make_buffer(source, capacity=64, batch_size=8, seed=0):
    return ShuffleBuffer(source, capacity=capacity, batch_size=batch_size, seed=seed)


def test_every_token_once_aligned_and_mixed():
    source = CountingSource()
    buffer = make_buffer(source)
    served = []
    for _ in range(40):
        batch = buffer.next_batch()
        assert batch["a"].shape == (8, 3) and batch["b"].shape == (8, 2)
        assert torch.equal(batch["b"][:, 0], -batch["a"][:, 0]), "both hookpoints see the same tokens"
        served.append(batch["a"][:, 0])
    served = torch.cat(served).long()
    held = buffer.rows["a"][: buffer.filled, 0].long()
    everything = torch.cat([served, held]).sort().values
    assert torch.equal(everything, torch.arange(source.next_id)), "no token lost or repeated"
    # consecutive batches are not consecutive tokens: one batch spans many chunks
    first = served[:8]
    assert first.max() - first.min() > 16


def test_refills_when_half_empty():
    source = CountingSource(sizes=(16,))
    buffer = make_buffer(source, capacity=64, batch_size=8)
    buffer.next_batch()
    assert source.calls == 4 and buffer.filled == 56
    for _ in range(3):
        buffer.next_batch()
    assert source.calls == 4 and buffer.filled == 32  # exactly half: the next batch refills first
    buffer.next_batch()
    assert source.calls == 6 and buffer.filled == 56


def test_state_round_trip_is_exact():
    source = CountingSource()
    buffer = make_buffer(source, seed=3)
    for _ in range(11):
        buffer.next_batch()
    state, tensors = buffer.state_dict()
    state = json.loads(json.dumps(state))  # the JSON part goes through a file
    expected = [buffer.next_batch() for _ in range(25)]

    restored = make_buffer(CountingSource(), seed=99)  # source position and generator come from the state
    restored.load_state_dict(state, {k: v.clone() for k, v in tensors.items()})
    for batch in expected:
        again = restored.next_batch()
        assert torch.equal(batch["a"], again["a"]) and torch.equal(batch["b"], again["b"])


def test_seeds_change_the_order_and_peek_takes_nothing():
    a, b = make_buffer(CountingSource(), seed=0), make_buffer(CountingSource(), seed=1)
    sample = a.peek(10)["a"].clone()
    assert a.filled >= 64 and torch.equal(sample, a.rows["a"][:10])
    assert not torch.equal(a.next_batch()["a"], b.next_batch()["a"])


def test_capacity_must_hold_two_batches():
    with pytest.raises(ValueError, match=r"buffer_tokens: expected at least 2 x batch_size = 64, got 40"):
        make_buffer(CountingSource(), capacity=40, batch_size=32)


def test_an_exhausted_source_is_an_error():
    source = CountingSource()
    source.next_chunk = lambda: None
    with pytest.raises(ValueError, match=r"buffer: the activation source ran out"):
        make_buffer(source).next_batch()
