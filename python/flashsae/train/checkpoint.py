"""Training checkpoints: ``state.json`` + ``state.safetensors`` in one directory, replaced atomically.

Everything a run needs to continue bit for bit is in there: SAE parameters (unfolded, in the
training scale), Adam moments and step counts, the dead-latent counters, the torch RNG states, the
data position and the shuffle buffer's rows and generator. Nothing is pickled.

Atomicity: both files are written to a fresh sibling directory, fsynced, and swapped in with
renames, so a crash or a full disk at any moment leaves the previous checkpoint intact (plus at
most a stale ``.checkpoint.tmp-*`` directory, removed on the next save).
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

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FORMAT = "flashsae-train-checkpoint"
FORMAT_VERSION = 1


def save_training_checkpoint(path: str | os.PathLike, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically writes `state` (JSON) and `tensors` to the directory `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(staging / STATE_TENSORS))
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
        (staging / STATE_JSON).write_text(json.dumps(payload, indent=1) + "\n")
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
            os.replace(target, retired / "checkpoint")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_training_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state, tensors) of a checkpoint directory written by :func:`save_training_checkpoint`."""
    source = Path(path)
    state_file, tensor_file = source / STATE_JSON, source / STATE_TENSORS
    if not state_file.is_file() or not tensor_file.is_file():
        raise FileNotFoundError(f"resume: {source} holds no training checkpoint ({STATE_JSON} + {STATE_TENSORS})")
    state = json.loads(state_file.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"resume: {state_file} is not a flashsae training checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"resume: {state_file} has format_version {state['format_version']}; upgrade flashsae")
    return state, load_file(str(tensor_file))


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimizer's state_dict split into JSON (param groups, scalar state) and tensors."""
    full = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in full["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": full["param_groups"], "scalars": scalars, "indices": list(full["state"])}, tensors


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, prefix: str, state: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for index in state["indices"]:
        entries = {key: value for key, value in state["scalars"].get(str(index), {}).items()}
        marker = f"{prefix}/{index}/"
        entries.update({name[len(marker) :]: t for name, t in tensors.items() if name.startswith(marker)})
        per_param[int(index)] = entries
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
