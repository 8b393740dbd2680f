"""Sharded checkpoints of a latent-sharded SAE: one safetensors file per shard, reloadable on any number
of shards (and on one process).

Layout of a checkpoint directory::

    index.json                          format, config, dtype, n, the latent range of every file, the
                                        optimizer's hyper-parameters and scalars, user metadata
    shard-00000-of-00004.safetensors    rows [start, end) of W_enc, b_enc, W_dec (+ optimizer state
    ...                                  rows, dead-latent counters); shard 0 also holds b_dec and the
                                         replicated optimizer state (steps, schedules, b_dec's moments)

Every tensor indexed by latent is cut by rows, so a rank of a different layout reads exactly the rows
it holds: for each file overlapping its range, a slice (safetensors reads slices without loading the
file). Replica 0 of each shard writes (the data-parallel replicas hold the same values). Writing is
atomic: shards go to a staging directory, fsynced, index.json last, then a rename swaps it in (a crash
leaves the previous checkpoint intact). index.json records each file's sha256 (hashed by the rank that
wrote it); a load checks the files it reads unless verify=False (flashsae.storage: checksums).

Optimizer state: SparseAdam's or torch Adam's per-parameter tensors. For W_enc / W_dec / b_enc the
moments (and SparseAdam's master copy and per-row last step of the matrices) are cut by rows; the step
counts and SparseAdam's lr schedule are replicated. b_enc's dense update marks all its elements at
every step, so its per-element last step is rebuilt (= the step) for the new layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..modules.topk import TopKConfig, TopKSAE
from ..optim import SparseAdam
from ..optim.sparse_adam import _matrix_view
from ..storage import check_header, file_sha256, fsync_file, replace_directory, verify_sha256
from .layout import Layout, shard_range, single_process
from .tensor_parallel import ShardedTopKSAE

FORMAT = "flashsae-sharded-sae"
FORMAT_VERSION = 1
INDEX = "index.json"
ROW_PARAMETERS = ("W_enc", "b_enc", "W_dec")
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
#: Optimizer state tensors cut by rows (per parameter); the rest is replicated.
ROW_STATE = {"exp_avg", "exp_avg_sq", "master", "last_step"}


def _file(index: int, parts: int) -> str:
    return f"shard-{index:05d}-of-{parts:05d}.safetensors"


def _barrier(layout: Layout) -> None:
    if layout.world_size > 1:
        dist.barrier()


def _optimizer_tensors(sae: ShardedTopKSAE, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict, dict]:
    """(row tensors of this shard, replicated tensors, JSON scalars) of the optimizer's state."""
    rows, replicated, scalars = {}, {}, {}
    if optimizer is None:
        return rows, replicated, scalars
    by_param = {id(getattr(sae, name)): name for name in PARAMETERS}
    for p, state in optimizer.state.items():
        name = by_param.get(id(p))
        if name is None:
            raise ValueError("optimizer: it holds a parameter that is not one of the SAE's")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                scalars[f"{name}/{key}"] = value
            elif name in ROW_PARAMETERS and key in ROW_STATE and not (name == "b_enc" and key == "last_step"):
                rows[f"optim/{name}/{key}"] = value
            elif not (name == "b_enc" and key == "last_step"):
                replicated[f"optim/{name}/{key}"] = value
    groups = optimizer.state_dict()["param_groups"]
    order = {i: PARAMETERS[j] for j, i in enumerate(_param_ids(sae, optimizer))}
    scalars["param_groups"] = [dict(g, params=[order[i] for i in g["params"]]) for g in groups]
    scalars["class"] = type(optimizer).__name__
    return rows, replicated, scalars


def _param_ids(sae: ShardedTopKSAE, optimizer: torch.optim.Optimizer) -> list[int]:
    """The optimizer's state_dict ids of W_enc, b_enc, W_dec, b_dec, in that order."""
    ids, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            ids[id(p)] = index
            index += 1
    return [ids[id(getattr(sae, name))] for name in PARAMETERS]


