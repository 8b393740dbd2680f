"""Training-step benchmark of TopK SAEs: flashsae against the plain-PyTorch baselines.

Providers (same parameters, same init, same optimizer; only the SAE math differs):

- ``torch_dense``: the straightforward TopK SAE (flashsae.bench.baselines.DenseTopKSAE): dense
  [batch, n] pre-activations, torch.topk, a dense latent matrix built with scatter, and a dense
  decoder GEMM (what most codebases write).
- ``torch_sparse``: sparsify-style eager code (SparsifyStyleTopKSAE): sparsify's FusedEncoder (dense
  linear + relu + torch.topk forward, sparse backward with embedding_bag and index_add) and an
  embedding_bag decoder; the strongest eager peer.
- ``flashsae``: :class:`flashsae.TopKSAE` on the fastest available backend.

A training step is forward, ``loss.backward()``, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``,
with the same optimizer for every provider (fused Adam by default: torch's default Adam adds two
[n, d] temporaries per step, 144 MiB at the default size, which would dominate flashsae's step memory).
Each run of a provider is a fresh subprocess so its peak memory is its own: on CPU the peak resident
set size, on CUDA torch.cuda.max_memory_allocated. Two figures per provider: ``peak`` (from before the
model exists: weights + gradients + optimizer state + activations) and ``step`` (the transient memory
of one step on top of weights and optimizer state). Every provider runs ``repeats`` times, the runs
interleaved so that a slow phase of a shared machine hits all providers alike; the report gives the
median step time over the runs and its min-max, and speed as ratios to both baselines measured in the
same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from ..modules import TopKSAE
from ..modules.topk import TOPK_PRECISIONS
from .baselines import DenseTopKSAE, SparsifyStyleTopKSAE
from .environment import describe, environment, precision_label
from .memory import PeakMemory
from .timer import Spread, time_ms

#: Provider name -> SAE constructor (d_in, n_latents, k, dtype=, device=). A new row (another
#: precision or architecture setting) is one more entry, e.g. a functools.partial of TopKSAE.
PROVIDERS: dict[str, Callable[..., nn.Module]] = {
    "torch_dense": DenseTopKSAE,
    "torch_sparse": SparsifyStyleTopKSAE,
    "flashsae": TopKSAE,
}
BASELINES = ("torch_dense", "torch_sparse")
OPTIMIZERS = ("adam", "adam-fused", "adam-foreach")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WARMUP_STEPS = 2


def make_optimizer(name: str, params, lr: float = 1e-4) -> torch.optim.Optimizer:
    """torch.optim.Adam as `name` says: "adam" (torch's default implementation for the device),
    "adam-fused" (one fused kernel per tensor) or "adam-foreach" (multi-tensor)."""
    options = {"adam": {}, "adam-fused": {"fused": True}, "adam-foreach": {"foreach": True}}
    if name not in options:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return torch.optim.Adam(params, lr=lr, **options[name])


def train_step(sae: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """forward, backward of the SAE's loss, Adam step, zero_grad(set_to_none=True); returns the
    detached FVU."""
    out = sae(x)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.fvu.detach()


@dataclass
class BenchConfig:
    """One benchmark setting (all providers share it)."""

    d_in: int = 768
    """Input width d."""
    n_latents: int = 24576
    """Dictionary size n."""
    k: int = 32
    """Active latents per token."""
    batch: int = 1024
    """Tokens per training step."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32, bfloat16 or float16."""
    device: str = "cpu"
    """cpu or cuda."""
    steps: int = 5
    """Timed training steps per run (after 2 warm-up steps)."""
    repeats: int = 3
    """Runs per provider, each in a fresh process; the report gives the median and min-max of the
    runs' median step times."""
    optimizer: str = "adam-fused"
    """adam-fused (default: torch's fastest Adam on CPU and CUDA, no [n, d] temporaries), adam
    (torch's default implementation) or adam-foreach; always the same for every provider."""
    threads: int | None = None
    """CPU threads (torch.set_num_threads); None keeps torch's default."""
    seed: int = 0
    precision: str = "auto"
    """flashsae's encoder precision (TopKConfig.precision): "auto" (default: what ``flashsae train``
    uses, the certified encoder, exact results from bfloat16 scores, where this CPU's bfloat16 GEMM
    is fast, else exact), "exact", "certified" or "fast".
    The baselines compute in the dtype as given."""

    def __post_init__(self) -> None:
        if self.precision not in TOPK_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(TOPK_PRECISIONS)}, got {self.precision!r}")
        for name in ("d_in", "n_latents", "k", "batch", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.k > self.n_latents:
            raise ValueError(f"k: expected <= n_latents ({self.n_latents}), got {self.k}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")


def prepare(provider: str, config: BenchConfig) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """The provider's SAE (seeded init), its optimizer and the input batch."""
    if provider not in PROVIDERS:
        raise ValueError(f"providers: expected names from {', '.join(PROVIDERS)}, got {provider!r}")
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch, config.d_in, generator=generator).to(device=device, dtype=dtype)
    torch.manual_seed(config.seed)
    options = {"precision": config.precision} if provider == "flashsae" else {}
    sae = PROVIDERS[provider](config.d_in, config.n_latents, config.k, dtype=dtype, device=device, **options)
    return sae, make_optimizer(config.optimizer, sae.parameters()), x


