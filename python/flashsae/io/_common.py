"""What every format module shares: the error type, JSON / safetensors writers, safe readers (JSON,
safetensors, ``torch.load(weights_only=True)``) with errors that name the file and the problem,
tensor checks against a layout, and building a flashsae SAE from foreign tensors.

Conventions for ``sae.metadata`` (JSON, saved with every checkpoint; the trainer uses the same keys):
``"model"`` (model name), ``"hookpoint"`` (where the activations come from), ``"source_format"``
(the format a model was read from) and ``"<format>_config"`` (the foreign config file verbatim, so
a later save to that format keeps its bookkeeping fields: dataset, context size, ...).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..registry import REGISTRY

MODEL_KEY = "model"
HOOKPOINT_KEY = "hookpoint"
SOURCE_KEY = "source_format"
#: Key of the block flashsae adds to a foreign config it writes (architecture, full config, metadata)
#: so that a round trip through that format restores the training settings it has no field for.
FLASHSAE_BLOCK = "flashsae"

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class FormatError(ValueError):
    """A file does not follow its format's layout (missing key, wrong shape, unknown architecture,
    truncated file), or a format cannot express something the SAE uses. The message names the
    file or field and what was expected."""


# ----------------------------------------------------------------------------------------- writing


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(path))


# ----------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; FileNotFoundError / FormatError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} does not exist")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path.name} is not valid JSON: {path}: {exc}") from exc
    if not isinstance(payload, dict):
        raise FormatError(f"path: {path} holds a JSON {type(payload).__name__}, expected an object")
    return payload


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU); a truncated or corrupt file is a
    FormatError naming it (safetensors checks that the header covers the whole file)."""
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    except SafetensorError as exc:
        raise FormatError(f"path: {path} is not a complete safetensors file ({exc})") from exc


def safetensors_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, reading only its header."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except SafetensorError as exc:
        raise FormatError(f"path: {path} is not a complete safetensors file ({exc})") from exc


