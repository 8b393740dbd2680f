"""``flashsae cache``: activations on disk, and the memory-mapped reader training uses.

Layout of a cache directory::

    manifest.json                       model, dataset, dtype, widths, token counts, checksums
    <hookpoint>/shard-00000.safetensors one tensor "activations" [tokens, d] per shard (train part)
    ...
    <hookpoint>/eval-00000.safetensors  the same for the eval part (manifest: eval_shards)
    ...

The train shards hold the train part of the dataset, the eval shards the start of its eval part
(flashsae.train.split, eval_fraction in the manifest): training reads the first, its end-of-training
metrics the second, and no document is in both.

Shard i of every hookpoint holds the same tokens (they come from the same forward passes), so one
row index reads aligned activations of every hookpoint. Each shard is written to a temporary
name, renamed, hashed (sha256) and only then listed in the manifest, which is rewritten atomically
after every shard: an interrupted ``flashsae cache`` leaves a valid, shorter cache.

Reading: safetensors headers are parsed here and the data mapped with numpy.memmap (no copy of a
shard in memory); a shard whose size, dtype or shape disagrees with its header or the manifest, or
whose checksum differs, is a clear error. Rows are served in a deterministic shuffle: each pass
permutes the shards, and within each window of ``WINDOW_SHARDS`` shards permutes all their rows,
so a batch mixes tokens from many shards (hence contexts) while the pages touched stay bounded.
Its whole state is the number of rows served.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..model_loading import resolve_device, resolve_model_dtype
from ..storage import atomic_file, check_header, write_json_atomic
from .activations import ModelActivations
from .config import CacheConfig

MANIFEST = "manifest.json"
FORMAT = "flashsae-activations"
FORMAT_VERSION = 1
TENSOR_NAME = "activations"
#: Shards mixed by one within-window permutation (8 x 65536 tokens by default).
WINDOW_SHARDS = 8
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CacheError(ValueError):
    """A cache directory that cannot be read as it claims: missing, truncated or mismatched files."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _folder(hookpoint: str) -> str:
    return hookpoint.replace("/", "_")


# ------------------------------------------------------------------------------------------ writer


def write_cache(config: CacheConfig, *, progress: bool = True) -> dict[str, Any]:
    """Runs the model over the train part of the dataset once (or for cache_tokens tokens), then
    over the first eval_tokens tokens of its eval part, and writes the cache; returns the manifest."""
    out = Path(config.out)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"out: {out} already holds an activation cache; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    source = ModelActivations(config, cycle=False, device=device, part="train")
    dtype = resolve_model_dtype(config.model_dtype if config.cache_dtype == "auto" else config.cache_dtype, device)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.model,
        "dataset": config.dataset,
        "dataset_config": config.dataset_config,
        "dataset_split": config.dataset_split,
        "text_field": config.text_field,
        "eval_fraction": config.eval_fraction,
        "ctx_len": config.ctx_len,
        "exclude_special_tokens": config.exclude_special_tokens,
        "dtype": DTYPE_NAMES[dtype],
        "shard_tokens": config.shard_tokens,
        "hookpoints": {name: {"d": d, "folder": _folder(name)} for name, d in source.widths.items()},
        "tokens": 0,
        "complete": False,
        "shards": [],
        "eval_tokens": 0,
        "eval_shards": [],
    }
    for info in manifest["hookpoints"].values():
        (out / info["folder"]).mkdir(exist_ok=True)
    write_json_atomic(out / MANIFEST, manifest)
    writer = _ShardWriter(out, manifest, dtype, config.shard_tokens, progress=progress)
    writer.write(source.chunks(), config.cache_tokens, part="train")
    if config.eval_tokens and config.eval_fraction > 0:
        writer.write(source.other_part("eval").chunks(), config.eval_tokens, part="eval")
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