@dataclass
class ProviderResult:
    """One run of one provider (one process)."""

    provider: str
    step_ms: float
    """Median wall time of one training step."""
    fwd_bwd_ms: float
    """Median wall time of forward + backward alone (no optimizer)."""
    peak_bytes: int
    """Peak memory from before the model existed to the end of the run."""
    step_bytes: int
    """Peak transient memory of a training step above the resident model + optimizer state."""
    final_fvu: float
    step_times_ms: list[float] = field(default_factory=list)


def measure_provider(provider: str, config: BenchConfig) -> ProviderResult:
    """Runs one provider in this process (run_provider_subprocess gives clean memory figures)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    memory = PeakMemory(device)
    memory.reset()
    start_bytes = memory.current()
    sae, optimizer, x = prepare(provider, config)
    time_ms(lambda: train_step(sae, optimizer, x), device, repeats=0, warmup=WARMUP_STEPS)
    resident_bytes = memory.current()  # warm-up allocated the optimizer state and paged in the kernels
    memory.reset()
    step_times = time_ms(lambda: train_step(sae, optimizer, x), device, config.steps)
    step_bytes = memory.peak() - resident_bytes
    peak_bytes = memory.peak() - start_bytes

    def forward_backward() -> None:
        sae(x).loss.backward()
        sae.zero_grad(set_to_none=True)

    fwd_bwd_times = time_ms(forward_backward, device, max(2, config.steps // 2))
    return ProviderResult(
        provider=provider,
        step_ms=statistics.median(step_times),
        fwd_bwd_ms=statistics.median(fwd_bwd_times),
        peak_bytes=peak_bytes,
        step_bytes=step_bytes,
        final_fvu=float(train_step(sae, optimizer, x)),
        step_times_ms=step_times,
    )


def measure_encoder_gemm(config: BenchConfig) -> float:
    """Median ms of one dense encoder GEMM of the same shape: [batch, d] x [d, n] + bias."""
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    x = torch.randn(config.batch, config.d_in, dtype=dtype, device=device)
    weight = torch.randn(config.n_latents, config.d_in, dtype=dtype, device=device)
    bias = torch.zeros(config.n_latents, dtype=dtype, device=device)
    return statistics.median(time_ms(lambda: torch.addmm(bias, x, weight.T), device, max(3, config.steps), warmup=1))


def run_provider_subprocess(provider: str, config: BenchConfig) -> ProviderResult:
    """measure_provider in a fresh Python process, so memory figures are the provider's alone."""
    command = [sys.executable, "-m", "flashsae.bench.train_step", provider, json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {provider} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return ProviderResult(**json.loads(done.stdout.strip().splitlines()[-1]))


@dataclass
class ProviderSummary:
    """A provider over all its runs: medians of the runs' figures, and the range of step times."""

    provider: str
    step_ms: float
    """Median over the runs of each run's median step time."""
    step_ms_min: float
    step_ms_max: float
    fwd_bwd_ms: float
    peak_bytes: int
    step_bytes: int
    final_fvu: float
    """FVU after the last run's final step."""
    run_step_ms: list[float]
    """Each run's median step time, in run order."""
    step_times_ms: list[float]
    """Every timed step of every run."""

    @classmethod
    def of(cls, runs: list[ProviderResult]) -> ProviderSummary:
        spread = Spread.of([r.step_ms for r in runs])
        return cls(
            provider=runs[0].provider,
            step_ms=spread.median,
            step_ms_min=spread.low,
            step_ms_max=spread.high,
            fwd_bwd_ms=statistics.median(r.fwd_bwd_ms for r in runs),
            peak_bytes=int(statistics.median(r.peak_bytes for r in runs)),
            step_bytes=int(statistics.median(r.step_bytes for r in runs)),
            final_fvu=runs[-1].final_fvu,
            run_step_ms=[r.step_ms for r in runs],
            step_times_ms=[t for r in runs for t in r.step_times_ms],
        )

    @property
    def spread(self) -> Spread:
        return Spread(self.step_ms, self.step_ms_min, self.step_ms_max)


def _speedup(base: ProviderSummary | None, r: ProviderSummary) -> str:
    return f"{base.step_ms / r.step_ms:.2f}x" if base else "-"


def _memory_ratio(value: int, base: int | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def format_report(config: BenchConfig, results: list[ProviderSummary], gemm_ms: float, env: dict[str, Any]) -> str:
    """The table `flashsae bench` prints: time and memory per provider, as ratios to both baselines."""
    found = {r.provider: r for r in results}
    dense, sparse = found.get("torch_dense"), found.get("torch_sparse")
    mib = 1024 * 1024
    lines = [
        f"TopK SAE training step: d={config.d_in} n={config.n_latents} k={config.k} batch={config.batch} "
        f"{config.dtype} on {config.device}, optimizer {config.optimizer}, flashsae precision "
        f"{precision_label(config.precision, DTYPES[config.dtype], config.device)}, "
        f"{config.steps} steps x "
        f"{config.repeats} runs per provider",
        describe(env),
        "",
        "step ms: median over the runs (min-max); speedup: baseline step time / this one's (higher is",
        "better); memory ratios: this one's / the baseline's (lower is better).",
        "",
        f"{'provider':<13} {'step ms (min-max)':>24} {'vs dense':>9} {'vs sparse':>10} {'fwd+bwd ms':>11} "
        f"{'tokens/s':>10} {'peak MiB':>9} {'vs dense':>9} {'vs sparse':>10} {'step MiB':>9} {'vs dense':>9}",
    ]
    for r in results:
        lines.append(
            f"{r.provider:<13} {r.spread.format():>24} {_speedup(dense, r):>9} {_speedup(sparse, r):>10} "
            f"{r.fwd_bwd_ms:>11.1f} {config.batch / r.step_ms * 1e3:>10.0f} {r.peak_bytes / mib:>9.0f} "
            f"{_memory_ratio(r.peak_bytes, dense and dense.peak_bytes):>9} "
            f"{_memory_ratio(r.peak_bytes, sparse and sparse.peak_bytes):>10} {r.step_bytes / mib:>9.0f} "
            f"{_memory_ratio(r.step_bytes, dense and dense.step_bytes):>9}"
        )
    lines.append("")
    lines.append(
        f"one encoder GEMM [{config.batch}x{config.d_in}]x[{config.d_in}x{config.n_latents}]: {gemm_ms:.1f} ms"
    )
    for r in results:
        lines.append(f"  {r.provider:<13} forward+backward = {r.fwd_bwd_ms / gemm_ms:.2f}x that GEMM")
    return "\n".join(lines)


def run_benchmark(
    config: BenchConfig, providers: tuple[str, ...] = tuple(PROVIDERS), progress: TextIO | None = None
) -> dict[str, Any]:
    """Measures every provider `config.repeats` times (each run in its own subprocess, the runs
    interleaved) and the encoder GEMM; progress lines go to `progress` (e.g. sys.stderr)."""
    for name in providers:
        if name not in PROVIDERS:
            raise ValueError(f"providers: expected names from {', '.join(PROVIDERS)}, got {name!r}")

    def say(text: str, end: str = "\n") -> None:
        if progress is not None:
            print(text, end=end, file=progress, flush=True)

    runs: dict[str, list[ProviderResult]] = {name: [] for name in providers}
    total, done, started = len(providers) * config.repeats, 0, time.perf_counter()
    for repeat in range(config.repeats):
        for name in providers:
            done += 1
            say(f"[{done}/{total}] {name} run {repeat + 1}/{config.repeats} ... ", end="")
            result = run_provider_subprocess(name, config)
            runs[name].append(result)
            say(f"{result.step_ms:.1f} ms/step ({time.perf_counter() - started:.0f} s elapsed)")
    say("encoder GEMM alone ...")
    if config.threads:
        torch.set_num_threads(config.threads)
    gemm_ms = measure_encoder_gemm(config)
    env = environment()
    results = [ProviderSummary.of(runs[name]) for name in providers]
    return {
        "config": asdict(config),
        "environment": env,
        "encoder_gemm_ms": gemm_ms,
        "results": [asdict(r) for r in results],
        "runs": [asdict(r) for name in providers for r in runs[name]],
        "report": format_report(config, results, gemm_ms, env),
    }


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="internal: measure one provider and print JSON")
    parser.add_argument("provider", choices=list(PROVIDERS))
    parser.add_argument("config", help="BenchConfig as JSON")
    args = parser.parse_args(argv)
    result = measure_provider(args.provider, BenchConfig(**json.loads(args.config)))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _worker_main(sys.argv[1:])
