"""Checks the architecture tests share: an SAE's forward and gradients against a float64 reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
