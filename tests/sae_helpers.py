"""Checks the architecture tests share: an SAE's forward and gradients against a float64 reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from helpers import assert_close


def check_against_reference(
    sae: Any, x: torch.Tensor, reference_objective: Callable, *extra: Any, dead_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Runs ``sae(x, dead_mask)`` and its backward, and ``reference_objective(params, rows, config, *extra)``
    on float64 copies of the parameters; asserts that x_hat, fvu, mse, loss, the dense latents and
    every parameter's gradient agree and that auxk_loss is 0. Returns the copies (with gradients)."""
    out = sae(x, dead_mask=dead_mask)
    out.loss.backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    expected, f = reference_objective(params, x.reshape(-1, sae.d_in), sae.config, *extra)
    expected["loss"].backward()
    assert_close(out.x_hat, expected["x_hat"].reshape(x.shape), torch.float64, "x_hat")
    for field in ("fvu", "mse", "loss"):
        assert_close(getattr(out, field), expected[field], torch.float64, field)
    assert out.auxk_loss == 0
    n = sae.n_latents
    assert_close(out.latents.to_dense(n).reshape(-1, n), f, torch.float64, "latents")
    for name, p in sae.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float64, f"grad {name}")
    return params


def batch_topk_activations(
    params: dict[str, torch.Tensor], x: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK written plainly over dense float64 pre-activations: (the ReLU pre-activations,
    the activations f that keep the batch * k largest of the whole batch (ties: lower flat index))."""
    W_enc, b_enc, b_dec = params["W_enc"], params["b_enc"], params["b_dec"]
    act = ((x - b_dec) @ W_enc.T + b_enc).relu()
    order = torch.sort(act.flatten(), descending=True, stable=True).indices[: x.shape[0] * k]
    keep = torch.zeros(act.numel(), dtype=torch.bool)
    keep[order] = True
    return act, act * keep.view_as(act)


def auxk_reference(
    act: torch.Tensor, dead_mask: torch.Tensor, aux_k: int, W_dec: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """The AuxK loss written plainly: the aux_k largest ReLU pre-activations `act` among dead latents
    reconstruct the (detached) residual; sum of squared errors, scaled by min(dead / aux_k, 1)."""
    top = torch.sort(act.masked_fill(~dead_mask, float("-inf")), dim=1, descending=True, stable=True)
    aux_f = torch.zeros_like(act).scatter(1, top.indices[:, :aux_k], top.values[:, :aux_k].clamp_min(0))
    sse = (aux_f @ W_dec - residual.detach()).pow(2).sum()
    return sse * min(int(dead_mask.sum()) / aux_k, 1.0)


@pytest.fixture
def one_thread() -> Any:
    """Tiny training loops run faster on one thread, and much faster on a loaded shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
