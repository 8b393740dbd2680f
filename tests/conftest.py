import os

# Triton kernels are tested in interpreter mode on CPU; this must be set before any kernel module
# is imported (triton.jit decides between compiled and interpreted kernels then), hence before flashsae.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import zlib

import pytest
import torch

from flashsae import _native

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN / an invalid index, so an unwritten element fails a test."""
    with _native.poison_outputs():
        yield


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs per test case, reproducible from the test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["one_tile", "many_tiles"])
def tile_elements(request, monkeypatch):
    """Runs a topk_encode test with the default tile (one tile at test sizes) and with tiles of
    256 latents, so the running top-k merges across tiles, including a partial last tile."""
    if request.param == "many_tiles":
        monkeypatch.setattr(topk_encode_module, "TILE_ELEMENTS", 1)
    return request.param
