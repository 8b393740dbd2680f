"""Training-step benchmark of cross-layer transcoders (``flashsae bench --architecture clt``):
flashsae's CrossLayerTranscoder against a dense PyTorch CLT of the same math.

Providers (same initial weights, same batch, same loss: the mean over layers of each layer's FVU):

- ``torch_dense``: :class:`DenseCLT`, what a plain PyTorch CLT does: per layer the [B, n]
  pre-activations (one GEMM), relu, torch.topk, the dense latents scattered into [B, n], then one
  dense GEMM per layer against its [n, (L - i) d] decoder; torch.optim.Adam(fused=True) (one kernel
  per tensor, no [n, d] temporaries). The inputs do not require grad, so autograd computes no
  gradient of x, as in flashsae.
- ``flashsae``: :class:`flashsae.CrossLayerTranscoder` (topk_encode per layer, one sparse_decode per
  layer to all later layers) with :class:`flashsae.optim.SparseAdam` updating rows during backward
  (``update_in_backward``), at the encoder precision ``flashsae train`` uses ("auto": the certified
  top-k, bit-identical to "exact").

A step is forward, backward, optimizer step and zero_grad(set_to_none=True). Each run of a provider is
a fresh subprocess, so its memory is its own: ``step`` memory is the peak during the timed steps
minus what was resident after the warm-up steps (weights and optimizer state), as for the SAE rows
(flashsae.bench.train_step). Runs alternate between providers (the order reversed every other
repeat) so that a slow phase of a shared machine hits both; the report gives the median of the runs'
median step times, their min-max, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from ..modules.topk import TOPK_PRECISIONS
from .environment import describe, environment, precision_label
from .memory import PeakMemory
from .timer import Spread, time_ms

PROVIDERS = ("torch_dense", "flashsae")
WARMUP_STEPS = 2


@dataclass
class CLTBenchConfig:
    """One CLT benchmark setting (both providers share it); float32 throughout."""

    n_layers: int = 6
    """Layers L: L encoders, L (L + 1) / 2 decoder blocks."""
    d_in: int = 384
    """Width d of every input and target site."""
    n_latents: int = 8192
    """Latents per layer n."""
    k: int = 32
    """Active latents per token and layer."""
    batch: int = 1024
    """Tokens per training step."""
    device: str = "cpu"
    """cpu or cuda."""
    steps: int = 4
    """Timed training steps per run (after 2 warm-up steps)."""
    repeats: int = 2
    """Runs per provider, each in a fresh process."""
    precision: str = "auto"
    """flashsae's encoder precision (CrossLayerTranscoderConfig.precision): "auto" (the trainer's
    default: "certified", "exact"'s results from bfloat16 GEMM candidates, where this CPU's bfloat16
    GEMM is fast, else "exact"), "exact", "certified" or "fast"."""
    threads: int | None = None
    """CPU threads (torch.set_num_threads); None keeps torch's default."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_in", "n_latents", "k", "batch", "steps", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.k > self.n_latents:
            raise ValueError(f"k: expected <= n_latents ({self.n_latents}), got {self.k}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected cpu or cuda, got {self.device!r}")
        if self.precision not in TOPK_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(TOPK_PRECISIONS)}, got {self.precision!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected None or an int >= 1, got {self.threads!r}")


class DenseCLT(nn.Module):
    """The CLT written densely: [B, n] latents per layer and dense decoder GEMMs, with the parameter
    names and shapes of flashsae's CrossLayerTranscoder (so one state_dict loads into both)."""

    def __init__(self, n_layers: int, d: int, n: int, k: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_layers, self.d, self.n, self.k = n_layers, d, n, k
        for i in range(n_layers):
            self.register_parameter(f"W_enc_{i}", nn.Parameter(torch.empty(n, d, device=device)))
            self.register_parameter(f"b_enc_{i}", nn.Parameter(torch.zeros(n, device=device)))
            self.register_parameter(f"W_dec_{i}", nn.Parameter(torch.empty(n, (n_layers - i) * d, device=device)))
            self.register_parameter(f"b_dec_{i}", nn.Parameter(torch.zeros(d, device=device)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss (mean over layers of each layer's FVU) of x, y [B, L, d]."""
        L, d = self.n_layers, self.d
        decoded = []
        for i in range(L):
            pre = torch.addmm(getattr(self, f"b_enc_{i}"), x[:, i], getattr(self, f"W_enc_{i}").T).relu()
            top = pre.topk(self.k, dim=1)
            latents = torch.zeros_like(pre).scatter(1, top.indices, top.values)
            decoded.append(latents @ getattr(self, f"W_dec_{i}"))
        fvu = []
        for j in range(L):
            y_hat = getattr(self, f"b_dec_{j}") + sum(decoded[i][:, (j - i) * d : (j - i + 1) * d] for i in range(j + 1))
            target = y[:, j]
            fvu.append((y_hat - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum())
        return torch.stack(fvu).mean()


def prepare(provider: str, config: CLTBenchConfig):
    """(model, optimizer, loss function) of the provider: seeded weights shared by both providers
    (decoders drawn at scale d^-1/2, not flashsae's zero init, so that every gradient flows) and one
    seeded batch x, y [B, L, d]."""
    import flashsae
    from flashsae.optim import SparseAdam

    if provider not in PROVIDERS:
        raise ValueError(f"providers: expected names from {', '.join(PROVIDERS)}, got {provider!r}")
    L, d, n, k = config.n_layers, config.d_in, config.n_latents, config.k
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    clt = flashsae.create("clt", n_layers=L, d_in=d, n_latents=n, k=k, precision=config.precision, device=device)
    with torch.no_grad():
        for W in clt.decoder_matrices():
            W.normal_(0, d**-0.5)
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(config.batch, L, d, generator=generator).to(device)
    y = torch.randn(config.batch, L, d, generator=generator).to(device)
    if provider == "flashsae":
        optimizer = SparseAdam(clt.parameters(), lr=1e-4, update_in_backward=True)
        return clt, optimizer, lambda: clt(x, y).loss
    dense = DenseCLT(L, d, n, k, device=device)
    dense.load_state_dict(clt.state_dict())
    del clt
    optimizer = torch.optim.Adam(dense.parameters(), lr=1e-4, fused=True)
    return dense, optimizer, lambda: dense(x, y)


@dataclass
class CLTProviderResult:
    """One run of one provider (one process)."""

    provider: str
    step_ms: float
    """Median wall time of one training step."""
    step_bytes: int
    """Peak transient memory of a training step above the resident weights + optimizer state."""
    resident_bytes: int
    """Memory resident after the warm-up steps (weights, optimizer state, the process itself on CPU)."""
    losses: list[float]
    """The loss of every step, warm-up included (both providers start from the same value)."""
    step_times_ms: list[float] = field(default_factory=list)


def measure_provider(provider: str, config: CLTBenchConfig) -> CLTProviderResult:
    """Runs one provider in this process (run_provider_subprocess gives clean memory figures)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    memory = PeakMemory(device)
    _, optimizer, loss_fn = prepare(provider, config)
    losses: list[float] = []

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    time_ms(step, device, repeats=0, warmup=WARMUP_STEPS)
    resident = memory.current()
    memory.reset()
    times = time_ms(step, device, config.steps)
    return CLTProviderResult(
        provider=provider,
        step_ms=statistics.median(times),
        step_bytes=max(0, memory.peak() - resident),
        resident_bytes=resident,
        losses=losses,
        step_times_ms=times,
    )


def run_provider_subprocess(provider: str, config: CLTBenchConfig) -> CLTProviderResult:
    """measure_provider in a fresh Python process, so memory figures are the provider's alone."""
    command = [sys.executable, "-m", "flashsae.bench.clt_step", provider, json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {provider} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return CLTProviderResult(**json.loads(done.stdout.strip().splitlines()[-1]))


@dataclass
class CLTProviderSummary:
    """A provider over all its runs: medians of the runs' figures and the range of step times."""

    provider: str
    step_ms: float
    """Median over the runs of each run's median step time."""
    step_ms_min: float
    step_ms_max: float
    step_bytes: int
    resident_bytes: int
    first_loss: float
    """The loss of the first step (equal for both providers up to rounding: the same math)."""
    run_step_ms: list[float]
    step_times_ms: list[float]

    @classmethod
    def of(cls, runs: list[CLTProviderResult]) -> CLTProviderSummary:
        spread = Spread.of([r.step_ms for r in runs])
        return cls(
            provider=runs[0].provider,
            step_ms=spread.median,
            step_ms_min=spread.low,
            step_ms_max=spread.high,
            step_bytes=int(statistics.median(r.step_bytes for r in runs)),
            resident_bytes=int(statistics.median(r.resident_bytes for r in runs)),
            first_loss=runs[0].losses[0],
            run_step_ms=[r.step_ms for r in runs],
            step_times_ms=[t for r in runs for t in r.step_times_ms],
        )


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on every platform
        return None


def format_report(config: CLTBenchConfig, results: list[CLTProviderSummary], env: dict[str, Any]) -> str:
    """The table `flashsae bench --architecture clt` prints."""
    found = {r.provider: r for r in results}
    dense = found.get("torch_dense")
    mib = 1024 * 1024
    c = config
    lines = [
        f"CLT training step: L={c.n_layers} d={c.d_in} n={c.n_latents} per layer k={c.k} batch={c.batch} float32 "
        f"on {c.device}, flashsae precision {precision_label(c.precision, torch.float32, c.device)}, {c.steps} steps x {c.repeats} runs per provider",
        describe(env),
        f"load average (1, 5, 15 min) before: {env.get('load_before')}, after: {env.get('load_after')}",
        "",
        "step ms: median over the runs (min-max); speedup: torch_dense's step time / this one's (higher is",
        "better); step memory: peak above the resident weights + optimizer state (lower is better).",
        "",
        f"{'provider':<12} {'step ms (min-max)':>28} {'vs dense':>9} {'tokens/s':>9} {'step MiB':>9} "
        f"{'vs dense':>9} {'resident MiB':>13} {'first loss':>11}",
    ]
    for r in results:
        speed = f"{dense.step_ms / r.step_ms:.2f}x" if dense else "-"
        memory = f"{r.step_bytes / max(dense.step_bytes, 1):.2f}x" if dense else "-"
        lines.append(
            f"{r.provider:<12} {Spread(r.step_ms, r.step_ms_min, r.step_ms_max).format():>28} {speed:>9} "
            f"{c.batch / r.step_ms * 1e3:>9.0f} {r.step_bytes / mib:>9.0f} {memory:>9} "
            f"{r.resident_bytes / mib:>13.0f} {r.first_loss:>11.5f}"
        )
    return "\n".join(lines)


def run_benchmark(
    config: CLTBenchConfig, providers: tuple[str, ...] = PROVIDERS, progress: TextIO | None = None
) -> dict[str, Any]:
    """Measures every provider `config.repeats` times (each run in its own subprocess, alternating);
    progress lines go to `progress` (e.g. sys.stderr). Returns config, environment (with the load
    average before and after), per-provider summaries, every run, speedup, step_memory_ratio and the
    printed report."""
    if not providers:
        raise ValueError(f"providers: expected names from {', '.join(PROVIDERS)}, got none")
    for name in providers:
        if name not in PROVIDERS:
            raise ValueError(f"providers: expected names from {', '.join(PROVIDERS)}, got {name!r}")

    def say(text: str, end: str = "\n") -> None:
        if progress is not None:
            print(text, end=end, file=progress, flush=True)

    load_before = _load()
    runs: dict[str, list[CLTProviderResult]] = {name: [] for name in providers}
    total, done, started = len(providers) * config.repeats, 0, time.perf_counter()
    for repeat in range(config.repeats):
        for name in providers if repeat % 2 == 0 else tuple(reversed(providers)):
            done += 1
            say(f"[{done}/{total}] {name} run {repeat + 1}/{config.repeats} ... ", end="")
            result = run_provider_subprocess(name, config)
            runs[name].append(result)
            say(f"{result.step_ms:.1f} ms/step ({time.perf_counter() - started:.0f} s elapsed)")
    env = {**environment(), "load_before": load_before, "load_after": _load()}
    results = [CLTProviderSummary.of(runs[name]) for name in providers]
    found = {r.provider: r for r in results}
    outcome: dict[str, Any] = {
        "architecture": "clt",
        "config": asdict(config),
        "environment": env,
        "results": [asdict(r) for r in results],
        "runs": [asdict(r) for name in providers for r in runs[name]],
        "report": format_report(config, results, env),
    }
    if "torch_dense" in found and "flashsae" in found:
        dense, ours = found["torch_dense"], found["flashsae"]
        outcome["speedup"] = dense.step_ms / ours.step_ms
        outcome["step_memory_ratio"] = ours.step_bytes / max(dense.step_bytes, 1)
    return outcome


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="internal: measure one CLT provider and print JSON")
    parser.add_argument("provider", choices=list(PROVIDERS))
    parser.add_argument("config", help="CLTBenchConfig as JSON")
    args = parser.parse_args(argv)
    result = measure_provider(args.provider, CLTBenchConfig(**json.loads(args.config)))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _worker_main(sys.argv[1:])
