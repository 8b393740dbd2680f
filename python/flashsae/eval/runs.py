"""Reading what ``flashsae train`` left behind: the SAE folders of a run directory (one per hookpoint,
each a cfg.json + sae.safetensors whose metadata names the model, dataset and hookpoint), the
metric records (metrics.jsonl), summary.json and config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAE_CONFIG = "cfg.json"
#: Where an SAE's activations came from: metadata keys (the trainer's SOURCE_KEYS) and, for the
#: text field, its saved train_config.
SOURCE_KEYS = (
    "model", "dataset", "dataset_config", "dataset_split", "eval_fraction", "ctx_len", "exclude_special_tokens",
)  # fmt: skip


def sae_directories(path: str | Path) -> list[Path]:
    """The SAE folders at `path`: the folder itself if it holds an SAE (cfg.json), else its
    subfolders that do (a run directory), sorted by name. FileNotFoundError when there are none."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"path: {root} does not exist")
    if (root / SAE_CONFIG).is_file():
        return [root]
    found = sorted(child for child in root.iterdir() if child.is_dir() and (child / SAE_CONFIG).is_file())
    if not found:
        raise FileNotFoundError(
            f"path: {root} holds no SAE (an SAE folder has {SAE_CONFIG}; a run directory has one such folder "
            "per hookpoint)"
        )
    return found


def source_settings(metadata: dict[str, Any]) -> dict[str, Any]:
    """What the SAE's metadata says about its activations: hookpoint, model, dataset, ... (keys
    missing from old or hand-made checkpoints are left out)."""
    settings = {key: metadata[key] for key in (*SOURCE_KEYS, "hookpoint") if metadata.get(key) is not None}
    train_config = metadata.get("train_config") or {}
    for key in ("text_field", "model_dtype", "trust_remote_code"):
        if train_config.get(key) is not None:
            settings[key] = train_config[key]
    return settings


@dataclass
class RunRecords:
    """The records of a run directory (each may be missing: an interrupted or foreign run)."""

    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    """config.json: the TrainConfig of the run."""
    summary: dict[str, Any] = field(default_factory=dict)
    """summary.json: step, tokens, elapsed_s, interrupted, final metrics per hookpoint."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """metrics.jsonl: one record per log_every steps."""

    def curve(self, hookpoint: str, metric: str, x: str = "tokens") -> list[tuple[float, float]]:
        """(x, value) of `hookpoint`/`metric` over the records that have both."""
        key = f"{hookpoint}/{metric}"
        points = []
        for record in self.records:
            if key in record and x in record:
                value = record[key]
                if isinstance(value, (int, float)) and math.isfinite(value):
                    points.append((float(record[x]), float(value)))
        return points

    def hookpoints(self) -> list[str]:
        """Hookpoints named in the records, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            for key in record:
                if "/" in key:
                    seen.setdefault(key.rsplit("/", 1)[0], None)
        return list(seen)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None
    return value if isinstance(value, dict) else {}


def read_run(run_dir: str | Path) -> RunRecords:
    """config.json, summary.json and metrics.jsonl of a run directory (a line cut short by a crash
    ends the records)."""
    root = Path(run_dir)
    records: list[dict[str, Any]] = []
    metrics = root / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return RunRecords(root, _json(root / "config.json"), _json(root / "summary.json"), records)