class _ShardWriter:
    """Cuts chunks of activations into shards of one part (train: manifest's shards and tokens;
    eval: eval_shards and eval_tokens), each written, hashed and listed before the next."""

    PREFIX = {"train": "shard", "eval": "eval"}

    def __init__(self, out: Path, manifest: dict[str, Any], dtype: torch.dtype, shard_tokens: int, *, progress: bool):
        self.out, self.manifest, self.dtype = out, manifest, dtype
        self.shard_tokens, self.progress = shard_tokens, progress

    def write(self, chunks: Iterator[dict[str, torch.Tensor]], limit: int | None, *, part: str) -> None:
        shards_key, tokens_key = ("shards", "tokens") if part == "train" else ("eval_shards", "eval_tokens")
        manifest = self.manifest
        pending: dict[str, list[torch.Tensor]] = {name: [] for name in manifest["hookpoints"]}
        pending_rows = 0
        started = time.perf_counter()

        def flush(rows: int) -> None:
            nonlocal pending_rows
            index = len(manifest[shards_key])
            files = {}
            for name, parts in pending.items():
                block = torch.cat(parts)
                shard, rest = block[:rows], block[rows:]
                pending[name] = [rest] if rest.shape[0] else []
                relative = f"{manifest['hookpoints'][name]['folder']}/{self.PREFIX[part]}-{index:05d}.safetensors"
                final = self.out / relative
                with atomic_file(final) as tmp:
                    save_file({TENSOR_NAME: shard.to("cpu", self.dtype).contiguous()}, str(tmp))
                files[name] = {"path": relative, "sha256": _sha256(final), "bytes": final.stat().st_size}
            pending_rows -= rows
            manifest[shards_key].append({"tokens": rows, "files": files})
            manifest[tokens_key] += rows
            write_json_atomic(self.out / MANIFEST, manifest)
            if self.progress:
                rate = manifest[tokens_key] / (time.perf_counter() - started)
                print(
                    f"{part} shard {index}: {manifest[tokens_key]:,} tokens ({rate:,.0f} tokens/s)",
                    file=sys.stderr,
                    flush=True,
                )

        for chunk in chunks:
            take = next(iter(chunk.values())).shape[0]
            if limit is not None:
                take = min(take, limit - manifest[tokens_key] - pending_rows)
            for name, rows in chunk.items():
                pending[name].append(rows[:take].cpu())
            pending_rows += take
            while pending_rows >= self.shard_tokens:
                flush(self.shard_tokens)
            if limit is not None and manifest[tokens_key] + pending_rows >= limit:
                break
        if pending_rows:
            flush(pending_rows)


# ------------------------------------------------------------------------------------------ reader


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(safetensors header, byte offset of the data) of `path`, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CacheError(f"activations: {path} is truncated ({size} bytes); re-run flashsae cache")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100_000_000):
            raise CacheError(f"activations: {path} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except json.JSONDecodeError:
            raise CacheError(f"activations: {path} has a corrupt safetensors header") from None
    return header, 8 + header_len


class CachedShard:
    """One shard of one hookpoint, memory-mapped and validated against the manifest."""

    def __init__(self, path: Path, *, rows: int, d: int, dtype: torch.dtype, sha256: str | None) -> None:
        if not path.is_file():
            raise CacheError(f"activations: shard {path} is missing; the cache is incomplete")
        header, data_start = _read_header(path)
        entry = header.get(TENSOR_NAME)
        if not isinstance(entry, dict):
            raise CacheError(f"activations: {path} holds no tensor {TENSOR_NAME!r}")
        stored = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if stored != dtype or entry.get("shape") != [rows, d]:
            raise CacheError(
                f"activations: {path} holds {entry.get('dtype')} {entry.get('shape')}, but the manifest says "
                f"{DTYPE_CODES[dtype]} [{rows}, {d}]; the shard does not belong to this cache"
            )
        begin, end = entry["data_offsets"]
        expected = data_start + end
        actual = path.stat().st_size
        if actual != expected or end - begin != rows * d * dtype.itemsize:
            raise CacheError(f"activations: {path} is truncated or padded ({actual} bytes, expected {expected})")
        if sha256 is not None and _sha256(path) != sha256:
            raise CacheError(f"activations: {path} does not match its checksum in the manifest (corrupt or replaced)")
        storage_dtype = np.uint16 if dtype.itemsize == 2 else np.float32
        self.array = np.memmap(path, dtype=storage_dtype, mode="r", offset=data_start + begin, shape=(rows, d))
        self.dtype = dtype

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """The given rows (sorted ascending reads pages in order) as a [len(rows), d] tensor."""
        block = torch.from_numpy(np.ascontiguousarray(self.array[rows]))
        return block.view(self.dtype) if self.dtype.itemsize == 2 else block


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"activations: {directory} has no {MANIFEST}; make one with flashsae cache")
    manifest = json.loads(path.read_text())
    check_header(
        manifest, path=path, argument="activations", format=FORMAT, version=FORMAT_VERSION,
        what="flashsae activation cache", error=CacheError,
    )  # fmt: skip
    if not manifest["shards"]:
        raise CacheError(f"activations: {directory} holds no complete shard")
    for shards_key, tokens_key in (("shards", "tokens"), ("eval_shards", "eval_tokens")):
        counted = sum(shard["tokens"] for shard in manifest.get(shards_key, []))
        if counted != manifest.get(tokens_key, 0):
            raise CacheError(
                f"activations: {path} lists {counted} tokens in {shards_key} but {manifest[tokens_key]} in total"
            )
    return manifest


