"""Training checkpoints: ``state.json`` + ``state.safetensors`` in one directory, replaced atomically.

Everything a run needs to continue bit for bit is in there: SAE parameters (unfolded, in the
training scale), Adam moments and step counts, the dead-latent counters, the torch RNG states, the
data position and the shuffle buffer's rows and generator. Nothing is pickled.

Atomicity: both files are written to a fresh sibling directory, fsynced, and swapped in with
renames, so a crash or a full disk at any moment leaves the previous checkpoint intact (plus at
most a stale ``.checkpoint.tmp-*`` directory, removed on the next save).

state.json records the sha256 of state.safetensors (``tensors_sha256``); a resume checks it unless
verify=False (flashsae.storage: checksums), so flipped bytes never continue a run with garbage state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..storage import atomic_directory, check_header, file_sha256, verify_sha256

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FORMAT = "flashsae-train-checkpoint"
FORMAT_VERSION = 1


def save_training_checkpoint(path: str | os.PathLike, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically writes `state` (JSON, with the sha256 of the tensor file) and `tensors` to the
    directory `path`."""
    with atomic_directory(path, remove_stale=True) as staging:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(staging / STATE_TENSORS))
        digest = file_sha256(staging / STATE_TENSORS)
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state, "tensors_sha256": digest}
        (staging / STATE_JSON).write_text(json.dumps(payload, indent=1) + "\n")
    return Path(path)


def load_training_checkpoint(
    path: str | os.PathLike, *, verify: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state, tensors) of a checkpoint directory written by :func:`save_training_checkpoint`.
    verify: compare state.safetensors with the sha256 state.json recorded (CheckpointCorruptError)."""
    source = Path(path)
    state_file, tensor_file = source / STATE_JSON, source / STATE_TENSORS
    if not state_file.is_file() or not tensor_file.is_file():
        raise FileNotFoundError(f"resume: {source} holds no training checkpoint ({STATE_JSON} + {STATE_TENSORS})")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{STATE_JSON} is not valid JSON: {state_file}: {exc}") from exc
    what = "flashsae training checkpoint"
    check_header(state, path=state_file, argument="resume", format=FORMAT, version=FORMAT_VERSION, what=what)
    if verify:
        verify_sha256(tensor_file, state.get("tensors_sha256"), recorded_in=state_file)
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