def read_torch_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and plain
    containers only. Anything else (a pickled class, code) is refused, never executed."""
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"path: {path} holds objects other than tensors and plain containers; flashsae reads .pt files "
            f"only with torch.load(weights_only=True) and will not unpickle them ({first_line})"
        ) from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:  # truncated zip: OSError 22
        raise FormatError(f"path: {path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


def parse_dtype(name: object, where: str) -> torch.dtype:
    """'float32', 'torch.float32', 'bfloat16', ... as a torch dtype (FormatError otherwise)."""
    text = str(name).removeprefix("torch.")
    if text not in DTYPES:
        raise FormatError(f"{where}: unsupported dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[text]


# --------------------------------------------------------------------------------- tensor layouts


class Tensors:
    """A foreign state dict with checked access: ``take(name, shape)`` returns a tensor of exactly
    that shape or raises a FormatError naming the file, the key and the expected shape; ``finish()``
    raises for keys nobody took (a layout the loader does not understand must not load silently)."""

    def __init__(self, tensors: Mapping[str, Any], where: str) -> None:
        self.tensors = dict(tensors)
        self.where = where
        self.taken: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...] | None = None, *, floating: bool = True) -> torch.Tensor:
        if name not in self.tensors:
            found = ", ".join(sorted(self.tensors)) or "nothing"
            raise FormatError(f"{self.where}: missing tensor {name!r} (found: {found})")
        value = self.tensors[name]
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"{self.where}: {name!r} is a {type(value).__name__}, expected a tensor")
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise FormatError(f"{self.where}: {name!r} has shape {list(value.shape)}, expected {list(shape)}")
        if floating and not value.is_floating_point():
            raise FormatError(f"{self.where}: {name!r} has dtype {value.dtype}, expected a floating-point tensor")
        self.taken.add(name)
        return value

    def take_value(self, name: str) -> Any:
        """A non-tensor entry (or a 0-d tensor's Python value)."""
        if name not in self.tensors:
            raise FormatError(f"{self.where}: missing entry {name!r}")
        self.taken.add(name)
        value = self.tensors[name]
        return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value

    def ignore(self, *names: str) -> None:
        """Marks entries the loader knowingly leaves out (training statistics, bookkeeping)."""
        self.taken.update(n for n in names if n in self.tensors)

    def finish(self) -> None:
        unknown = sorted(set(self.tensors) - self.taken)
        if unknown:
            raise FormatError(f"{self.where}: unexpected entries {unknown}; this layout is not understood")


def shape_of(tensors: Mapping[str, Any], name: str, rank: int, where: str) -> tuple[int, ...]:
    """The shape of tensors[name], which must exist and have `rank` dimensions."""
    value = tensors.get(name)
    if not isinstance(value, torch.Tensor):
        found = ", ".join(sorted(tensors)) or "nothing"
        raise FormatError(f"{where}: missing tensor {name!r} (found: {found})")
    if value.dim() != rank:
        raise FormatError(f"{where}: {name!r} has shape {list(value.shape)}, expected {rank} dimensions")
    return tuple(value.shape)


def decoder_norms(W_dec: torch.Tensor, field: str) -> torch.Tensor:
    """Row norms of W_dec [n, d] in float64; a zero row makes a decoder-norm rescaling undefined."""
    norms = W_dec.double().norm(dim=1)
    zero = (norms == 0).nonzero().flatten()
    if zero.numel():
        raise FormatError(
            f"{field}: latents {zero[:8].tolist()} have a zero decoder row, so rescaling by decoder norms "
            "is undefined (the original library divides by zero there too)"
        )
    return norms


# --------------------------------------------------------------------------------- building SAEs


@dataclass(frozen=True)
class Placement:
    """Where a loaded SAE goes: its device, its dtype (None: the file's) and its backend."""

    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    backend: str | None = None

    def dtype_or(self, file_dtype: torch.dtype) -> torch.dtype:
        """The requested dtype, else the file's."""
        return self.dtype or file_dtype



def build_sae(
    architecture: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    placement: Placement,
    *,
    file_dtype: torch.dtype,
    where: str,
):
    """A flashsae SAE of `architecture` configured by `config`, with every parameter set from
    `tensors` (flashsae names and layouts, any float dtype; cast to placement.dtype, else
    `file_dtype`). Buffers not given keep their initial values (num_steps = 0, ...). A parameter
    missing from `tensors` is an error: no randomly initialized weight ever survives a load."""
    cls = REGISTRY[architecture]
    try:
        sae_config = cls.config_class(**config)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{where}: the config does not make a valid {cls.__name__} ({exc})") from exc
    dtype = placement.dtype_or(file_dtype)
    sae = cls.from_config(sae_config, dtype=dtype, device=placement.device, backend=placement.backend)
    state = sae.state_dict()
    unknown = sorted(set(tensors) - set(state))
    missing = sorted(name for name, _ in sae.named_parameters() if name not in tensors)
    if unknown or missing:  # pragma: no cover - a loader bug, not a file problem
        raise AssertionError(f"{where}: loader built {sorted(tensors)} for {cls.__name__} {sorted(state)}")
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(state[name].shape) != tuple(value.shape):
                raise FormatError(
                    f"{where}: {name} has shape {list(value.shape)}, but the config implies {list(state[name].shape)}"
                )
            if not torch.isfinite(value).all():
                raise FormatError(f"{where}: {name} holds NaN or Inf values")
            state[name].copy_(value.to(state[name].dtype))
    return sae


def int_field(name: str, value: object, where: str, *, at_most: tuple[str, int] | None = None) -> int:
    """A count read from a foreign file: an int >= 1 (a whole float such as 16384.0 counts, since
    JSON writers differ), and <= at_most = (its name, bound) when given; FormatError naming the file
    and the field otherwise."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if at_most is None:
        if not valid:
            raise FormatError(f"{where}: {name} must be a positive int, got {value!r}")
        return value
    bound_name, bound = at_most
    if not valid or value > bound:
        raise FormatError(f"{where}: {name} must be an int in [1, {bound_name}={bound}], got {value!r}")
    return value


def bool_field(name: str, value: object, where: str) -> bool:
    """A flag read from a foreign file; FormatError naming the file and the field unless a bool."""
    if not isinstance(value, bool):
        raise FormatError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def json_safe(value: Any) -> Any:
    """`value` with tensors turned into lists / numbers, so it can go into sae.metadata."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
