"""Fixtures of the op tests: ``be``, the backend a test runs on (parametrized with
helpers.backends / helpers.backends_and_dtypes, ``indirect``), ``chunks`` and ``path``."""

from __future__ import annotations

import importlib

import pytest
import torch

import cuda_fake
from helpers import INTERPRETING, Backend

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")


@pytest.fixture
def be(request, monkeypatch) -> Backend:
    name = request.param
    if name == "cuda_fake":
        cuda_fake.install(monkeypatch)
        return Backend("cuda", torch.device("cpu"))
    if name == "cuda":
        return Backend("cuda", torch.device("cuda"))
    if name == "triton":
        return Backend("triton", torch.device("cpu" if INTERPRETING else "cuda"))
    return Backend(name, torch.device("cpu"))


@pytest.fixture(params=["one_chunk", "many_chunks"])
def chunks(request, be, monkeypatch):
    """Runs a topk_encode test with the encoder's latents in one chunk, and in many, so the running
    selection carries over between chunks: tiles of 256 latents (partial last one) for cpu / torch,
    256-latent score chunks for cuda, the latents split over 3 programs for triton (its finishing
    kernel then merges the chunk lists)."""
    if request.param == "many_chunks":
        if be.name in ("cpu", "torch"):
            monkeypatch.setattr(topk_encode_module, "TILE_ELEMENTS", 1)
        elif be.name == "cuda":
            monkeypatch.setattr(topk_encode_module, "CUDA_CHUNK_ELEMENTS", 1)
        else:
            from flashsae.kernels import topk_encode as kernels

            monkeypatch.setattr(kernels, "CHUNKS", 3)
    return request.param



@pytest.fixture(params=["sparse", "dense_fallback"])
def path(request, monkeypatch):
    """The sparse retry path of a variable-count composite (the test module's ``composite_module``:
    batch_topk, threshold_encode) at every size (no dense fallback), or its dense fallback whenever
    the first attempt is not enough."""
    monkeypatch.setattr(request.module.composite_module, "DENSE_FRACTION", 1.0 if request.param == "sparse" else 0.0)
    return request.param
