"""The training loop: one SAE per hookpoint, all fed from the same stream of activations.

Per step and SAE: scale the batch (E||x|| = sqrt(d)), forward with the dead-latent mask (AuxK),
``out.loss.backward()``, remove the decoder gradient parallel to its rows, Adam, renormalize decoder
rows, update the tokens-since-fired counters. The learning rate warms up, holds, and decays to 0
over the last part of the run. Every ``checkpoint_every`` steps, at the end and on Ctrl-C the whole
state is checkpointed atomically; ``resume`` restores it bit for bit.

The saved SAEs take raw activations: the training scale is folded into their weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..model_loading import resolve_device
from ..modules import REGISTRY, SAE, BatchTopKSAE, create, load
from ..ops import topk_encode_stats
from . import signals
from .activations import ModelActivations
from .buffer import ShuffleBuffer
from .cache import CachedActivations
from .calibration import calibrate_threshold
from .checkpoint import load_optimizer_state, load_training_checkpoint, optimizer_state, save_training_checkpoint
from .config import RESUMABLE_OVERRIDES, TrainConfig
from .metrics import HeldOutSums, MetricsLogger, StepMetrics, l0_of, resolve_tensorboard
from .signals import StopSignals
from .sites import MULTI_SITE, Unit, plan_units
from .split import CorpusPart, EmptyPartError
from .step import flush_optimizer, make_optimizer, optimizer_step

CHECKPOINT_DIR = "checkpoint"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
#: Rows used to estimate the activation scale and initialize b_dec.
INIT_SAMPLE_TOKENS = 16384
#: Fewest held-out tokens (beyond those measured) to calibrate BatchTopK thresholds on; with fewer,
#: the train part is used. 1024 tokens hold 32k activations above the threshold at k = 32.
MIN_CALIBRATION_TOKENS = 1024
#: What the saved SAEs' metadata records about where their activations came from.
SOURCE_KEYS = (
    "model", "dataset", "dataset_config", "dataset_split", "eval_fraction", "ctx_len", "exclude_special_tokens",
)  # fmt: skip


class NonFiniteActivationsError(ValueError):
    """Too many batches held NaN or Inf activations (see max_nonfinite_batches)."""


def run_directory(config: TrainConfig) -> Path:
    if config.out is not None:
        return Path(config.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model = Path(config.model.rstrip("/")).name or "model"
    return Path("flashsae-runs") / f"{model}-{stamp}"


def resume_config(out: str, **overrides: Any) -> TrainConfig:
    """The configuration of the run saved in `out`, with `overrides` (only RESUMABLE_OVERRIDES
    may differ from the saved run), ready for ``Trainer(config)`` to continue it."""
    state, _ = _checkpoint_state(Path(out), verify=False)  # its JSON only: Trainer verifies the tensors
    saved = dict(state["config"])
    refused = sorted(
        name
        for name, value in overrides.items()
        if name not in RESUMABLE_OVERRIDES | {"out"} and value != saved.get(name)
    )
    if refused:
        changes = ", ".join(f"{name}={overrides[name]!r} (run: {saved.get(name)!r})" for name in refused)
        raise ValueError(
            f"resume: cannot change {changes} when resuming; only {', '.join(sorted(RESUMABLE_OVERRIDES))}"
        )
    saved.update(overrides)
    saved.update(out=str(out), resume=True)
    return TrainConfig(**saved)


def _checkpoint_state(run_dir: Path, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(f"resume: {run_dir} holds no checkpoint/ to resume from")
    state, tensors = load_training_checkpoint(run_dir / CHECKPOINT_DIR, verify=verify)
    # a run saved before a setting existed ran with its default (e.g. optimizer="adam")
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(TrainConfig)
    }
    # except the split: a run saved before it existed trained on every document
    defaults["eval_fraction"] = 0.0
    state["config"] = {name: value for name, value in defaults.items() if name not in state["config"]} | state["config"]
    return state, tensors


def fold_activation_scale_(sae: SAE, scale: float) -> None:
    """Makes an SAE trained on x * scale take raw x: W_enc * scale, W_dec / scale, b_dec / scale
    (latent values and thresholds unchanged). An architecture with other input-scaled parameters
    provides its own ``fold_activation_scale_(scale)``."""
    custom = getattr(sae, "fold_activation_scale_", None)
    if callable(custom):
        custom(scale)
        return
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)


def check_trainable(architecture: str) -> None:
    """The trainer feeds ``sae(x, dead_mask=...)``: architectures that need more (a transcoder's
    target activations) are refused up front rather than failing inside the loop."""
    if architecture not in REGISTRY:
        raise ValueError(f"architecture: unknown {architecture!r}; expected one of {', '.join(sorted(REGISTRY))}")
    if architecture in MULTI_SITE:  # fed its stacked sites (and a CLT its targets) by the trainer
        return
    parameters = list(inspect.signature(REGISTRY[architecture].forward).parameters.values())[2:]  # self, x
    needed = [
        p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if needed:
        raise ValueError(
            f"architecture: {architecture!r} needs {', '.join(needed)} besides x in forward; flashsae train "
            "trains SAEs that reconstruct their own hookpoint"
        )


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    run_dir: Path
    """The run directory (checkpoint/, metrics.jsonl, summary.json, one SAE folder per hookpoint)."""
    sae_paths: dict[str, Path]
    """{hookpoint: directory of its saved SAE} (load with flashsae.load)."""
    step: int
    """Optimizer steps done."""
    tokens: int
    """Tokens trained on, per SAE."""
    interrupted: bool
    """True when stopped early by Ctrl-C / SIGTERM (resume with resume=True)."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """{hookpoint: final metrics}: explained_variance, fvu and l0 measured on the first eval_tokens
    tokens of the eval part (see ``evaluation``); dead_pct from the training counters (latents that
    did not fire in the last dead_tokens training tokens)."""
    skipped_batches: int = 0
    """Batches skipped for NaN/Inf activations."""
    elapsed_s: float = 0.0
    """Seconds spent in the training loop, over all runs of a resumed run."""
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Which tokens the final metrics were measured on: part ('eval'), tokens, dataset, split
    (the part in words); empty when nothing was measured."""


