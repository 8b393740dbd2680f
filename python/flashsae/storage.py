"""How flashsae writes and re-reads its on-disk layouts (SAE formats in flashsae.io, the training
checkpoint, the activation cache, sharded checkpoints).

Atomic writes: a reader (or a run resumed after a crash) sees the old file or directory or the new
one, never a mix. New content goes to a fresh sibling, is fsynced, and replaces the target with
renames; a crash leaves at most a stale ``.<name>.tmp-*`` sibling.

Versioned headers: each layout's JSON header carries ``format`` and ``format_version``;
:func:`check_header` refuses another layout or a newer version with an error naming the file.

Checksums: the SAE checkpoint and the training checkpoint record the sha256 of their safetensors
file in their JSON header when they are written (:func:`file_sha256`) and :func:`verify_sha256`
compares it on load, so overwritten or flipped bytes inside the tensor data (which safetensors'
header checks cannot see) raise :class:`~flashsae.errors.CheckpointCorruptError` instead of loading
as garbage weights. Older files without a digest load as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointCorruptError

#: Bytes read at a time when hashing (the file is never held whole in memory).
HASH_CHUNK = 1 << 22


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes `path`'s content to disk, so a rename publishes a complete file."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`."""
    for file in directory.rglob("*"):
        if file.is_file():
            fsync_file(file)


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the complete directory `staging` in place of `target` with renames only: the old
    `target` (if any) is moved into a fresh ``.<name>.old-*`` sibling first and deleted last."""
    if not target.exists():
        os.replace(staging, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"path: {target} exists and is not a directory")
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, remove_stale: bool = False) -> Iterator[Path]:
    """Yields a fresh staging directory next to `path`; when the block exits normally its files are
    fsynced and it replaces `path` (:func:`replace_directory`). On an exception the staging
    directory is removed and `path` is untouched. remove_stale: first delete the staging
    directories an earlier crashed write left behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if remove_stale:
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path` (mode 0644, readable by others as the target would
    be); when the block exits normally the file there is fsynced and renamed onto `path`."""
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int = 2) -> None:
    """Writes `payload` as JSON to `path` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=indent) + "\n")


def check_header(
    header: dict[str, Any],
    *,
    path: Path,
    argument: str,
    format: str,
    version: int,
    what: str,
    error: type[Exception] = ValueError,
) -> dict[str, Any]:
    """`header` (the JSON read from `path`) if its ``format`` is `format` and its ``format_version``
    at most `version`; else `error` naming `argument`, the file and what it is not."""
    if header.get("format") != format:
        raise error(f"{argument}: {path} is not a {what} (format={header.get('format')!r})")
    if header.get("format_version", 0) > version:
        raise error(
            f"{argument}: {path} has format_version {header['format_version']}; this flashsae reads up to "
            f"{version}. Upgrade flashsae."
        )
    return header


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in HASH_CHUNK pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: object, *, recorded_in: Path) -> None:
    """Raises CheckpointCorruptError naming `path` unless its sha256 is `expected` (the digest
    `recorded_in` holds). `expected` None: a file written before checksums, nothing to compare."""
    if expected is None:
        return
    if not isinstance(expected, str):
        raise CheckpointCorruptError(f"{recorded_in}: the recorded sha256 of {path.name} is not a string: {expected!r}")
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointCorruptError(
            f"{path} is corrupt: its sha256 is {actual}, but {recorded_in.name} recorded {expected} when it was "
            "written (bytes changed since). Restore the file, or pass verify=False (--no-verify) to load it anyway"
        )
