"""The replacement an SAE puts where an activation was, shared by the clients' hook styles
(TransformerLens hook functions, nnsight trace bodies). Same rule as :mod:`flashsae.hooks.splice`:
with ``error_term`` the output is ``y + decode(edited) - decode(latents)`` (y itself without an
edit); without it, the (edited) reconstruction."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .._checks import boolean
from ..hooks._base import check_sae, decode
from ..hooks.splice import _Steering
from ..modules import SAE
from ..outputs import SparseLatents

Edit = Callable[[SparseLatents], SparseLatents]


def check_edit(edit: object) -> Edit | None:
    if edit is not None and not callable(edit):
        raise TypeError(f"edit: expected a callable latents -> latents, got {type(edit).__name__}")
    return edit


def steering(sae: SAE, latents: Mapping[int, float], mode: str) -> Edit:
    """The edit behind steer: ``{latent id: value}`` added ("add") or clamped ("clamp")."""
    check_sae("sae", sae)
    edit = _Steering(latents, mode, sae.n_latents)
    return lambda found: edit(None, found)


def replace(sae: SAE, y: torch.Tensor, *, error_term: bool, edit: Edit | None) -> tuple[torch.Tensor, SparseLatents]:
    """(what replaces activation y [..., d_in], the unedited latents of y)."""
    check_sae("sae", sae)
    boolean("error_term", error_term, error=TypeError)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"activation: expected a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[-1] != sae.d_in:
        raise ValueError(f"activation: expected shape [..., d_in={sae.d_in}], got {list(y.shape)}")
    x = y.to(sae.device)
    latents = sae.encode(x)
    recon = decode(sae, latents, x)
    edited = None
    if edit is not None:
        edited = edit(latents)
        if not isinstance(edited, tuple) or len(edited) != 2 or edited[0].shape[:-1] != latents[0].shape[:-1]:
            raise ValueError(f"edit: expected SparseLatents with leading shape {list(latents[0].shape[:-1])}")
        edited = SparseLatents(*edited)
    if error_term:
        new = y if edited is None else y + (decode(sae, edited, x) - recon).to(y.device, y.dtype)
    else:
        new = (recon if edited is None else decode(sae, edited, x)).to(y.device, y.dtype)
    return new, latents
