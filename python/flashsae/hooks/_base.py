"""The machinery the hook contexts share: resolving hookpoints, registering forward hooks on enter
and removing every one of them on exit (also when the body raised), and the early stop of capture."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..hookpoints import output_tensor, resolve_hookpoint, resolve_hookpoints
from ..modules import SAE
from ..outputs import SparseLatents

GLOB_CHARACTERS = frozenset("*?[")


class StopForward(BaseException):
    """Ends a forward pass once every hookpoint a ``capture(..., stop=True)`` wants has run.

    A BaseException, so model code that catches Exception does not swallow it; the context that
    raised it (``owner``) suppresses it on exit, and only that one."""

    def __init__(self, owner: object) -> None:
        super().__init__("forward stopped after the last captured hookpoint")
        self.owner = owner


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def check_sae(name: str, sae: object) -> SAE:
    if not isinstance(sae, SAE):
        raise TypeError(f"{name}: expected a flashsae SAE (flashsae.create / flashsae.load), got {type(sae).__name__}")
    return sae


def hookpoint_keys(model: nn.Module, hookpoints: str | Sequence[str], argument: str = "hookpoints") -> dict[str, str]:
    """{key: module path}. A pattern naming one module keeps the caller's spelling as its key
    ('h.3' stays 'h.3' even where the module is transformer.h.3); a glob gives one key per
    matched module, its path."""
    if isinstance(hookpoints, str):
        hookpoints = [hookpoints]
    if not isinstance(hookpoints, Sequence) or not hookpoints:
        raise ValueError(f"{argument}: expected a module path or a non-empty list of them, got {hookpoints!r}")
    keys: dict[str, str] = {}
    for pattern in hookpoints:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{argument}: expected module paths (str), got {pattern!r}")
        if GLOB_CHARACTERS & set(pattern):
            keys.update({path: path for path in resolve_hookpoints(model, [pattern])})
        else:
            keys[pattern] = resolve_hookpoint(model, pattern, argument)
    return keys


def activation(key: str, output: Any) -> torch.Tensor:
    """The activation tensor in a hooked module's output, else a ValueError naming the hookpoint."""
    tensor = output_tensor(output)
    if tensor is None:
        raise ValueError(
            f"hookpoints: {key} returns {type(output).__name__}, which holds no activation tensor "
            "(expected a tensor, a tuple whose first element is one, or a ModelOutput)"
        )
    return tensor


def check_mask(key: str, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """mask [leading dims of x] (bool) on x's device, or None."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"mask: expected shape {list(x.shape[:-1])} (the leading dims of {key}'s activation), "
            f"got {list(mask.shape)}"
        )
    return mask.to(x.device)


def validate_mask(mask: object) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor [batch, tokens] or None, got {_describe(mask)}")
    return mask


def _describe(value: object) -> str:
    return f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def check_width(key: str, x: torch.Tensor, sae: SAE) -> None:
    if x.dim() == 0 or x.shape[-1] != sae.d_in:
        raise ValueError(
            f"hookpoints: {key} gives activations of shape {list(x.shape)}, but its SAE takes d_in={sae.d_in}"
        )


def decodes_with_input(sae: SAE) -> bool:
    """Whether ``sae.decode`` takes the input x too (a skip transcoder's x W_skip^T)."""
    return "x" in inspect.signature(sae.decode).parameters


def decode(sae: SAE, latents: SparseLatents, x: torch.Tensor) -> torch.Tensor:
    return sae.decode(latents, x) if decodes_with_input(sae) else sae.decode(latents)


class HookContext:
    """Base of the hook contexts: subclasses list (module path, forward hook) pairs in ``_hooks``.

    Hooks are registered when the context is entered and removed when it exits, whatever the
    body raised. A context can be entered again after it exited, not while it is open."""

    def __init__(self, model: nn.Module) -> None:
        self.model = check_model(model)
        self._modules = dict(model.named_modules())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hooks(self) -> list[tuple[str, Callable[..., Any]]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _open(self) -> None:
        if self._handles:
            raise RuntimeError(f"{type(self).__name__}: this context is already open")
        try:
            for path, hook in self._hooks():
                self._handles.append(self._modules[path].register_forward_hook(hook))
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (the context is open)."""
        return bool(self._handles)

    def __enter__(self) -> Any:
        self._open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> bool:
        self._close()
        return isinstance(exc, StopForward) and exc.owner is self
