"""Initialization of a wide SAE draws its float32 random rows a chunk at a time: a 5.6M x 4096 bf16
SAE must not need an 88 GiB float32 draw next to its 88 GiB of weights."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashsae import TopKSAE, Transcoder
from flashsae.modules import base


class LargestFloat32(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_init_draws_float32_rows_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr(base, "INIT_CHUNK_ELEMENTS", 64 * 100)
    for make in (
        lambda: TopKSAE(64, 4096, 4, dtype=torch.bfloat16),
        lambda: Transcoder(64, 4096, 4, dtype=torch.bfloat16),
    ):
        with LargestFloat32() as mode:
            sae = make()
        assert mode.largest <= 64 * 100, f"a float32 tensor of {mode.largest} elements at init"
        norms = sae.W_enc.float().norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2), "unit-norm rows in every chunk"


def test_chunked_init_draws_the_same_weights(monkeypatch):
    torch.manual_seed(0)
    whole = TopKSAE(64, 1000, 4)
    monkeypatch.setattr(base, "INIT_CHUNK_ELEMENTS", 64 * 7)
    torch.manual_seed(0)
    chunked = TopKSAE(64, 1000, 4)
    assert torch.equal(whole.W_dec, chunked.W_dec) and torch.equal(chunked.W_enc, chunked.W_dec)
