"""The ops as torch.library custom ops on every backend: opcheck (schema, fake tensors, autograd
registration, AOT dispatch) and torch.compile(fullgraph=True) of a TopKSAE training step."""

import copy

import pytest
import torch
from torch.library import opcheck

from flashsae import TopKSAE
from flashsae.ops import topk_encode
from helpers import backends, on, randn, sae_tensors

ops = torch.ops.flashsae
OPCHECK_BACKENDS = backends("cpu", "torch", "triton")


def grad_leaves(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone().requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize("aux_k", [0, 4])
@pytest.mark.parametrize("be", OPCHECK_BACKENDS, indirect=True)
def test_opcheck_topk_encode(be, aux_k):
    t = grad_leaves(on(be.device, sae_tensors(9, 12, 70, torch.float32)))
    dead = (torch.rand(70) < 0.3).to(be.device) if aux_k else None
    opcheck(ops.topk_encode.default, (t["x"], t["W_enc"], t["b_enc"], t["b_dec"], 5, dead, aux_k, be.name))
    values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], 5, t["b_dec"], backend=be.name)
    d_values = randn(9, 5, dtype=torch.float32).to(be.device)
    opcheck(
        ops.topk_encode_backward.default,
        (d_values, values.detach(), indices, t["x"].detach(), t["W_enc"].detach(), t["b_dec"].detach(), True, True,
         be.name),
    )  # fmt: skip


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("be", OPCHECK_BACKENDS, indirect=True)
def test_opcheck_sparse_decode(be, with_bias):
    values = torch.rand(7, 4, device=be.device, requires_grad=True)
    indices = torch.randint(-1, 50, (7, 4), dtype=torch.int32, device=be.device)
    W_dec = torch.randn(50, 10, device=be.device, requires_grad=True)
    b_dec = torch.randn(10, device=be.device, requires_grad=True) if with_bias else None
    opcheck(ops.sparse_decode.default, (values, indices, W_dec, b_dec, be.name))
    grad = torch.randn(7, 10, device=be.device)
    opcheck(ops.sparse_decode_backward.default, (grad, values.detach(), indices, W_dec.detach(), with_bias, be.name))


@pytest.mark.parametrize("aux_k", [0, 3])
@pytest.mark.parametrize("be", OPCHECK_BACKENDS, indirect=True)
def test_opcheck_sae_loss(be, aux_k):
    t = on(be.device, sae_tensors(8, 11, 60, torch.float32))
    dead = (torch.rand(60) < 0.3).to(be.device)
    out = topk_encode(
        t["x"], t["W_enc"], t["b_enc"], 4, t["b_dec"], dead_mask=dead if aux_k else None, aux_k=aux_k, backend=be.name
    )
    values, indices = out[0].requires_grad_(), out[1]
    aux_values, aux_indices = (out[2].requires_grad_(), out[3]) if aux_k else (None, None)
    W_dec, b_dec = t["W_dec"].requires_grad_(), t["b_dec"].requires_grad_()
    x = t["x"].requires_grad_()
    opcheck(ops.sae_loss.default, (x, values, indices, W_dec, b_dec, aux_values, aux_indices, be.name))
    detached = [None if v is None else v.detach() for v in (x, values, W_dec, b_dec, aux_values)]
    grad_aux = torch.rand(8, device=be.device) if aux_k else None
    opcheck(
        ops.sae_loss_backward.default,
        (torch.randn(8, 11, device=be.device), torch.rand(8, device=be.device), grad_aux, detached[0], detached[1],
         indices, detached[2], detached[3], detached[4], aux_indices, True, be.name),
    )  # fmt: skip


def training_loss(model: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
    out = model(x, dead_mask=dead_mask)
    return out.fvu + out.auxk_loss / 32


@pytest.mark.compile
@pytest.mark.parametrize(
    ("be", "compile_backend"),
    [*(pytest.param(*p.values, "aot_eager", marks=p.marks, id=f"{p.id}-aot_eager") for p in OPCHECK_BACKENDS[::2]),
     pytest.param("cpu", "inductor", id="cpu-inductor")],
    indirect=["be"],
)  # fmt: skip
def test_compiled_training_step_matches_eager(be, compile_backend):
    # The ops are custom ops, so dynamo keeps them as single graph nodes (fullgraph) whatever runs
    # inside, the Triton interpreter included.
    torch._dynamo.reset()
    eager = TopKSAE(32, 256, 8, backend=be.name, device=be.device)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(2, 48, 32, device=be.device)  # leading batch shape
    dead = (torch.rand(256) < 0.2).to(be.device)
    step = torch.compile(training_loss, fullgraph=True, backend=compile_backend)
    loss = step(compiled_model, x, dead)
    loss.backward()
    reference = training_loss(eager, x, dead)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=f"grad of {name}")
