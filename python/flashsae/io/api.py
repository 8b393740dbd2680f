"""Loading and saving in every format: detection, Hub ids, multi-hookpoint directories.

    sae  = flashsae.load("path/or/org/repo", subfolder=None, format=None)   # format auto-detected
    saes = flashsae.load_many("sparsify_run_dir")                           # {hookpoint: SAE}
    sae.save("out", format="saelens")     # native | saelens | sparsify | circuit_tracer | transcoder_set

Detection (a local directory, or a file inside one):
    cfg.json with "format": "flashsae" + sae.safetensors       native
    cfg.json + sae_weights.safetensors                         saelens
    cfg.json + sae.safetensors                                 sparsify
    ae.pt (+ config.json)                                      dictionary_learning
    config.json or hyperparams.json with d_model + weights     lm_saes (lm-saes, Llama Scope)
    W_enc_0.safetensors + W_dec_0.safetensors                  circuit_tracer (cross-layer transcoders)
    config.yaml + layer_0.safetensors                          transcoder_set (circuit-tracer's per-layer set)
    a .pt file with pre_bias / latent_bias                     openai
A directory holding no SAE itself but SAE subdirectories (a sparsify run, a flashsae training run)
is a multi-hookpoint directory: ``load_many`` reads all of them, ``load(path, subfolder=name)`` one.

A path that does not exist locally and looks like ``org/repo[/sub/folder]`` is fetched from the
Hugging Face Hub with huggingface_hub (imported only then; offline or without the package the error
says so). Only the files under the subfolder are downloaded.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from . import circuit_tracer, dictionary_learning, lm_saes, native, openai, saelens, sparsify, transcoder_set
from ._common import FormatError, Placement, read_json, read_torch_weights

#: Every format flashsae reads, and the module that reads it.
FORMAT_MODULES = {
    "native": native,
    "saelens": saelens,
    "sparsify": sparsify,
    "dictionary_learning": dictionary_learning,
    "openai": openai,
    "lm_saes": lm_saes,
    "circuit_tracer": circuit_tracer,
    "transcoder_set": transcoder_set,
}
FORMATS = tuple(FORMAT_MODULES)
#: The formats flashsae writes.
SAVE_FORMATS = ("native", "saelens", "sparsify", "circuit_tracer", "transcoder_set")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?$")


# ------------------------------------------------------------------------------------ detection


#: The JSON files whose presence marks an SAE directory; when one is there but unreadable, detection
#: says so instead of "cannot tell which SAE format" (a truncated cfg.json is the likely cause).
MARKER_JSON = ("cfg.json", "config.json", "hyperparams.json")


def _check_marker_json(path: Path) -> None:
    """FormatError "<name> is not valid JSON: <path>: <error>" for a marker file that does not parse."""
    for name in MARKER_JSON:
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise FormatError(f"{name} is not valid JSON: {file}: {exc}") from exc


def _detect_directory(path: Path) -> str | None:
    _check_marker_json(path)
    if native.is_native(path):
        return "native"
    if saelens.is_saelens(path):
        return "saelens"
    if sparsify.is_sparsify(path):
        return "sparsify"
    if dictionary_learning.is_dictionary_learning(path):
        return "dictionary_learning"
    if lm_saes.is_lm_saes(path):
        return "lm_saes"
    if circuit_tracer.is_circuit_tracer(path):
        return "circuit_tracer"
    if transcoder_set.is_transcoder_set(path):
        return "transcoder_set"
    return None


def _detect_file(path: Path) -> tuple[str, Path, Any]:
    """(format, what to hand the loader, an already-read state dict or None) for a file."""
    if path.suffix == ".pt":
        config = path.parent / dictionary_learning.CONFIG_NAME
        if path.name == dictionary_learning.WEIGHTS_NAME or (config.is_file() and "trainer" in _safe_json(config)):
            return "dictionary_learning", path, None
        state = read_torch_weights(path)
        if openai.looks_like_openai(state):
            return "openai", path, state
        if isinstance(state, dict) and dictionary_learning.guess_dict_class(state) is not None:
            return "dictionary_learning", path, None
        if isinstance(state, dict) and "sae" in state and lm_saes.is_lm_saes(path.parent):
            return "lm_saes", path.parent, None
        found = sorted(state)[:12] if isinstance(state, dict) else type(state).__name__
        raise FormatError(f"path: cannot tell which SAE format {path} is in (entries: {found})")
    directory = path.parent
    fmt = _detect_directory(directory)
    if fmt is None:
        raise FormatError(f"path: {path} is a file and its directory {directory} holds no SAE flashsae can read")
    return fmt, directory, None


def _safe_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except (FormatError, OSError):
        return {}


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def sae_subdirectories(path: Path) -> dict[str, Path]:
    """Subdirectories of `path` (one level, hidden ones skipped) that hold an SAE, by name in natural
    order (layers.2 before layers.10)."""
    if not path.is_dir():
        return {}
    found = {
        child.name: child
        for child in path.iterdir()
        if child.is_dir() and not child.name.startswith(".") and _detect_directory(child) is not None
    }
    return {name: found[name] for name in sorted(found, key=_natural_key)}


def detect_format(path: str | os.PathLike) -> str:
    """The format of the local SAE at `path` (a directory or a file in one); FormatError when there
    is none, naming what was found (or the SAE subdirectories of a multi-hookpoint directory)."""
    local = Path(path)
    if not local.exists():
        raise FileNotFoundError(f"path: {local} does not exist")
    if local.is_file():
        return _detect_file(local)[0]
    fmt = _detect_directory(local)
    if fmt is not None:
        return fmt
    subdirectories = sae_subdirectories(local)
    if subdirectories:
        raise FormatError(
            f"path: {local} holds {len(subdirectories)} SAEs ({', '.join(list(subdirectories)[:8])}"
            f"{', ...' if len(subdirectories) > 8 else ''}); pass subfolder=<name> or use flashsae.load_many"
        )
    entries = sorted(p.name for p in local.iterdir())[:12]
    if not entries:
        raise FileNotFoundError(
            f"path: {local} is empty: it has no cfg.json, sae_weights.safetensors, ae.pt or other SAE files"
        )
    raise FormatError(f"path: cannot tell which SAE format {local} is in (entries: {entries}); pass format=")


# ------------------------------------------------------------------------------------ Hub paths


def resolve(path: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local path for `path` (+ `subfolder`): as given when it exists, else downloaded from the
    Hugging Face Hub when it looks like org/repo[/sub/folder]."""
    local = Path(path).expanduser()
    if not local.exists():
        text = str(path)
        if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
            raise FileNotFoundError(f"path: {local} is not a directory or file (nor a Hub id org/repo)")
        parts = text.split("/")
        repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
        folder = "/".join(part for part in (inner, subfolder or "") if part)
        return _download(repo_id, folder, text)
    if subfolder:
        local = local / subfolder
        if not local.exists():
            raise FileNotFoundError(f"subfolder: {local} does not exist")
    return local