class Trainer:
    """Trains one SAE per hookpoint of ``config`` (see :class:`TrainConfig`).

        trainer = Trainer(TrainConfig(out="runs/x"))
        result = trainer.train()

    ``on_step(trainer)`` (optional, for train()) is called after every optimizer step.
    """

    def __init__(self, config: TrainConfig) -> None:
        check_trainable(config.architecture)  # before the (slow) model loads
        self.tensorboard = resolve_tensorboard(config.tensorboard)  # likewise: a missing package fails now
        self.config = config
        self.device = resolve_device(config.device)
        self.run_dir = run_directory(config)
        checkpoint = None
        if config.resume:
            state, tensors = _checkpoint_state(self.run_dir, verify=config.verify)
            self._check_resumable(state["config"])
            checkpoint = (state, tensors)
        elif (self.run_dir / CHECKPOINT_DIR).exists():
            raise FileExistsError(
                f"out: {self.run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        torch.manual_seed(config.seed)

        self.source_info = self._open_source()
        self.hookpoints: list[str] = list(self.source.hookpoints)
        self.widths: dict[str, int] = dict(self.source.widths)
        model = getattr(getattr(self, "activations", None), "model", None)
        prefix = getattr(model, "base_model_prefix", "") or ""
        #: what each trained model reads: one unit per hookpoint, or one multi-site unit (sites.py)
        self.units: dict[str, Unit] = plan_units(
            config.architecture, self.hookpoints, config.hookpoints, config.targets, prefix
        )
        self.saes: dict[str, SAE] = {}
        self.scales: dict[str, Any] = {}  # a float per SAE; {"inputs": [...], "targets": [...]} per multi-site unit
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.since_fired: dict[str, torch.Tensor] = {}
        self.base_lr: dict[str, float] = {}
        self.step = 0
        self.tokens = 0
        self.skipped_batches = 0
        self.elapsed_before = 0.0
        self.evaluation: dict[str, Any] = {}
        self._started: float | None = None
        self.dead_tokens = config.resolved_dead_tokens()
        if checkpoint is not None:
            self._restore(*checkpoint)
        else:
            self._initialize()
        self.metrics = {name: StepMetrics() for name in self.units}
        # per multi-site unit since the last record: sums of each site's [fvu, l0] and the steps
        multi = [name for name in self.units if name in MULTI_SITE.values()]
        self.site_metrics: dict[str, list[Any]] = {name: [None, 0] for name in multi}
        # per unit since the last record: [rows the encoder rescored, rows it recomputed exactly]
        self.encoder_rows = {name: [0, 0] for name in self.units}

    # ---------------------------------------------------------------------------------- set-up

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        current = self.config.to_dict()
        differing = sorted(
            name for name in current if name not in RESUMABLE_OVERRIDES | {"out"} and current[name] != saved.get(name)
        )
        if differing:
            changes = ", ".join(f"{name}: run {saved.get(name)!r}, now {current[name]!r}" for name in differing)
            raise ValueError(f"resume: the settings differ from the checkpoint's ({changes}); use resume_config()")

    def _open_source(self) -> dict[str, Any]:
        config = self.config
        if config.activations is not None:
            self.source = CachedActivations(
                config.activations,
                hookpoints=None if config.architecture in MULTI_SITE else config.hookpoints,
                batch_size=config.batch_size,
                seed=config.seed,
                device=self.device,
            )
            manifest = self.source.manifest
            return {key: manifest.get(key) for key in SOURCE_KEYS} | {
                "activations": str(Path(config.activations).resolve())
            }
        model = ModelActivations(config, cycle=True, device=self.device, part="train")
        self.activations = model
        self.source = ShuffleBuffer(
            model, capacity=config.buffer_tokens, batch_size=config.batch_size, seed=config.seed
        )
        info = {key: getattr(config, key) for key in SOURCE_KEYS}
        return info | ({"model_b": config.model_b} if config.model_b is not None else {})

    def _sae_options(self, architecture: str, d: int) -> dict[str, Any]:
        config = self.config
        fields = {f.name for f in dataclasses.fields(REGISTRY[architecture].config_class)}
        options: dict[str, Any] = {"d_in": d, "n_latents": config.n_latents or config.expansion_factor * d}
        if "k" in fields:
            options["k"] = config.resolved_k()
        if "target_l0" in fields:
            options["target_l0"] = config.resolved_target_l0()
        if "precision" in fields:
            options["precision"] = config.precision
        options.update(config.sae_options)
        return options

    def _unit_options(self, name: str) -> dict[str, Any]:
        """The config of the model trained on unit `name`: an SAE's, plus a CLT's layers and target
        width or a crosscoder's sites (every input site, and every target, must share one width)."""
        unit = self.units[name]
        architecture = self.config.architecture
        for sites, what in ((unit.inputs, "hookpoints"), (unit.targets or (), "targets")):
            widths = {self.widths[site] for site in sites}
            if len(widths) > 1:
                raise ValueError(f"{what}: the sites of a {architecture} must share one width, got {widths}")
        options = self._sae_options(architecture, self.widths[unit.inputs[0]])
        if architecture == "clt":
            options.update(n_layers=len(unit.inputs), d_out=self.widths[unit.targets[0]])
        elif architecture == "crosscoder":
            options.update(n_sites=len(unit.inputs))
        return options

    def _inputs(self, name: str, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The forward arguments of unit `name` from a batch of raw activations, scaled: an SAE's x
        [rows, d]; a crosscoder's sites stacked [rows, S, d]; a CLT's inputs and targets [rows, L, d]."""
        unit, scale = self.units[name], self.scales[name]
        if name not in MULTI_SITE.values():
            return (batch[name].to(dtype) * scale,)

        def stacked(sites: tuple[str, ...], scales: list[float]) -> torch.Tensor:
            return torch.stack([batch[site].to(dtype) * s for site, s in zip(sites, scales, strict=True)], dim=1)

        args = (stacked(unit.inputs, scale["inputs"]),)
        if unit.targets:
            args += (stacked(unit.targets, scale["targets"]),)
        return args

    def _dead_mask(self, name: str, sae: SAE) -> torch.Tensor:
        """The latents counted as dead: [n] for an SAE, [L, n] for a CLT (one counter per latent)."""
        dead = self.since_fired[name] >= self.dead_tokens
        return dead.view(-1, sae.n_latents) if name == MULTI_SITE["clt"] else dead

    def _initialize(self) -> None:
        config = self.config
        loaded = self._load_initial_saes() if config.init_from is not None else {}
        sample = self.source.peek(INIT_SAMPLE_TOKENS)
        for name, unit in self.units.items():
            if name in MULTI_SITE.values():
                if config.init_from is not None:
                    raise ValueError(f"init_from: not supported for {config.architecture} runs yet")
                sae = create(config.architecture, device=self.device, **self._unit_options(name))
                scales = {"inputs": [self._site_scale(sample, site) for site in unit.inputs]}
                if unit.targets:
                    scales["targets"] = [self._site_scale(sample, site) for site in unit.targets]
                self.scales[name] = scales
                if config.b_dec_init != "zeros":
                    # b_dec lives where the model writes: a CLT's targets, a crosscoder's sites
                    centered = self._inputs(name, {site: sample[site].float() for site in unit.sites}, torch.float32)
                    sae.init_b_dec_(centered[-1], method=config.b_dec_init)
                self.saes[name] = sae
                layers = sae.n_layers if name == MULTI_SITE["clt"] else 1
                self.since_fired[name] = torch.zeros(layers * sae.n_latents, dtype=torch.long, device=self.device)
                continue
            d = self.widths[name]
            if name in loaded:
                sae, scale = loaded[name]
            else:
                sae = create(config.architecture, device=self.device, **self._sae_options(config.architecture, d))
                rows = sample[name].float()
                scale = self._site_scale(sample, name)
                if config.b_dec_init != "zeros":
                    sae.init_b_dec_(rows * scale, method=config.b_dec_init)
            self.saes[name] = sae
            self.scales[name] = scale
            self.since_fired[name] = torch.zeros(sae.n_latents, dtype=torch.long, device=self.device)
        self._make_optimizers()

    def _site_scale(self, sample: dict[str, torch.Tensor], site: str) -> float:
        """sqrt(d) / the mean norm of the site's sample rows (normalize_activations), else 1."""
        rows = sample[site].float()
        mean_norm = rows.norm(dim=1).mean().item()
        if self.config.normalize_activations and not mean_norm > 0:
            raise ValueError(f"activations: {site} gives all-zero activations; nothing to train on")
        return math.sqrt(rows.shape[1]) / mean_norm if self.config.normalize_activations else 1.0

    def _load_initial_saes(self) -> dict[str, tuple[SAE, float]]:
        """SAEs from init_from, unfolded back to the training scale they were saved with."""
        root = Path(self.config.init_from)
        loaded: dict[str, tuple[SAE, float]] = {}
        for name in self.units:
            path = root / name if (root / name / "cfg.json").is_file() else root
            if not (path / "cfg.json").is_file():
                raise FileNotFoundError(f"init_from: {root} holds no SAE for {name} (expected {root / name}/cfg.json)")
            if path == root and len(self.hookpoints) > 1:
                raise ValueError(f"init_from: {root} is a single SAE, but there are {len(self.hookpoints)} hookpoints")
            sae = load(path, device=self.device, verify=self.config.verify)
            if sae.d_in != self.widths[name]:
                raise ValueError(
                    f"init_from: the SAE in {path} takes d_in={sae.d_in}, "
                    f"but hookpoint {name} has width {self.widths[name]}"
                )
            scale = (
                float(sae.metadata.get("activation_scale", 1.0)) if sae.metadata.get("activation_scale_folded") else 1.0
            )
            fold_activation_scale_(sae, 1.0 / scale)
            loaded[name] = (sae, scale)
        return loaded

    def _make_optimizers(self) -> None:
        config = self.config
        for name, sae in self.saes.items():
            self.base_lr[name] = config.resolved_lr(sae.n_latents)
            self.optimizers[name] = make_optimizer(
                sae.parameters(),
                config,
                self.base_lr[name],
                update_in_backward=getattr(sae, "update_in_backward", False),
            )

    # ----------------------------------------------------------------------------- checkpoints

    def _checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        optimizers = {}
        for name, sae in self.saes.items():
            tensors.update({f"sae/{name}/{key}": value for key, value in sae.state_dict().items()})
            optimizers[name], optim_tensors = optimizer_state(self.optimizers[name], f"optim/{name}")
            tensors.update(optim_tensors)
            tensors[f"since_fired/{name}"] = self.since_fired[name]
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        source_state, source_tensors = self.source.state_dict()
        tensors.update({f"source/{key}": value for key, value in source_tensors.items()})
        state = {
            "config": self.config.to_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "skipped_batches": self.skipped_batches,
            "elapsed_s": self._elapsed(),
            "hookpoints": self.hookpoints,
            "widths": self.widths,
            "scales": self.scales,
            "saes": {
                name: {
                    "architecture": sae.architecture,
                    "dtype": str(sae.dtype).removeprefix("torch."),
                    "config": sae.config.to_dict(),
                }
                for name, sae in self.saes.items()
            },
            "optimizers": optimizers,
            "source": source_state,
            "flashsae_version": __version__,
        }
        return state, tensors

    def save_checkpoint(self) -> Path:
        state, tensors = self._checkpoint()
        return save_training_checkpoint(self.run_dir / CHECKPOINT_DIR, state, tensors)

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if state["hookpoints"] != self.hookpoints or state["widths"] != self.widths:
            raise ValueError(
                f"resume: the checkpoint has hookpoints {state['widths']}, the model now gives {self.widths}"
            )
        for name in self.units:
            saved = state["saes"][name]
            cls = REGISTRY.get(saved["architecture"])
            if cls is None:
                raise ValueError(f"resume: unknown architecture {saved['architecture']!r} in the checkpoint")
            sae = cls.from_config(
                cls.config_class(**saved["config"]), dtype=getattr(torch, saved["dtype"]), device=self.device
            )
            prefix = f"sae/{name}/"
            sae.load_state_dict({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)})
            self.saes[name] = sae
            saved_scale = state["scales"][name]
            self.scales[name] = saved_scale if isinstance(saved_scale, dict) else float(saved_scale)
            self.since_fired[name] = tensors[f"since_fired/{name}"].to(self.device)
        self._make_optimizers()
        for name, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, f"optim/{name}", state["optimizers"][name], tensors)
        torch.set_rng_state(tensors["rng/torch"])
        cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
        source_tensors = {key[len("source/") :]: value for key, value in tensors.items() if key.startswith("source/")}
        self.source.load_state_dict(state["source"], source_tensors)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped_batches = int(state["skipped_batches"])
        self.elapsed_before = float(state["elapsed_s"])

    def _elapsed(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.elapsed_before + running

    # ---------------------------------------------------------------------------------- training

    def _autocast(self) -> contextlib.AbstractContextManager:
        mode = self.config.autocast
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _batch_is_finite(self, batch: dict[str, torch.Tensor]) -> bool:
        flags = torch.stack([torch.isfinite(x).all() for x in batch.values()])
        return bool(flags.all())

    def _skip_batch(self) -> None:
        self.skipped_batches += 1
        limit = self.config.max_nonfinite_batches
        if self.skipped_batches > limit:
            raise NonFiniteActivationsError(
                f"activations: {self.skipped_batches} batches held NaN/Inf activations "
                f"(max_nonfinite_batches={limit}); "
                "check the model's dtype (float16 overflows easily) and the data"
            )
        warnings.warn(
            f"skipped a batch with NaN/Inf activations ({self.skipped_batches} so far, at most {limit})",
            RuntimeWarning,
            stacklevel=2,
        )

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """One optimizer step of every SAE on `batch` ({hookpoint: [batch_size, d] raw activations})."""
        factor = self.config.lr_factor(self.step)
        for name, sae in self.saes.items():
            optimizer = self.optimizers[name]
            for group in optimizer.param_groups:  # before the forward: an optimizer may update during backward
                group["lr"] = self.base_lr[name] * factor
            inputs = self._inputs(name, batch, sae.dtype)
            dead = self._dead_mask(name, sae)
            before = topk_encode_stats()
            with self._autocast():
                out = sae(*inputs, dead_mask=dead if bool(dead.any()) else None)
            after = topk_encode_stats()
            self.encoder_rows[name][0] += after.rows - before.rows
            self.encoder_rows[name][1] += after.recomputed_rows - before.recomputed_rows
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    f"training diverged: the loss of the SAE on {name} is {out.loss.item()} at step {self.step}; "
                    "lower --lr"
                )
            out.loss.backward()
            optimizer_step(sae, optimizer, self.base_lr[name] * factor)
            with torch.no_grad():
                values, indices = out.latents
                if name == MULTI_SITE["clt"]:  # per-layer indices [rows, L, k]: one counter per latent
                    offsets = torch.arange(sae.n_layers, device=indices.device).view(1, -1, 1) * sae.n_latents
                    indices = torch.where(indices >= 0, indices + offsets, -1)
                fired = indices[(values > 0) & (indices >= 0)].long()
                counter = self.since_fired[name]
                counter += inputs[0].shape[0]
                counter[fired] = 0
            self.metrics[name].add(out.loss, out.fvu, out.auxk_loss, l0_of(out.latents))
            if name in self.site_metrics:
                l0 = _site_l0(out.latents, name).float().expand(out.fvu_per_layer.shape[0])
                per_site = torch.stack([out.fvu_per_layer.float(), l0], dim=1)
                sums = self.site_metrics[name]
                sums[0] = per_site if sums[0] is None else sums[0] + per_site
                sums[1] += 1
        self.step += 1
        self.tokens += next(iter(batch.values())).shape[0]

    def flush_optimizers(self) -> None:
        """Brings SparseAdam's skipped rows up to date (dense Adam's weights), renormalizing the decoder;
        a no-op for dense Adam. Done once training ends, before evaluation and saving; the checkpoint is
        written before it, so a resumed run continues exactly as an uninterrupted one."""
        for name, optimizer in self.optimizers.items():
            flush_optimizer(self.saes[name], optimizer)

    def dead_fraction(self, name: str) -> float:
        return float((self.since_fired[name] >= self.dead_tokens).float().mean())

    def site_dead_fractions(self, name: str) -> list[float]:
        """A CLT's dead fraction per layer (its counters are [L * n])."""
        sae = self.saes[name]
        return (self.since_fired[name] >= self.dead_tokens).view(-1, sae.n_latents).float().mean(1).tolist()

    def _record(self, session_tokens: int, session_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "tokens": self.tokens,
            "lr": self.base_lr[next(iter(self.units))] * self.config.lr_factor(max(self.step - 1, 0)),
            "elapsed_s": round(self._elapsed(), 3),
            # averaged over this session: per-interval rates swing 10x with the buffer refills
            "tokens_per_s": session_tokens / session_s if session_s > 0 else 0.0,
            "skipped_batches": self.skipped_batches,
        }
        for name in self.units:
            figures = self.metrics[name].read()
            figures["dead_pct"] = 100 * self.dead_fraction(name)
            rescored, recomputed = self.encoder_rows[name]
            if rescored:  # the encoder certified its top-k: the share of rows it had to recompute
                figures["recomputed_rows_pct"] = 100 * recomputed / rescored
            self.encoder_rows[name] = [0, 0]
            record.update({f"{name}/{key}": value for key, value in figures.items()})
            record.update(self._site_record(name))
        return record

    def _site_record(self, name: str) -> dict[str, float]:
        """Per-site figures of a multi-site unit since the last record: '<unit>/<site label>/fvu',
        explained_variance, l0 (and dead_pct per CLT layer)."""
        if name not in self.site_metrics or self.site_metrics[name][0] is None:
            return {}
        sums, steps = self.site_metrics[name]
        self.site_metrics[name] = [None, 0]
        means = (sums / steps).tolist()
        dead = self.site_dead_fractions(name) if name == MULTI_SITE["clt"] else None
        record = {}
        for i, (fvu, l0) in enumerate(means):
            label = f"{name}/{_site_label(name, i)}"
            record.update({f"{label}/fvu": fvu, f"{label}/explained_variance": 1 - fvu, f"{label}/l0": l0})
            if dead is not None:
                record[f"{label}/dead_pct"] = 100 * dead[i]
        return record

    @staticmethod
    def _postfix(record: dict[str, Any], hookpoints: list[str]) -> str:
        def mean(key: str) -> float:
            values = [record.get(f"{name}/{key}", math.nan) for name in hookpoints]
            return sum(values) / len(values)

        return (
            f"{record['tokens_per_s']:,.0f} tok/s loss {mean('loss'):.4f} FVU {mean('fvu'):.4f} "
            f"L0 {mean('l0'):.1f} dead {mean('dead_pct'):.1f}%"
        )

    def train(self, on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
        """Runs until train_tokens (or a stop signal), checkpoints, evaluates, saves the SAEs."""
        config = self.config
        total = config.steps
        checkpoint_every = config.resolved_checkpoint_every()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        logger = MetricsLogger(
            self.run_dir,
            tensorboard=self.tensorboard,
            wandb_project=config.wandb_project,
            config=config.to_dict(),
            resume_step=self.step if config.resume else None,
        )
        bar = tqdm(
            total=total, initial=min(self.step, total), unit="step", disable=not config.progress, dynamic_ncols=True
        )
        self._started = time.perf_counter()
        session_tokens = 0
        interrupted = False
        outer = signals.active()  # flashsae train's, installed before the model loaded
        try:
            with contextlib.nullcontext(outer) if outer is not None else StopSignals(abort_process=False) as stop:
                stop.training_started(self.run_dir / CHECKPOINT_DIR)
                while self.step < total:
                    if stop.requested:
                        interrupted = True
                        break
                    batch = self.source.next_batch()
                    if not self._batch_is_finite(batch):
                        self._skip_batch()
                        continue
                    self.train_step(batch)
                    session_tokens += config.batch_size
                    bar.update(1)
                    if self.step % config.log_every == 0 or self.step == total:
                        record = self._record(session_tokens, time.perf_counter() - self._started)
                        logger.log(record)
                        bar.set_postfix_str(self._postfix(record, list(self.units)), refresh=False)
                    if checkpoint_every and self.step % checkpoint_every == 0 and self.step < total:
                        self._periodic_checkpoint()
                    if on_step is not None:
                        on_step(self)
                interrupted = interrupted or (stop.requested and self.step < total)
                self.save_checkpoint()
                stop.training_finished()
        finally:
            bar.close()
            logger.close()
        self.flush_optimizers()
        calibration = {} if interrupted else self.calibrate_thresholds()
        metrics = {} if interrupted else self.evaluate()
        paths = self.save_saes(metrics)
        result = TrainResult(
            self.run_dir, paths, self.step, self.tokens, interrupted, metrics, self.skipped_batches, self._elapsed(),
            self.evaluation if metrics else {},
        )  # fmt: skip
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            "interrupted": interrupted,
            "elapsed_s": self._elapsed(),
            "skipped_batches": self.skipped_batches,
            "metrics": metrics,
            "evaluation": result.evaluation,
            "dead_tokens": self.dead_tokens,
            "threshold_calibration": calibration,
            "saes": {name: str(path) for name, path in paths.items()},
        }
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return result

    def _periodic_checkpoint(self) -> None:
        try:
            self.save_checkpoint()
        except OSError as exc:  # e.g. a full disk: the previous checkpoint is intact, keep training
            warnings.warn(
                f"checkpoint at step {self.step} failed ({exc}); the previous one in "
                f"{self.run_dir / CHECKPOINT_DIR} is intact; training continues",
                RuntimeWarning,
                stacklevel=2,
            )

    @torch.no_grad()
    def calibrate_thresholds(self) -> dict[str, dict[str, float]]:
        """Sets the inference threshold of every BatchTopK-family SAE on calibration_tokens rows of
        the train part (flashsae.train.calibration). Returns {hookpoint: {"tokens", "running_estimate",
        "threshold"}} for the summary; empty when nothing was calibrated."""
        wanted = self.config.calibration_tokens
        targets = {
            name: sae
            for name, sae in self.saes.items()
            if isinstance(sae, BatchTopKSAE) or getattr(sae, "activation", None) == "batchtopk"
        }
        if not wanted or not targets:
            return {}
        sample, part = self._calibration_sample(wanted)
        report = {}
        for name, sae in targets.items():
            if name == MULTI_SITE["clt"]:  # a BatchTopK CLT: every layer's threshold on its stacked inputs
                inputs = self._inputs(name, sample, sae.dtype)[0]
                inputs = inputs[torch.isfinite(inputs).flatten(1).all(1)]
                if inputs.shape[0] == 0:
                    continue
                before = sae.threshold_estimate.tolist()
                after = sae.calibrate_thresholds_(inputs)
                report[name] = {
                    "tokens": int(inputs.shape[0]), "part": part, "running_estimate": before, "threshold": after
                }  # fmt: skip
                continue
            rows = sample[name]
            if not self._batch_is_finite({name: rows}):
                rows = rows[torch.isfinite(rows).all(1)]
            if rows.shape[0] == 0:
                continue
            before = float(sae.threshold)
            after = calibrate_threshold(sae, rows.to(sae.dtype) * self.scales[name])
            report[name] = {"tokens": int(rows.shape[0]), "part": part, "running_estimate": before, "threshold": after}
        return report

    def _calibration_sample(self, wanted: int) -> tuple[dict[str, torch.Tensor], str]:
        """Up to `wanted` rows to calibrate on, and which part they come from: the eval part's
        tokens after the first eval_tokens (held out, and not those the final metrics are measured
        on) when it has at least MIN_CALIBRATION_TOKENS of them, else the train part."""
        taken: dict[str, list[torch.Tensor]] = {name: [] for name in self.hookpoints}
        skip, count = self.config.eval_tokens, 0
        for chunk in self.eval_chunks():
            rows = next(iter(chunk.values())).shape[0]
            start = min(skip, rows)
            skip -= start
            stop = min(rows, start + wanted - count)
            if stop > start:
                for name in self.hookpoints:
                    taken[name].append(chunk[name][start:stop])
                count += stop - start
            if count >= wanted:
                break
        if count >= MIN_CALIBRATION_TOKENS:
            return {name: torch.cat(parts) for name, parts in taken.items()}, "eval"
        return self.source.peek(wanted), "train"

    def eval_chunks(self) -> Iterator[dict[str, torch.Tensor]]:
        """The eval part of the data in order ({hookpoint: [rows, d] raw activations}): read from
        the model over the eval documents, or the eval shards of an activation cache."""
        if isinstance(self.source, CachedActivations):
            yield from self.source.eval_chunks()
        elif self.config.eval_fraction > 0:
            try:
                yield from self.activations.other_part("eval").chunks()
            except EmptyPartError as exc:  # a corpus of a few documents: evaluate() warns
                warnings.warn(str(exc), RuntimeWarning, stacklevel=2)

    def _evaluation_record(self, tokens: int) -> dict[str, Any]:
        dataset = self.source_info.get("dataset")
        fraction = self.source_info.get("eval_fraction")
        split = CorpusPart("eval", fraction).describe() if fraction else "eval part"
        return {"part": "eval", "tokens": tokens, "dataset": dataset, "split": split}

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Explained variance, FVU (over all the tokens, about their mean) and L0 of every SAE on
        the first eval_tokens tokens of the eval part (never trained on), and the dead % of its
        training counters. self.evaluation records the tokens used; no eval part: dead % only, with
        a warning."""
        sums = {name: HeldOutSums() for name in self.units}
        site_sums = {
            name: [HeldOutSums() for _ in range(len(unit.targets or unit.inputs))]
            for name, unit in self.units.items()
            if name in MULTI_SITE.values()
        }
        counted = 0
        for sae in self.saes.values():
            sae.eval()  # the inference rule (e.g. BatchTopK's threshold), as the saved SAE will run
        try:
            for chunk in self.eval_chunks() if self.config.eval_tokens else ():
                if counted >= self.config.eval_tokens:
                    break
                if not self._batch_is_finite(chunk):
                    continue
                rows = min(next(iter(chunk.values())).shape[0], self.config.eval_tokens - counted)
                for start in range(0, rows, self.config.batch_size):
                    stop = min(start + self.config.batch_size, rows)
                    part = {site: values[start:stop] for site, values in chunk.items()}
                    for name, sae in self.saes.items():
                        inputs = self._inputs(name, part, sae.dtype)
                        with self._autocast():
                            out = sae(*inputs)
                        target = inputs[-1]
                        sums[name].add(target.flatten(0, -2) if name not in site_sums else target.flatten(1),
                                       out.x_hat.flatten(0, -2) if name not in site_sums else out.x_hat.flatten(1),
                                       l0_of(out.latents))  # fmt: skip
                        if name in site_sums:
                            l0s = _site_l0(out.latents, name)
                            for i, site_sum in enumerate(site_sums[name]):
                                site_sum.add(target[:, i], out.x_hat[:, i], l0s[min(i, len(l0s) - 1)])
                counted += rows
        finally:
            for sae in self.saes.values():
                sae.train()
        if self.config.eval_tokens and not counted:
            warnings.warn(
                "no held-out tokens to measure the final metrics on (eval_fraction is 0, the eval part holds no "
                "document, or the activation cache holds no eval part); only the dead % is reported",
                RuntimeWarning,
                stacklevel=2,
            )
        self.evaluation = self._evaluation_record(counted) if counted else {}
        results: dict[str, dict[str, float]] = {}
        for name in self.units:
            figures: dict[str, float] = {"dead_pct": 100 * self.dead_fraction(name)}
            if counted:
                fvu = sums[name].fvu()
                figures.update(explained_variance=1 - fvu, fvu=fvu, l0=sums[name].l0 / sums[name].tokens)
            if name in site_sums:
                dead = self.site_dead_fractions(name) if name == MULTI_SITE["clt"] else None
                per_site = []
                for i, site_sum in enumerate(site_sums[name]):
                    site = {"dead_pct": 100 * dead[i]} if dead is not None else {}
                    if counted:
                        site_fvu = site_sum.fvu()
                        site.update(explained_variance=1 - site_fvu, fvu=site_fvu, l0=site_sum.l0 / site_sum.tokens)
                    results[f"{name}/{_site_label(name, i)}"] = site
                    per_site.append(site)
                if counted:  # the unit's figure: the mean of its sites' (each target counts alike)
                    figures["explained_variance"] = sum(site["explained_variance"] for site in per_site) / len(per_site)
                    figures["fvu"] = 1 - figures["explained_variance"]
            results[name] = figures
        return results

    def save_saes(self, metrics: dict[str, dict[str, float]] | None = None) -> dict[str, Path]:
        """Saves every SAE to <run>/<hookpoint> with the activation scale folded in (so it takes
        raw activations) and the run's metadata."""
        paths = {}
        for name, sae in self.saes.items():
            exported = copy.deepcopy(sae)
            fold_activation_scale_(exported, self.scales[name])
            exported.metadata = {
                **self.source_info,
                "hookpoint": name,
                "activation_scale": self.scales[name],
                "activation_scale_folded": True,
                "trained_tokens": self.tokens,
                "steps": self.step,
                "train_config": self.config.to_dict(),
                "final_metrics": (metrics or {}).get(name, {}),
                "flashsae_version": __version__,
            }
            path = self.run_dir / name.replace("/", "_")
            exported.save(path)
            paths[name] = path
        return paths


def _site_label(unit: str, i: int) -> str:
    """How a multi-site unit's site i is named in records: a CLT's layer, a crosscoder's site."""
    return f"layer{i}" if unit == MULTI_SITE["clt"] else f"site{i}"


def _site_l0(latents: Any, unit: str) -> torch.Tensor:
    """Mean active latents per row of each CLT layer [L]; a crosscoder's latents are shared: [1]."""
    values, indices = latents
    active = (values > 0) & (indices >= 0)
    if unit == MULTI_SITE["clt"]:  # [rows, L, slots]
        return active.sum(-1).float().mean(0)
    return active.sum(-1).float().mean().reshape(1)


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Trains with `config` (default: the embedded demo) updated by keyword overrides."""
    config = dataclasses.replace(config or TrainConfig(), **overrides) if overrides else (config or TrainConfig())
    return Trainer(config).train()


__all__ = ["TrainResult", "Trainer", "fold_activation_scale_", "resume_config", "train"]