class CachedActivations:
    """Shuffled batches from a cache directory, for the hookpoints asked for (all by default).

    The order is a pure function of (seed, rows served), so resuming needs one integer.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        hookpoints: list[str] | None,
        batch_size: int,
        seed: int,
        device: torch.device,
        verify_checksums: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        known = self.manifest["hookpoints"]
        if hookpoints is None:
            hookpoints = list(known)
        unknown = [name for name in hookpoints if name not in known]
        if unknown:
            raise ValueError(
                f"hookpoints: {', '.join(unknown)} not in the cache {directory} (it holds {', '.join(known)})"
            )
        self.hookpoints = hookpoints
        self.widths = {name: known[name]["d"] for name in hookpoints}
        self.dtype = getattr(torch, self.manifest["dtype"])
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.verify = verify_checksums
        self.shard_rows = np.array([shard["tokens"] for shard in self.manifest["shards"]], dtype=np.int64)
        self.total = int(self.shard_rows.sum())
        self.served = 0
        self._shards: dict[tuple, CachedShard] = {}
        self._window_cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def _shard(self, index: int, name: str, shards_key: str = "shards") -> CachedShard:
        key = (index, name) if shards_key == "shards" else (shards_key, index, name)
        if key not in self._shards:
            entry = self.manifest[shards_key][index]["files"].get(name)
            if entry is None:
                raise CacheError(f"activations: {shards_key} {index} has no file for {name}")
            self._shards[key] = CachedShard(
                self.directory / entry["path"],
                rows=int(self.manifest[shards_key][index]["tokens"]),
                d=self.widths[name],
                dtype=self.dtype,
                sha256=entry["sha256"] if self.verify else None,
            )
        return self._shards[key]

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _window(self, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, row ids) in serving order of one window of one pass."""
        if self._window_cache is not None and self._window_cache[0] == (epoch, window):
            return self._window_cache[1], self._window_cache[2]
        shard_order = self._rng(epoch).permutation(len(self.shard_rows))
        members = shard_order[window * WINDOW_SHARDS : (window + 1) * WINDOW_SHARDS]
        shard_ids = np.repeat(members, self.shard_rows[members])
        row_ids = np.concatenate([np.arange(self.shard_rows[m]) for m in members])
        order = self._rng(epoch, window + 1).permutation(len(shard_ids))
        result = (shard_ids[order], row_ids[order])
        self._window_cache = ((epoch, window), *result)
        return result

    def _locate(self, position: int) -> tuple[int, int, int]:
        """(pass, window, offset in window) of the position-th row served."""
        epoch, within = divmod(position, self.total)
        shard_order = self._rng(epoch).permutation(len(self.shard_rows))
        window_sizes = [
            int(self.shard_rows[shard_order[i : i + WINDOW_SHARDS]].sum())
            for i in range(0, len(shard_order), WINDOW_SHARDS)
        ]
        for window, size in enumerate(window_sizes):
            if within < size:
                return epoch, window, within
            within -= size
        raise AssertionError("position beyond the pass")  # pragma: no cover

    def _rows(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        shards, rows = [], []
        while count:
            epoch, window, offset = self._locate(position)
            shard_ids, row_ids = self._window(epoch, window)
            take = min(count, len(shard_ids) - offset)
            shards.append(shard_ids[offset : offset + take])
            rows.append(row_ids[offset : offset + take])
            position += take
            count -= take
        return np.concatenate(shards), np.concatenate(rows)

    def _read(self, shard_ids: np.ndarray, row_ids: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {}
        for name in self.hookpoints:
            out = torch.empty(len(row_ids), self.widths[name], dtype=self.dtype)
            for shard in np.unique(shard_ids):
                where = np.nonzero(shard_ids == shard)[0]
                order = np.argsort(row_ids[where], kind="stable")
                out[torch.from_numpy(where[order])] = self._shard(int(shard), name).gather(row_ids[where][order])
            batch[name] = out.to(self.device, non_blocking=True)
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        shard_ids, row_ids = self._rows(self.served, self.batch_size)
        self.served += self.batch_size
        return self._read(shard_ids, row_ids)

    def peek(self, count: int) -> dict[str, torch.Tensor]:
        """A sample of up to `count` rows for initialization, read without moving the stream."""
        count = min(count, self.total)
        shard_ids, row_ids = self._rows(0, count)
        return self._read(shard_ids, row_ids)

    @property
    def eval_tokens(self) -> int:
        """Tokens of the eval part in the cache (0 for a cache written without one)."""
        return int(self.manifest.get("eval_tokens", 0))

    def eval_chunks(self) -> Iterator[dict[str, torch.Tensor]]:
        """The eval part in stored order, a shard at a time ({hookpoint: [rows, d]}); nothing for a
        cache written without an eval part."""
        for index, shard in enumerate(self.manifest.get("eval_shards", [])):
            rows = np.arange(int(shard["tokens"]))
            yield {
                name: self._shard(index, name, "eval_shards").gather(rows).to(self.device) for name in self.hookpoints
            }

    def state_dict(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        return {"served": self.served}, {}

    def load_state_dict(self, state: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
        self.served = int(state["served"])
