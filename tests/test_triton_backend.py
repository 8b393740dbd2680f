"""The triton backend's availability rules, its torch.library registration (opcheck) and a
torch.compile(fullgraph=True) training step through it."""

import copy

import pytest
import torch
from torch.library import opcheck

from flashsae import BackendUnavailableError, TopKSAE, _backend
from flashsae.ops import topk_encode
from helpers import randn, sae_tensors

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # resolve() only looks at the device type, so this needs no GPU
STAGES = sorted(_backend.KERNELS["cpu"])
INTERPRETING = _backend.triton_interpreting()
needs_triton = pytest.mark.skipif(
    not _backend.triton_installed() or not (INTERPRETING or torch.cuda.is_available()),
    reason="triton needs to be installed, and a CUDA GPU or TRITON_INTERPRET=1",
)
DEVICE = torch.device("cpu" if INTERPRETING else "cuda")
ops = torch.ops.flashsae


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


def leaves(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE).requires_grad_() for k, v in t.items()}


@needs_triton
@pytest.mark.parametrize("aux_k", [0, 4])
def test_opcheck_topk_encode(aux_k):
    t = leaves(sae_tensors(9, 12, 70, torch.float32))
    dead = (torch.rand(70) < 0.3).to(DEVICE) if aux_k else None
    opcheck(ops.topk_encode.default, (t["x"], t["W_enc"], t["b_enc"], t["b_dec"], 5, dead, aux_k, "triton", "exact"))
    values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], 5, t["b_dec"], backend="triton")
    d_values = randn(9, 5, dtype=torch.float32).to(DEVICE)
    opcheck(
        ops.topk_encode_backward.default,
        (d_values, values.detach(), indices, t["x"].detach(), t["W_enc"].detach(), t["b_dec"].detach(), True, True,
         "triton"),
    )  # fmt: skip


@needs_triton
def test_opcheck_sparse_decode():
    values = torch.rand(7, 4, device=DEVICE, requires_grad=True)
    indices = torch.randint(-1, 50, (7, 4), dtype=torch.int32, device=DEVICE)
    W_dec = torch.randn(50, 10, device=DEVICE, requires_grad=True)
    b_dec = torch.randn(10, device=DEVICE, requires_grad=True)
    opcheck(ops.sparse_decode.default, (values, indices, W_dec, b_dec, "triton"))
    grad = torch.randn(7, 10, device=DEVICE)
    opcheck(ops.sparse_decode_backward.default, (grad, values.detach(), indices, W_dec.detach(), True, "triton"))


@needs_triton
@pytest.mark.parametrize("aux_k", [0, 3])
def test_opcheck_sae_loss(aux_k):
    t = {k: v.to(DEVICE) for k, v in sae_tensors(8, 11, 60, torch.float32).items()}
    dead = (torch.rand(60) < 0.3).to(DEVICE)
    out = topk_encode(
        t["x"], t["W_enc"], t["b_enc"], 4, t["b_dec"], dead_mask=dead if aux_k else None, aux_k=aux_k, backend="triton"
    )
    values, indices = out[0].requires_grad_(), out[1]
    aux_values, aux_indices = (out[2].requires_grad_(), out[3]) if aux_k else (None, None)
    W_dec, b_dec, x = t["W_dec"].requires_grad_(), t["b_dec"].requires_grad_(), t["x"].requires_grad_()
    opcheck(ops.sae_loss.default, (x, values, indices, W_dec, b_dec, aux_values, aux_indices, "triton"))
    detached = [None if v is None else v.detach() for v in (x, values, W_dec, b_dec, aux_values)]
    grad_aux = torch.rand(8, device=DEVICE) if aux_k else None
    opcheck(
        ops.sae_loss_backward.default,
        (torch.randn(8, 11, device=DEVICE), torch.rand(8, device=DEVICE), grad_aux, detached[0], detached[1], indices,
         detached[2], detached[3], detached[4], aux_indices, True, "triton"),
    )  # fmt: skip


def training_loss(model: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
    out = model(x, dead_mask=dead_mask)
    return out.fvu + out.auxk_loss / 32


@needs_triton
@pytest.mark.compile
def test_compiled_training_step_matches_eager():
    # The ops are custom ops, so dynamo keeps them as single graph nodes (fullgraph) whatever runs
    # inside, the interpreter included.
    torch._dynamo.reset()
    eager = TopKSAE(32, 256, 8, backend="triton", device=DEVICE)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(2, 24, 32, device=DEVICE)  # leading batch shape
    dead = (torch.rand(256) < 0.2).to(DEVICE)
    step = torch.compile(training_loss, fullgraph=True, backend="aot_eager")
    loss = step(compiled_model, x, dead)
    loss.backward()
    reference = training_loss(eager, x, dead)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=f"grad of {name}")
