"""flashsae's native checkpoint format: a directory with ``cfg.json`` and ``sae.safetensors``.

Writes are atomic: both files go to a fresh sibling directory, which then replaces the target
with renames, so a reader never sees a half-written checkpoint (a crash leaves either the old
checkpoint or the new one, plus at most a stale temporary directory). Loading reads only JSON and
safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically writes `config` (JSON-serializable) and `tensors` to the directory `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, staging / WEIGHTS_NAME)
        payload = {"format": "flashsae", "format_version": FORMAT_VERSION, **config}
        (staging / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        _fsync_dir_files(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / "checkpoint")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a native checkpoint directory; clear errors for anything else."""
    source = Path(path)
    config_file, weights_file = source / CONFIG_NAME, source / WEIGHTS_NAME
    if not source.is_dir():
        raise FileNotFoundError(f"path: {source} is not a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"path: {source} has no {file.name}; not a flashsae checkpoint")
    config = json.loads(config_file.read_text())
    if config.get("format") != "flashsae":
        raise ValueError(f"path: {config_file} is not a flashsae config (format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"path: {config_file} has format_version {config['format_version']}; this flashsae reads up to "
            f"{FORMAT_VERSION}. Upgrade flashsae."
        )
    return config, load_file(weights_file)


def _fsync_dir_files(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
