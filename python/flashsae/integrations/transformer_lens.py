"""flashsae SAEs on a TransformerLens ``HookedTransformer``, by its hook names.

    from flashsae.integrations import transformer_lens as fs_tl

    with fs_tl.capture(model, "blocks.3.hook_resid_post", saes={"blocks.3.hook_resid_post": sae}) as acts:
        model(tokens)                      # acts["blocks.3.hook_resid_post"], acts.latents[...]
    with fs_tl.splice(model, {"blocks.3.hook_resid_post": sae}):
        loss = model(tokens, return_type="loss")
    with fs_tl.steer(model, "blocks.3.hook_resid_post", sae, {12: 8.0}):
        logits = model(tokens)

    # or TransformerLens' own hook functions:
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_resid_post", fs_tl.splice_hook(sae))])

A hook name is a HookPoint module's path, so the contexts are :mod:`flashsae.hooks`' (same
arguments, error term and masks), after checking every name against ``model.hook_dict`` (a
ValueError lists the closest names). ``splice_hook`` / ``steer_hook`` return functions
``(activation, hook) -> activation`` for ``run_with_hooks`` / ``model.hooks``; the latents of the
last call are on the function's ``.latents``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import hooks
from .._checks import boolean
from ..hooks._base import check_sae
from ..modules import SAE
from . import _splice
from ._peers import require


def _check_model(model: Any) -> None:
    transformer_lens = require(
        "transformer_lens", package="transformer-lens", extra="transformer-lens",
        purpose="flashsae.integrations.transformer_lens",
    )  # fmt: skip
    if not isinstance(model, transformer_lens.HookedRootModule):
        raise TypeError(
            f"model: expected a TransformerLens HookedRootModule (HookedTransformer), got {type(model).__name__}"
        )


def check_hook_names(model: Any, names: Sequence[str], argument: str) -> None:
    """ValueError naming `argument` for a name that is not one of ``model.hook_dict``'s."""
    _check_model(model)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{argument}: expected hook names (str), got {name!r}")
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(f"{argument}: {name!r} is not a hook name of this model{hint}")


def capture(model: Any, hook_names: str | Sequence[str] = (), *, saes: Mapping[str, SAE] | None = None,
            detach: bool = True, stop: bool = False) -> hooks.capture:  # fmt: skip
    """:func:`flashsae.hooks.capture` by hook names (``blocks.3.hook_resid_post``)."""
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    check_hook_names(model, names + list(saes or {}), "hook_names")
    return hooks.capture(model, names, saes=saes, detach=detach, stop=stop)


def splice(model: Any, saes: Mapping[str, SAE], *, error_term: bool = False, edit: Any = None,
           mask: torch.Tensor | None = None) -> hooks.splice:  # fmt: skip
    """:func:`flashsae.hooks.splice` by hook names."""
    if not isinstance(saes, Mapping):
        raise TypeError(f"saes: expected a mapping {{hook name: SAE}}, got {type(saes).__name__}")
    check_hook_names(model, list(saes), "saes")
    return hooks.splice(model, saes, error_term=error_term, edit=edit, mask=mask)


def steer(model: Any, hook_name: str, sae: SAE, latents: Mapping[int, float], *, mode: str = "add",
          error_term: bool = True, mask: torch.Tensor | None = None) -> hooks.splice:  # fmt: skip
    """:func:`flashsae.hooks.steer` by hook name."""
    check_hook_names(model, [hook_name], "hook_name")
    return hooks.steer(model, hook_name, sae, latents, mode=mode, error_term=error_term, mask=mask)


class _HookFunction:
    """A TransformerLens hook function that splices `sae` in; ``.latents``: those of the last call."""

    def __init__(self, sae: SAE, error_term: bool, edit: _splice.Edit | None) -> None:
        self.sae, self.error_term, self.edit = sae, error_term, edit
        self.latents = None

    def __call__(self, activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        new, self.latents = _splice.replace(self.sae, activation, error_term=self.error_term, edit=self.edit)
        return new


def splice_hook(sae: SAE, *, error_term: bool = False, edit: _splice.Edit | None = None) -> _HookFunction:
    """A hook function for ``run_with_hooks`` that replaces the activation by the SAE's
    reconstruction (see :mod:`flashsae.hooks.splice` for error_term and edit)."""
    check_sae("sae", sae)
    boolean("error_term", error_term, error=TypeError)
    return _HookFunction(sae, error_term, _splice.check_edit(edit))


def steer_hook(sae: SAE, latents: Mapping[int, float], *, mode: str = "add", error_term: bool = True) -> _HookFunction:
    """A hook function for ``run_with_hooks`` that steers through SAE latents (as :func:`steer`)."""
    boolean("error_term", error_term, error=TypeError)
    return _HookFunction(sae, error_term, _splice.steering(sae, latents, mode))


__all__ = ["capture", "check_hook_names", "splice", "splice_hook", "steer", "steer_hook"]
