"""The slot sort shared by the compiled ``scatter_rows`` kernels (CUDA and Triton).

A module of its own, below both :mod:`flashsae.ops` and :mod:`flashsae.kernels`: the Triton launchers
(``flashsae.kernels``) and the ops that call them both need it, and the ops import the kernels, so it
cannot live in either without an import cycle.
"""

from __future__ import annotations

import torch


def latent_segments(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, bounds): the flat slot ids b * k + j sorted by latent (stable, so ascending within a
    latent), int64 [rows * k], and int64 [n + 1] offsets: the slots of latent i are
    ``order[bounds[i]:bounds[i + 1]]``. Empty slots (-1) and any index outside [0, n) sort past the
    last segment and are never summed."""
    flat = indices.reshape(-1)
    keys = torch.where((flat >= 0) & (flat < n), flat.long(), n)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(n + 1, device=indices.device))
    return order, bounds