def save_sharded(
    path: str | os.PathLike,
    sae: ShardedTopKSAE,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    since_fired: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes this rank's shard (every rank calls it; replica 0 of each shard writes). `extra`: JSON
    written into index.json (training position, metadata...)."""
    layout = sae.layout
    target = Path(path)
    staging = target.parent / f".{target.name}.staging"
    if layout.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier(layout)
    rows, replicated, scalars = _optimizer_tensors(sae, optimizer)
    if layout.writes_shards:
        tensors = {name: getattr(sae, name).detach() for name in ROW_PARAMETERS} | rows
        if since_fired is not None:
            tensors["since_fired"] = since_fired
        if layout.tp_rank == 0:
            tensors |= {"b_dec": sae.b_dec.detach()} | replicated
        name = staging / _file(layout.tp_rank, layout.tensor_parallel)
        save_file({key: t.contiguous().cpu() for key, t in tensors.items()}, str(name))
        fsync_file(name)
        # each writer hashes its own file (in parallel); rank 0 gathers the digests into index.json
        (staging / f"{name.name}.sha256").write_text(file_sha256(name))
    _barrier(layout)
    if layout.rank == 0:
        n, parts = sae.config.n_latents, layout.tensor_parallel
        digests = []
        for t in range(parts):
            sidecar = staging / f"{_file(t, parts)}.sha256"
            digests.append(sidecar.read_text())
            sidecar.unlink()
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": sae.config.to_dict(),
            "dtype": str(sae.dtype).removeprefix("torch."),
            "n_latents": n,
            "files": [
                {
                    "path": _file(t, parts),
                    "start": shard_range(n, parts, t)[0],
                    "end": shard_range(n, parts, t)[1],
                    "sha256": digests[t],
                }
                for t in range(parts)
            ],
            "optimizer": scalars or None,
            "has_since_fired": since_fired is not None,
            "metadata": sae.metadata,
            "extra": extra or {},
        }
        (staging / INDEX).write_text(json.dumps(index, indent=1, default=_json_default) + "\n")
        fsync_file(staging / INDEX)
        replace_directory(staging, target)
    _barrier(layout)
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / INDEX
    if not file.is_file():
        raise FileNotFoundError(f"path: {path} holds no sharded SAE checkpoint ({INDEX})")
    index = json.loads(file.read_text())
    what = "flashsae sharded SAE checkpoint"
    return check_header(index, path=file, argument="path", format=FORMAT, version=FORMAT_VERSION, what=what)


def verify_files(path: Path, index: dict, start: int, end: int) -> None:
    """Checks the files a rank holding latents [start, end) reads (those rows' files and file 0, which
    holds the replicated tensors) against the sha256 index.json recorded (CheckpointCorruptError)."""
    for position, entry in enumerate(index["files"]):
        if position == 0 or max(start, entry["start"]) < min(end, entry["end"]):
            verify_sha256(path / entry["path"], entry.get("sha256"), recorded_in=path / INDEX)


def _read_rows(path: Path, index: dict, key: str, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a row-cut tensor, from every file that overlaps them."""
    pieces = []
    for entry in index["files"]:
        low, high = max(start, entry["start"]), min(end, entry["end"])
        if low >= high:
            continue
        with safe_open(str(path / entry["path"]), framework="pt") as handle:
            if key not in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                raise ValueError(f"path: {entry['path']} has no {key}")
            pieces.append(handle.get_slice(key)[low - entry["start"] : high - entry["start"]])
    return torch.cat(pieces)


def _read_replicated(path: Path, index: dict, key: str) -> torch.Tensor:
    with safe_open(str(path / index["files"][0]["path"]), framework="pt") as handle:
        return handle.get_tensor(key)


def _optimizer_keys(path: Path, index: dict) -> list[str]:
    """The optimizer tensors' names (shard 0 holds every name: its rows and the replicated ones)."""
    with safe_open(str(path / index["files"][0]["path"]), framework="pt") as handle:
        return [key for key in handle.keys() if key.startswith("optim/")]  # noqa: SIM118 (not a dict)


def load_sharded(
    path: str | os.PathLike,
    layout: Layout | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    verify: bool = True,
) -> tuple[ShardedTopKSAE, torch.Tensor | None]:
    """This rank's shard of a saved sharded SAE, for `layout` (any number of shards; default: one
    process), and its dead-latent counters (None if not saved). verify: check the files it reads
    against their recorded sha256 first (:func:`verify_files`)."""
    layout = layout or single_process()
    source = Path(path)
    index = read_index(source)
    config = TopKConfig(**index["config"])
    dtype = dtype or getattr(torch, index["dtype"])
    sae = ShardedTopKSAE(config, layout, dtype=dtype, device=device, backend=backend)
    if verify:
        verify_files(source, index, sae.start, sae.end)
    with torch.no_grad():
        for name in ROW_PARAMETERS:
            getattr(sae, name).copy_(_read_rows(source, index, name, sae.start, sae.end))
        sae.b_dec.copy_(_read_replicated(source, index, "b_dec"))
    sae.metadata = dict(index.get("metadata") or {})
    since_fired = None
    if index.get("has_since_fired"):
        since_fired = _read_rows(source, index, "since_fired", sae.start, sae.end).to(sae.device)
    return sae, since_fired


def load_optimizer_sharded(path: str | os.PathLike, sae: ShardedTopKSAE, optimizer: torch.optim.Optimizer) -> None:
    """Fills `optimizer` (built over `sae`'s parameters, same class and settings as when saved) with
    this shard's rows of the saved state, for sae's layout."""
    source = Path(path)
    index = read_index(source)
    saved = index.get("optimizer")
    if not saved:
        raise ValueError(f"path: {source} holds no optimizer state")
    if saved["class"] != type(optimizer).__name__:
        raise ValueError(f"optimizer: the checkpoint holds {saved['class']} state, not {type(optimizer).__name__}")
    ids = _param_ids(sae, optimizer)
    state: dict[int, dict[str, Any]] = {ids[j]: {} for j in range(len(PARAMETERS))}
    for key in _optimizer_keys(source, index):
        _, name, field = key.split("/")
        j = PARAMETERS.index(name)
        if name in ROW_PARAMETERS and field in ROW_STATE:
            state[ids[j]][field] = _read_rows(source, index, key, sae.start, sae.end)
        else:
            state[ids[j]][field] = _read_replicated(source, index, key)
    for key, value in saved.items():
        if key in ("param_groups", "class"):
            continue
        name, field = key.split("/")
        state[ids[PARAMETERS.index(name)]][field] = value
    if isinstance(optimizer, SparseAdam) and "step" in state[ids[1]]:
        # b_enc's dense update touched every element at every step: its per-row last step is the step
        rows = _matrix_view(sae.b_enc).shape[0]
        step = int(torch.as_tensor(state[ids[1]]["step"]))
        state[ids[1]]["last_step"] = torch.full((rows,), step, dtype=torch.int64)
    for entries in state.values():
        if "step" in entries and not isinstance(entries["step"], torch.Tensor):
            step_dtype = torch.int64 if isinstance(optimizer, SparseAdam) else torch.float32
            entries["step"] = torch.tensor(entries["step"], dtype=step_dtype)
    groups = [dict(g, params=[ids[PARAMETERS.index(name)] for name in g["params"]]) for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": {i: s for i, s in state.items() if s}, "param_groups": groups})


def consolidate(path: str | os.PathLike, *, device: torch.device | str | None = None, verify: bool = True) -> TopKSAE:
    """The whole saved SAE as a single-device TopKSAE (reads every shard: needs the memory of all n
    latents). verify: as for load_sharded."""
    sharded, _ = load_sharded(path, single_process(), device=device, verify=verify)
    return sharded.gather_full()