def _download(repo_id: str, folder: str, original: str) -> Path:
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError as exc:
        raise ImportError(
            f"path: {original!r} is not a local path; reading it as a Hugging Face Hub repo needs the "
            "huggingface_hub package (pip install huggingface_hub; transformers brings it along)"
        ) from exc
    patterns = [f"{folder}/*"] if folder else None
    try:
        root = Path(hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the Hub client raises many types (offline, 404, auth, ...)
        where = f" (subfolder {folder!r})" if folder else ""
        raise OSError(
            f"path: {original!r} is not a local path, and fetching Hub repo {repo_id!r}{where} failed: "
            f"{type(exc).__name__}: {exc}. Offline? Download the files and pass their directory."
        ) from exc
    local = root / folder if folder else root
    if not local.exists():
        raise FileNotFoundError(f"subfolder: Hub repo {repo_id!r} has no {folder!r}")
    return local


# ------------------------------------------------------------------------------------ load / save


def load(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    subfolder: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    sae_class: Any = None,
    verify: bool = True,
):
    """Loads any SAE flashsae reads: a native checkpoint (the class from its cfg.json) or another
    library's files (SAELens, sparsify, dictionary_learning, OpenAI, lm-saes; see the module
    docstring; a Hub id org/repo works when huggingface_hub is installed). `format` forces one of
    FORMATS instead of detecting it; `subfolder` picks one SAE of a multi-hookpoint directory or Hub
    repo. dtype: the file's unless given (SAELens: its cfg dtype). `sae_class`: the SAE must be an
    instance of it (a native checkpoint: of exactly its architecture). verify: check a native
    checkpoint's weights against the sha256 its cfg.json recorded (CheckpointCorruptError on a
    mismatch); False skips the hashing (sha256 ran at 0.43 GiB/s on a shared 2-core CPU: about 2 s
    per GiB). Other formats record no checksum."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    local = resolve(path, subfolder)
    state = None
    target = local
    if format is None:
        if local.is_file():
            format, target, state = _detect_file(local)
        else:
            format = detect_format(local)
    elif local.is_file() and format not in ("openai", "dictionary_learning"):
        target = local.parent
    placement = Placement(device=device, dtype=dtype, backend=backend)
    if format == "native":
        return native.load(target, placement, sae_class=sae_class, verify=verify)
    if format == "openai":
        sae = openai.load(target, placement, state=state)
    else:
        if format == "dictionary_learning" and target.is_dir() and not (target / "ae.pt").is_file():
            raise FileNotFoundError(f"path: {target} has no ae.pt")
        sae = FORMAT_MODULES[format].load(target, placement)
    if sae_class is not None and not isinstance(sae, sae_class):
        raise ValueError(f"path: {path} holds a {sae.architecture!r} SAE, not {sae_class.architecture!r}")
    return sae


def load_many(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Every SAE in a multi-hookpoint directory (a sparsify or flashsae training run: one
    subdirectory per hookpoint), keyed by subdirectory name in natural order. verify: as for load."""
    local = resolve(path)
    subdirectories = sae_subdirectories(local)
    if not subdirectories:
        raise FormatError(f"path: {local} has no subdirectory holding an SAE")
    return {
        name: load(child, format=format, device=device, dtype=dtype, backend=backend, verify=verify)
        for name, child in subdirectories.items()
    }


def save(sae, path: str | os.PathLike, format: str = "native") -> Path:
    """Writes `sae` to the directory `path` in `format` (one of SAVE_FORMATS), atomically. What the
    format cannot express is a FormatError naming the field."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format: flashsae writes {', '.join(SAVE_FORMATS)}, got {format!r}")
    return FORMAT_MODULES[format].save(sae, Path(path))


__all__ = ["FORMATS", "SAVE_FORMATS", "detect_format", "load", "load_many", "resolve", "sae_subdirectories", "save"]
