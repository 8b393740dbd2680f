"""flashsae SAEs inside an nnsight trace: capture, splice and steer at a module's output.

    import nnsight
    from flashsae.integrations import nnsight as fs_nnsight

    model = nnsight.NNsight(hf_model)                 # or nnsight.LanguageModel(...)
    with model.trace(**inputs):
        seen = fs_nnsight.capture(model.encoder.layer[3], sae)            # .activation, .latents
        latents = fs_nnsight.splice(model.encoder.layer[3], sae)         # the SAE inside the model
        out = model.output.save()
    with model.trace(**inputs):
        fs_nnsight.steer(model.encoder.layer[3], sae, {12: 8.0})         # error term on, as flashsae.hooks.steer

Each function takes the Envoy of a module (``model.encoder.layer[3]``) and is called in the trace
body, where nnsight hands out the module's real output: a tensor, or a tuple / ModelOutput whose
first element is the activation (read and rewritten there, as :mod:`flashsae.hooks` does). What
they return is already ``nnsight.save``d, so it survives the trace. The splice rule (error term,
edits) is :mod:`flashsae.hooks.splice`'s. Needs nnsight >= 0.5 (values, not proxies, in the trace).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..hookpoints import output_tensor, replace_output
from ..hooks._base import check_sae
from ..modules import SAE
from ..outputs import SparseLatents
from . import _splice
from ._peers import require


class Capture(NamedTuple):
    """What :func:`capture` returns."""

    activation: torch.Tensor
    """The module's output activation [..., d] (detached unless detach=False)."""
    latents: SparseLatents | None
    """The SAE's latents of it, or None without an SAE."""


def _nnsight():
    return require("nnsight", package="nnsight", extra="nnsight", purpose="flashsae.integrations.nnsight")


def _activation(envoy: Any) -> tuple[Any, torch.Tensor]:
    if not hasattr(envoy, "output"):
        raise TypeError(f"envoy: expected an nnsight Envoy (model.<module path>), got {type(envoy).__name__}")
    output = envoy.output
    y = output_tensor(output)
    if y is None:
        raise ValueError(
            f"envoy: the module returns {type(output).__name__}, which holds no activation tensor "
            "(expected a tensor, a tuple whose first element is one, or a ModelOutput)"
        )
    return output, y


def capture(envoy: Any, sae: SAE | None = None, *, detach: bool = True) -> Capture:
    """The module's output activation and, given an SAE, its latents (call inside ``model.trace``)."""
    nnsight = _nnsight()
    if sae is not None:
        check_sae("sae", sae)
    _, y = _activation(envoy)
    stored = y.detach() if detach else y
    latents = None
    if sae is not None:
        if stored.shape[-1] != sae.d_in:
            raise ValueError(f"sae: the activation has shape {list(stored.shape)}, but the SAE takes d_in={sae.d_in}")
        with torch.no_grad() if detach else torch.enable_grad():
            latents = sae.encode(stored.to(sae.device))
    return nnsight.save(Capture(stored, latents))


def splice(envoy: Any, sae: SAE, *, error_term: bool = False, edit: _splice.Edit | None = None) -> SparseLatents:
    """Replaces the module's output activation by the SAE's reconstruction (with ``error_term``: the
    activation itself plus the decoded change an ``edit(latents) -> latents`` makes). Returns the
    unedited latents. Call inside ``model.trace``."""
    nnsight = _nnsight()
    output, y = _activation(envoy)
    new, latents = _splice.replace(sae, y, error_term=error_term, edit=_splice.check_edit(edit))
    envoy.output = replace_output(output, new)
    return nnsight.save(latents)


def steer(
    envoy: Any, sae: SAE, latents: Mapping[int, float], *, mode: str = "add", error_term: bool = True
) -> SparseLatents:
    """Steers the module's output through SAE latents: ``{latent id: value}`` added to the latent's
    activation (mode "add") or set (mode "clamp"), as :func:`flashsae.hooks.steer`. Returns the
    unsteered latents. Call inside ``model.trace``."""
    return splice(envoy, sae, error_term=error_term, edit=_splice.steering(sae, latents, mode))


__all__ = ["Capture", "capture", "splice", "steer"]
