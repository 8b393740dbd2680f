"""flashsae's native checkpoint format: a directory with ``cfg.json`` and ``sae.safetensors``.

Writes are atomic: both files go to a fresh sibling directory, which then replaces the target
with renames, so a reader never sees a half-written checkpoint (a crash leaves either the old
checkpoint or the new one, plus at most a stale temporary directory). Loading reads only JSON and
safetensors: nothing is unpickled. cfg.json records the sha256 of sae.safetensors
(``weights_sha256``), checked on load unless ``verify=False`` (flashsae.storage: checksums).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..registry import REGISTRY
from ..storage import atomic_directory, check_header, file_sha256, verify_sha256
from ._common import FormatError, Placement, read_json, read_safetensors

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically writes `config` (JSON-serializable) and `tensors` to the directory `path`, with
    the sha256 of the weights file in cfg.json."""
    with atomic_directory(path) as staging:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, staging / WEIGHTS_NAME)
        digest = file_sha256(staging / WEIGHTS_NAME)
        payload = {"format": "flashsae", "format_version": FORMAT_VERSION, **config, "weights_sha256": digest}
        (staging / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(path)


def is_native(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a flashsae checkpoint (cfg.json says so)."""
    config_file = Path(path) / CONFIG_NAME
    if not (config_file.is_file() and (Path(path) / WEIGHTS_NAME).is_file()):
        return False
    try:
        return read_json(config_file).get("format") == "flashsae"
    except (FormatError, OSError):
        return False


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a native checkpoint directory; clear errors for anything else. verify:
    compare sae.safetensors with the sha256 cfg.json recorded (CheckpointCorruptError naming the
    file on a mismatch; checkpoints written before checksums have none and load as they are)."""
    source = Path(path)
    config_file, weights_file = source / CONFIG_NAME, source / WEIGHTS_NAME
    if not source.is_dir():
        raise FileNotFoundError(f"path: {source} is not a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"path: {source} has no {file.name}; not a flashsae checkpoint")
    config = read_json(config_file)
    check_header(
        config, path=config_file, argument="path", format="flashsae", version=FORMAT_VERSION, what="flashsae config"
    )
    if verify:
        verify_sha256(weights_file, config.get("weights_sha256"), recorded_in=config_file)
    return config, read_safetensors(weights_file)


def save(sae: Any, path: str | os.PathLike) -> Path:
    """Writes `sae` as a native checkpoint: its architecture, dtype, config and metadata in cfg.json,
    its state dict (parameters and schedule buffers) in sae.safetensors; every field round-trips."""
    header = {
        "architecture": sae.architecture,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "config": sae.config.to_dict(),
        "metadata": sae.metadata,
    }
    return save_checkpoint(path, header, dict(sae.state_dict()))


def load(path: str | os.PathLike, placement: Placement, *, sae_class: Any = None, verify: bool = True) -> Any:
    """The SAE in the native checkpoint `path`: of the registered class its cfg.json names, which
    must be `sae_class` when one is given. dtype: as saved unless given. verify: see load_checkpoint."""
    header, tensors = load_checkpoint(path, verify=verify)
    architecture = header.get("architecture")
    target = REGISTRY.get(architecture) if sae_class is None else sae_class
    if target is None:
        known = ", ".join(REGISTRY)
        raise ValueError(f"path: {path} holds an unknown architecture {architecture!r}; known: {known}")
    if architecture != target.architecture:
        raise ValueError(f"path: {path} holds a {architecture!r} SAE, not {target.architecture!r}")
    config = target.config_class(**header["config"])
    dtype = placement.dtype_or(getattr(torch, header["dtype"]))
    sae = target.from_config(config, dtype=dtype, device=placement.device, backend=placement.backend)
    differing = set(sae.state_dict()) ^ set(tensors)
    if differing:
        raise ValueError(f"path: {path} weights do not match a {target.__name__} (differing: {sorted(differing)})")
    sae.load_state_dict(tensors)
    sae.metadata = dict(header.get("metadata") or {})
    return sae
