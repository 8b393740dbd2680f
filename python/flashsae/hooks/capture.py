"""capture: read the activations of hookpoints (and, optionally, SAE latents of them) while a model
runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import boolean
from ..modules import SAE
from ..outputs import SparseLatents
from ._base import HookContext, StopForward, activation, check_sae, check_width, hookpoint_keys


class Captured(dict):
    """What :func:`capture` fills: ``{hookpoint: activation}``, plus ``latents``:
    ``{hookpoint: SparseLatents}`` for the hookpoints given an SAE.

    Each entry holds the output of the module's most recent call (a model run several times in
    the context, e.g. by ``generate``, leaves the last step's activations). The tensors are the
    module's own outputs (detached unless ``detach=False``), not copies."""

    latents: dict[str, SparseLatents]

    def __init__(self) -> None:
        super().__init__()
        self.latents = {}


class capture(HookContext):
    """Context manager that records the activations of hookpoints of any torch model.

        with flashsae.hooks.capture(model, ["transformer.h.3", "transformer.h.5"]) as acts:
            model(**inputs)
        acts["transformer.h.3"]          # [batch, tokens, d], the block's output

    Args:
        model: any ``torch.nn.Module`` (Hugging Face transformers models first).
        hookpoints: a module path or glob, or a list of them (see :mod:`flashsae.hookpoints`). A path
            naming one module is the key as written; a glob gives one key per matched module path.
            Modules returning tuples or ModelOutputs are read at their first element.
        saes: optional ``{hookpoint: SAE}``; their latents of the captured activation go to
            ``acts.latents[hookpoint]`` (SparseLatents, same leading shape). Their hookpoints are
            captured too. Call ``sae.eval()`` first for the inference rule of BatchTopK.
        detach: store detached tensors and encode without autograd (default). False keeps the
            graph, e.g. to take gradients with respect to an activation.
        stop: end the forward pass right after the last hookpoint ran, skipping the layers after it
            (the with-block ends there: the model call raises an exception this context suppresses
            on exit, so code after the call inside the block does not run).

    Entering returns the :class:`Captured` mapping; the hooks are removed on exit, also after an
    exception. Works under ``torch.no_grad``, ``torch.inference_mode`` and during ``generate``.
    """

    def __init__(
        self,
        model: nn.Module,
        hookpoints: str | Sequence[str] = (),
        *,
        saes: Mapping[str, SAE] | None = None,
        detach: bool = True,
        stop: bool = False,
    ) -> None:
        super().__init__(model)
        saes = dict(saes or {})
        wanted = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
        wanted += [key for key in saes if key not in wanted]
        self.paths = hookpoint_keys(model, wanted)
        for key, sae in saes.items():
            check_sae(f"saes[{key!r}]", sae)
        self.saes = saes
        self.detach = boolean("detach", detach, error=TypeError)
        self.stop = boolean("stop", stop, error=TypeError)
        self.captured = Captured()
        self._seen: set[str] = set()

    def _hooks(self) -> list[tuple[str, Callable[..., Any]]]:
        return [(path, self._hook(key)) for key, path in self.paths.items()]

    def _hook(self, key: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            x = activation(key, output)
            stored = x.detach() if self.detach else x
            self.captured[key] = stored
            sae = self.saes.get(key)
            if sae is not None:
                check_width(key, x, sae)
                grad = torch.no_grad() if self.detach else contextlib.nullcontext()
                with grad:
                    self.captured.latents[key] = sae.encode(stored.to(sae.device))
            if self.stop:
                self._seen.add(key)
                if len(self._seen) == len(self.paths):
                    self._seen.clear()
                    raise StopForward(self)

        return hook

    def __enter__(self) -> Captured:
        self._seen.clear()
        super().__enter__()
        return self.captured
