"""Metric records of a training run: metrics.jsonl always, tensorboard when its package is
installed, Weights & Biases when a project is named.

One record per ``log_every`` steps: ``{"step", "tokens", "lr", "elapsed_s", "tokens_per_s",
"<hookpoint>/loss", "<hookpoint>/fvu", "<hookpoint>/explained_variance", "<hookpoint>/l0",
"<hookpoint>/dead_pct", "<hookpoint>/auxk_loss", "skipped_batches"}``. Per-hookpoint figures are
means over the steps since the previous record; tokens_per_s is the average since the (re)start.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"


class StepMetrics:
    """Sums per-step figures of one SAE on its device (no sync per step) until read."""

    NAMES = ("loss", "fvu", "auxk_loss", "l0")

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.steps = 0

    def add(self, loss: torch.Tensor, fvu: torch.Tensor, auxk_loss: torch.Tensor, l0: torch.Tensor) -> None:
        figures = torch.stack([t.detach().float() for t in (loss, fvu, auxk_loss, l0)])
        self.sums = figures if self.sums is None else self.sums + figures
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Means since the last read (empty if no step), then resets."""
        if self.sums is None:
            return {}
        means = (self.sums / self.steps).tolist()
        self.sums, self.steps = None, 0
        figures = dict(zip(self.NAMES, means, strict=True))
        figures["explained_variance"] = 1.0 - figures["fvu"]
        return figures


class HeldOutSums:
    """float64 sums behind the end-of-training metrics over a stream of batches: FVU is
    Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the mean over all the tokens (flashsae eval's definition), and
    L0 the total of active latents (divide by the tokens). The variance is taken about the first
    batch's mean, so activations far from 0 lose no digits to cancellation."""

    def __init__(self) -> None:
        self.sse = self.centered_sq = self.l0 = 0.0
        self.tokens = 0
        self.shift: torch.Tensor | None = None
        self.centered_sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor) -> None:
        """One batch: x, x_hat [N, d]; l0 its mean active latents per row (l0_of)."""
        x64 = x.double()
        if self.shift is None:
            self.shift = x64.mean(0)
            self.centered_sum = torch.zeros_like(self.shift)
        centered = x64 - self.shift
        self.centered_sum += centered.sum(0)
        self.centered_sq += float(centered.pow(2).sum())
        self.sse += float((x64 - x_hat.double()).pow(2).sum())
        self.l0 += float(l0) * x.shape[0]
        self.tokens += x.shape[0]

    def fvu(self) -> float:
        variance = self.centered_sq - float(self.centered_sum.pow(2).sum()) / self.tokens
        return self.sse / variance if variance > 0 else float("nan")


def l0_of(latents: Any) -> torch.Tensor:
    """Mean number of active latents per row of SparseLatents(values, indices); empty slots
    (index -1, value 0) do not count."""
    values, indices = latents
    active = (values > 0) & (indices >= 0)
    return active.flatten(0, -2).sum(-1).float().mean()


def resolve_tensorboard(setting: bool | None) -> bool:
    """Whether to write tensorboard event files for TrainConfig.tensorboard = `setting`: None (auto)
    means when torch.utils.tensorboard imports, and says in one line (stderr) when it does not;
    True requires it (ImportError saying how to get it or turn it off); False is off."""
    if setting is False:
        return False
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError as exc:
        if setting:
            raise ImportError(
                f"tensorboard: --tensorboard needs the tensorboard package ({exc}): pip install tensorboard, "
                "or pass --no-tensorboard"
            ) from exc
        print(
            "flashsae train: tensorboard is not installed, so metrics go to metrics.jsonl only "
            "(pip install tensorboard to add event files; --no-tensorboard silences this note)",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True


class MetricsLogger:
    """Writes records to metrics.jsonl (+ tensorboard, + wandb)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool,  # resolved: see resolve_tensorboard
        wandb_project: str | None,
        config: dict[str, Any],
        resume_step: int | None,
    ) -> None:
        if wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ImportError("wandb_project: logging to Weights & Biases needs the wandb package: pip install wandb")
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            # records written after the checkpoint we resume from will be written again: drop them
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.file = open(self.path, "a")  # noqa: SIM115 - kept open for the whole run
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
        self.wandb = None
        if wandb_project is not None:
            import wandb

            self.wandb = wandb.init(
                project=wandb_project,
                config=config,
                dir=str(run_dir),
                resume="allow",
                id=os.environ.get("WANDB_RUN_ID"),
            )

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
