"""Backend choice: argument > FLASHSAE_BACKEND > auto, and no silent fallback."""

import pytest
import torch

from flashsae import BackendUnavailableError, _backend, _native
from flashsae.ops import sparse_decode, topk_encode

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # resolve() only looks at the device type, so this needs no GPU


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    for stage in _backend.KERNELS["cpu"]:
        assert _backend.resolve(stage, CPU, "auto") == "cpu"


def test_auto_on_other_devices_uses_torch():
    assert _backend.resolve("topk_encode", torch.device("meta"), "auto") == "torch"


def test_auto_on_cuda_prefers_cuda_kernels_where_they_exist():
    # then triton (compiled, never the interpreter), then torch
    fallback = "triton" if _backend.triton_installed() and not _backend.triton_interpreting() else "torch"
    if _native.cuda_module_available():
        assert _backend.resolve("sparse_decode", CUDA, "auto") == "cuda"
    else:
        assert _backend.resolve("sparse_decode", CUDA, "auto") == fallback
    # no CUDA kernel for the encoder yet
    assert _backend.resolve("topk_encode", CUDA, "auto") == fallback


def test_explicit_cuda_without_a_kernel_for_the_stage_is_an_error():
    expected = "it has no kernel for topk_encode yet" if _native.cuda_module_available() else "built without"
    with pytest.raises(BackendUnavailableError, match=expected):
        _backend.resolve("topk_encode", CUDA, "cuda")


def test_environment_variable_is_read(monkeypatch):
    t = (torch.randn(4, 6), torch.randn(10, 6), torch.randn(10), 2)
    monkeypatch.setenv("FLASHSAE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run topk_encode"):
        topk_encode(*t)
    assert topk_encode(*t, backend="cpu")[0].shape == (4, 2), "the argument wins over the environment"
    monkeypatch.setenv("FLASHSAE_BACKEND", "TORCH")
    assert _backend.requested_backend(None) == "torch"
    monkeypatch.setenv("FLASHSAE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FLASHSAE_BACKEND: expected one of auto, cuda, triton, cpu, torch"):
        topk_encode(*t)


def test_error_lists_the_backends_that_can_run():
    with pytest.raises(BackendUnavailableError, match=r"Backends that can: cpu, torch"):
        sparse_decode(torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32), torch.randn(5, 4), backend="cuda")


def test_available_backends_on_cpu():
    assert _backend.available_backends("sae_loss", CPU) == ["cpu", "torch"]
