"""Hookpoints: naming the modules of a torch model whose outputs flashsae reads or replaces, and
finding the activation tensor inside whatever those modules return.

Shared by the trainer (:mod:`flashsae.train.activations`), the inference hooks (:mod:`flashsae.hooks`)
and evaluation (:mod:`flashsae.eval`), so that a hookpoint means the same module everywhere.

A hookpoint is a module path as ``model.named_modules()`` spells it (``encoder.layer.3``,
``model.layers.7.mlp``) or a glob whose every ``*`` stays inside one dotted component
(``transformer.h.*``). The base model's prefix is optional both ways: ``bert.encoder.layer.3`` names
``encoder.layer.3`` of a ``BertModel``, and ``h.3`` (as recorded by an SAE trained on a
``GPT2Model``) names ``transformer.h.3`` of a ``GPT2LMHeadModel``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _match(pattern: str, name: str) -> bool:
    """Glob match where each '*' stays inside one dotted path component."""
    parts, names = pattern.split("."), name.split(".")
    return len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for p, n in zip(parts, names, strict=True))


def _candidates(pattern: str, prefix: str, names: set[str]) -> list[str]:
    """The spellings of `pattern` to try: as given, without the base model's prefix, with it."""
    candidates = [pattern]
    if prefix and pattern.startswith(prefix + "."):
        candidates.append(pattern[len(prefix) + 1 :])
    elif prefix and prefix in names:  # a model with a head (GPT2LMHeadModel) around its base model
        candidates.append(f"{prefix}.{pattern}")
    return candidates


def resolve_hookpoints(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module paths of `model` named by `patterns` (paths or globs), in the model's module order.
    The base model's prefix is optional (module docstring). Unknown patterns raise a ValueError
    listing close matches."""
    names = [name for name, _ in model.named_modules() if name]
    known = set(names)
    prefix = getattr(model, "base_model_prefix", "") or ""
    chosen: set[str] = set()
    for pattern in patterns:
        matched: list[str] = []
        for candidate in _candidates(pattern, prefix, known):
            matched = [n for n in names if _match(candidate, n)]
            if matched:
                break
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            if not close:  # fall back to siblings: modules sharing the longest known parent path
                parent = pattern.rsplit(".", 1)[0]
                close = [n for n in names if n.startswith(parent + ".") and n.count(".") == pattern.count(".")][:5]
            suggestion = f"; close matches: {', '.join(close)}" if close else f"; e.g. {', '.join(names[:5])}"
            raise ValueError(f"hookpoints: {pattern!r} matches no module of {type(model).__name__}{suggestion}")
        chosen.update(matched)
    return [n for n in names if n in chosen]


def resolve_hookpoint(model: nn.Module, pattern: str, argument: str = "hookpoint") -> str:
    """The one module path `pattern` names (a glob matching several modules is an error naming
    `argument`)."""
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"{argument}: expected a module path (str), got {pattern!r}")
    matched = resolve_hookpoints(model, [pattern])
    if len(matched) != 1:
        shown = ", ".join(matched[:5]) + (", ..." if len(matched) > 5 else "")
        raise ValueError(f"{argument}: {pattern!r} matches {len(matched)} modules ({shown}); name exactly one")
    return matched[0]


# -------------------------------------------------------------------------- module outputs


def output_tensor(output: Any) -> torch.Tensor | None:
    """The activation inside a module's output: the output itself when it is a tensor, else the
    first element of a tuple / list (transformers layers return (hidden_states, attn_weights, ...)),
    else the first field of a ``ModelOutput`` or dataclass (last_hidden_state); None if none is a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        first = output[0] if output else None
    elif hasattr(output, "to_tuple"):  # transformers ModelOutput (None fields are left out)
        values = output.to_tuple()
        first = values[0] if values else None
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = dataclasses.fields(output)
        first = getattr(output, fields[0].name) if fields else None
    else:
        return None
    return first if isinstance(first, torch.Tensor) else None


def replace_output(output: Any, new: torch.Tensor) -> Any:
    """`output` with its activation (see :func:`output_tensor`) replaced by `new`, in the same
    container type (a new tuple / list / ModelOutput; the module's own object is left as it was)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return (new, *output[1:])
    if isinstance(output, tuple):  # a NamedTuple
        return output._replace(**{output._fields[0]: new})
    if isinstance(output, list):
        return [new, *output[1:]]
    if hasattr(output, "to_tuple"):
        key = next(k for k, v in output.items() if v is not None)
        replaced = type(output)(**dict(output.items()))
        replaced[key] = new
        return replaced
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, **{dataclasses.fields(output)[0].name: new})
    raise TypeError(f"output: cannot replace the activation inside a {type(output).__name__}")


__all__ = ["output_tensor", "replace_output", "resolve_hookpoint", "resolve_hookpoints"]
