"""Backend choice: argument > FLASHSAE_BACKEND > auto, no silent fallback, what the dispatch tables
register, and the triton backend's availability rules."""

import pytest
import torch

from flashsae import BackendUnavailableError, _backend, _native
from flashsae.ops import sparse_decode, topk_encode

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # resolve() only looks at the device type, so this needs no GPU
STAGES = sorted(_backend.KERNELS["cpu"])
needs_triton = pytest.mark.skipif(
    not _backend.triton_installed() or not (_backend.triton_interpreting() or torch.cuda.is_available()),
    reason="triton needs to be installed, and a CUDA GPU or TRITON_INTERPRET=1",
)


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    for stage in _backend.KERNELS["cpu"]:
        assert _backend.resolve(stage, CPU, "auto") == "cpu"


def test_auto_on_other_devices_uses_torch():
    assert _backend.resolve("topk_encode", torch.device("meta"), "auto") == "torch"


def test_auto_on_cuda_prefers_cuda_kernels_where_they_exist(monkeypatch):
    # then triton (compiled, never the interpreter), then torch
    fallback = "triton" if _backend.triton_installed() and not _backend.triton_interpreting() else "torch"
    monkeypatch.setenv("FLASHSAE_AUTO_UNVALIDATED", "1")  # as if the CUDA kernels had passed on a GPU
    for stage in _backend.KERNELS["cuda"]:
        expected = "cuda" if _native.cuda_module_available() else fallback
        assert _backend.resolve(stage, CUDA, "auto") == expected
    # no CUDA kernel in float64: triton has none either
    assert _backend.resolve("sparse_decode", CUDA, "auto", torch.float64) == "torch"


@pytest.fixture
def cuda_module_present(monkeypatch):
    """Resolution as on a machine with flashsae._C_cuda built (resolve() never touches a GPU)."""
    monkeypatch.setattr(_native, "cuda_module_available", lambda: True)
    monkeypatch.delenv("FLASHSAE_AUTO_UNVALIDATED", raising=False)


def test_auto_skips_cuda_kernels_awaiting_gpu_validation(cuda_module_present):
    # auto must not pick them until the cuda cases of tests/ops and compute-sanitizer have passed on a
    # GPU (then CUDA_AWAITING_VALIDATION is emptied)
    fallback = "triton" if _backend.triton_installed() and not _backend.triton_interpreting() else "torch"
    assert _backend.CUDA_AWAITING_VALIDATION.issubset(_backend.KERNELS["cuda"])
    for stage in _backend.CUDA_AWAITING_VALIDATION:
        assert _backend.resolve(stage, CUDA, "auto", torch.bfloat16) == fallback
        assert "cuda" not in _backend.available_backends(stage, CUDA)
        assert _backend.resolve(stage, CUDA, "cuda", torch.bfloat16) == "cuda", "an explicit choice still runs them"


def test_unvalidated_cuda_kernels_can_be_let_into_auto(cuda_module_present, monkeypatch):
    monkeypatch.setenv("FLASHSAE_AUTO_UNVALIDATED", "1")
    for stage in _backend.KERNELS["cuda"]:
        assert _backend.resolve(stage, CUDA, "auto", torch.float32) == "cuda"
    monkeypatch.setenv("FLASHSAE_AUTO_UNVALIDATED", "0")
    assert _backend.resolve("sparse_decode", CUDA, "auto", torch.float32) != "cuda"


def test_validated_cuda_stages_are_picked_by_auto(cuda_module_present, monkeypatch):
    # once validated, a stage leaves the set and auto picks its CUDA kernel
    monkeypatch.setattr(_backend, "CUDA_AWAITING_VALIDATION", frozenset({"topk_encode"}))
    assert _backend.resolve("sparse_decode", CUDA, "auto", torch.bfloat16) == "cuda"
    assert _backend.resolve("topk_encode", CUDA, "auto", torch.bfloat16) != "cuda"


def test_cuda_backend_refuses_float64(cuda_module_present):
    with pytest.raises(BackendUnavailableError, match="float32, bfloat16 or float16 tensors and these are float64"):
        _backend.resolve("sae_loss", CUDA, "cuda", torch.float64)


def test_explicit_cuda_without_a_kernel_for_the_stage_is_an_error(monkeypatch):
    monkeypatch.setitem(_backend.KERNELS, "cuda", frozenset())
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


def test_kernels_are_what_the_dispatch_tables_register():
    tables = _backend._dispatch_tables()
    assert set(tables) == {
        "topk_encode", "topk_encode_backward", "sparse_decode", "sparse_decode_backward", "sae_loss",
        "sae_loss_backward", "sparse_adam", "sparse_adam_rowwise",
    }  # fmt: skip
    for backend, stages in _backend.KERNELS.items():
        assert stages == {stage for stage, impls in tables.items() if backend in impls}
    assert all("torch" in impls for impls in tables.values()), "torch implements every stage"
    assert _backend.CUDA_AWAITING_VALIDATION == _backend.KERNELS["cuda"]


def test_a_table_without_a_torch_entry_is_refused():
    with pytest.raises(ValueError, match="a dispatch table needs a torch entry"):
        _backend.register({"new_op": {"cpu": print}})
    assert "new_op" not in _backend._dispatch_tables()


def test_triton_lists_every_stage():
    assert _backend.KERNELS["triton"] == _backend.KERNELS["cpu"]


@pytest.mark.parametrize("interpreting", [True, False])
def test_auto_never_picks_triton_for_cpu_tensors(interpreting, monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: interpreting)
    for stage in STAGES:
        assert _backend.resolve(stage, CPU, "auto") == "cpu"
        assert "triton" not in _backend.available_backends(stage, CPU, torch.float32)


def test_auto_on_cuda_picks_triton_unless_interpreting(monkeypatch):
    monkeypatch.setattr(_backend, "triton_installed", lambda: True)
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: False)
    assert _backend.resolve("topk_encode", CUDA, "auto", torch.bfloat16) == "triton"
    assert _backend.resolve("sae_loss_backward", CUDA, "auto", torch.float32) == "triton"
    # float64 has no triton kernel: auto uses torch there
    assert _backend.resolve("topk_encode", CUDA, "auto", torch.float64) == "torch"
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: True)  # the interpreter is never "fast"
    assert _backend.resolve("topk_encode", CUDA, "auto", torch.bfloat16) == "torch"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "triton_installed", lambda: True)
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: False)
    with pytest.raises(
        BackendUnavailableError,
        match=r"backend 'triton' cannot run topk_encode: it runs on cuda tensors and these are on cpu \(CPU tensors "
        r"only under the Triton interpreter",
    ):
        topk_encode(torch.randn(4, 6), torch.randn(10, 6), torch.randn(10), 2, backend="triton")


def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(_backend, "triton_installed", lambda: False)
    with pytest.raises(
        BackendUnavailableError, match=r"cannot run sparse_decode: triton is not installed \(pip install triton"
    ):
        _backend.resolve("sparse_decode", CUDA, "triton", torch.float32)


@needs_triton
def test_the_interpreter_decision_is_the_kernels(monkeypatch):
    # once the kernels are imported, their mode wins over a later change of TRITON_INTERPRET
    import flashsae.kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0" if flashsae.kernels.INTERPRETED else "1")
    assert _backend.triton_interpreting() == flashsae.kernels.INTERPRETED
