"""Training-step benchmark of TopK SAEs: flashsae against plain-PyTorch baselines.

Providers (same parameters, same init, same optimizer; only the SAE math differs):

- ``torch_dense``: the straightforward TopK SAE: dense [batch, n] pre-activations, torch.topk,
  a dense latent matrix built with scatter, and a dense decoder GEMM (what most codebases write).
- ``torch_sparse``: sparsify-style eager code: sparsify's FusedEncoder (dense linear + relu +
  torch.topk forward, sparse backward with embedding_bag and index_add) and an embedding_bag decoder.
- ``flashsae``: :class:`flashsae.TopKSAE` on the fastest available backend.

A training step is forward, ``fvu.backward()``, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``,
with the same optimizer for every provider (fused Adam by default: torch's default Adam adds two
[n, d] temporaries per step, 144 MiB at the default size, which would dominate flashsae's step memory).
Each provider runs in a fresh subprocess so its peak memory is its own: on CPU the peak resident set
size (VmHWM, reset through /proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated. Two
figures per provider: ``peak`` (from before the model exists: weights + gradients + optimizer state
+ activations) and ``step`` (the transient memory of one step on top of weights and optimizer state).
Speed is reported as a ratio to ``torch_dense`` measured in the same run (DESIGN.md §4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import TopKSAE
from .outputs import ForwardOutput, SparseLatents

PROVIDERS = ("torch_dense", "torch_sparse", "flashsae")
OPTIMIZERS = ("adam", "adam-fused", "adam-foreach")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------- baselines


class DenseTopKSAE(TopKSAE):
    """The dense PyTorch TopK SAE baseline: same parameters and math as TopKSAE, computed with
    [batch, n_latents] tensors and autograd (torch.topk ties are unordered, otherwise identical)."""

    def _dense_latents(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = F.relu((rows - self.b_dec) @ self.W_enc.T + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return pre, top.values, top.indices

    def _output(self, x, x_hat, values, indices, mse, fvu, auxk) -> ForwardOutput:
        lead = x.shape[:-1]
        latents = SparseLatents(values.reshape(*lead, self.k), indices.int().reshape(*lead, self.k))
        loss = fvu + self.config.auxk_alpha * auxk
        return ForwardOutput(x_hat.reshape(*lead, self.d_in), latents, fvu, mse, auxk, loss)

    def _losses(self, rows, x_hat, pre, dead_mask):
        total_variance = (rows - rows.mean(0)).pow(2).sum()
        sse = (x_hat - rows).pow(2).sum()
        auxk = sse.new_zeros(())
        if dead_mask is not None:
            aux = pre.masked_fill(~dead_mask, float("-inf")).topk(self.aux_k, dim=-1)
            aux_values = torch.where(aux.values == float("-inf"), 0.0, aux.values)
            e_hat = torch.zeros_like(pre).scatter(-1, aux.indices, aux_values) @ self.W_dec
            scale = (dead_mask.sum() / self.aux_k).clamp(max=1.0)
            auxk = scale * (e_hat - (rows - x_hat).detach()).pow(2).sum() / total_variance
        return sse / rows.numel(), sse / total_variance, auxk

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        rows = self._rows(x)
        pre, values, indices = self._dense_latents(rows)
        dense = torch.zeros_like(pre).scatter(-1, indices, values)
        x_hat = dense @ self.W_dec + self.b_dec
        return self._output(x, x_hat, values, indices, *self._losses(rows, x_hat, pre, dead_mask))


class SparsifyStyleEncoder(torch.autograd.Function):
    """sparsify's FusedEncoder, eager: dense forward (linear + relu + torch.topk, [batch, n] is
    built), sparse backward (embedding_bag for the input, index_add for weight and bias).

    Two differences from sparsify, so that it computes exactly flashsae's function: zero values get
    no gradient (relu' = 0), and a gradient on the returned pre-activations (AuxK's path) is
    propagated densely, recomputing them, instead of being dropped."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int):
        pre = F.relu(F.linear(x, weight, bias))
        values, indices = pre.topk(k, dim=-1)
        ctx.save_for_backward(x, weight, bias, values, indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return values, indices, pre

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_pre):
        x, weight, bias, values, indices = ctx.saved_tensors
        g = torch.zeros_like(values) if grad_values is None else grad_values * (values > 0)
        grad_x = F.embedding_bag(indices, weight, mode="sum", per_sample_weights=g)
        flat = indices.flatten()
        grad_w = torch.zeros_like(weight).index_add_(0, flat, (g.unsqueeze(2) * x.unsqueeze(1)).flatten(0, 1))
        grad_b = torch.zeros_like(bias).index_add_(0, flat, g.flatten())
        if grad_pre is not None:
            dense = grad_pre * (F.linear(x, weight, bias) > 0)
            grad_x = grad_x + dense @ weight
            grad_w = grad_w + dense.T @ x
            grad_b = grad_b + dense.sum(0)
        return grad_x, grad_w, grad_b, None


class SparsifyStyleTopKSAE(DenseTopKSAE):
    """sparsify-style eager TopK SAE: SparsifyStyleEncoder and an embedding_bag decoder."""

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        rows = self._rows(x)
        values, indices, pre = SparsifyStyleEncoder.apply(rows - self.b_dec, self.W_enc, self.b_enc, self.k)
        x_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        return self._output(x, x_hat, values, indices, *self._losses(rows, x_hat, pre, dead_mask))


PROVIDER_CLASSES: dict[str, type[TopKSAE]] = {
    "torch_dense": DenseTopKSAE,
    "torch_sparse": SparsifyStyleTopKSAE,
    "flashsae": TopKSAE,
}


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


# ------------------------------------------------------------------------------------ measurement


class PeakMemory:
    """Peak memory since the last reset(): torch.cuda on CUDA, else the process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as handle:  # "5": reset VmHWM to the current RSS
                handle.write("5")

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM")


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


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
    """Timed training steps per provider (after 2 warm-up steps)."""
    optimizer: str = "adam-fused"
    """adam-fused (default: torch's fastest Adam on CPU and CUDA, no [n, d] temporaries), adam
    (torch's default implementation) or adam-foreach; always the same for every provider."""
    threads: int | None = None
    """CPU threads (torch.set_num_threads); None keeps torch's default."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "k", "batch", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.k > self.n_latents:
            raise ValueError(f"k: expected <= n_latents ({self.n_latents}), got {self.k}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")


@dataclass
class ProviderResult:
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


def _sample_inputs(config: BenchConfig, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch, config.d_in, generator=generator)
    return x.to(device=device, dtype=DTYPES[config.dtype])


def measure_provider(provider: str, config: BenchConfig) -> ProviderResult:
    """Runs one provider in this process (use run_provider_subprocess for clean memory figures)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    x = _sample_inputs(config, device)
    memory = PeakMemory(device)
    memory.reset()
    start_bytes = memory.current()
    torch.manual_seed(config.seed)
    sae = PROVIDER_CLASSES[provider](config.d_in, config.n_latents, config.k, dtype=DTYPES[config.dtype], device=device)
    optimizer = make_optimizer(config.optimizer, sae.parameters())
    for _ in range(2):  # warm-up: allocates the optimizer state, pages in the kernels
        train_step(sae, optimizer, x)
    resident_bytes = memory.current()
    memory.reset()
    step_times = _timed(lambda: train_step(sae, optimizer, x), device, config.steps)
    step_bytes = memory.peak() - resident_bytes
    peak_bytes = memory.peak() - start_bytes

    def forward_backward() -> None:
        sae(x).loss.backward()
        sae.zero_grad(set_to_none=True)

    fwd_bwd_times = _timed(forward_backward, device, max(2, config.steps // 2))
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
    device = torch.device(config.device)
    dtype = DTYPES[config.dtype]
    x = _sample_inputs(config, device)
    weight = torch.randn(config.n_latents, config.d_in, dtype=dtype, device=device)
    bias = torch.zeros(config.n_latents, dtype=dtype, device=device)
    torch.addmm(bias, x, weight.T)
    return statistics.median(_timed(lambda: torch.addmm(bias, x, weight.T), device, max(3, config.steps)))


def run_provider_subprocess(provider: str, config: BenchConfig) -> ProviderResult:
    """measure_provider in a fresh Python process, so memory figures are the provider's alone."""
    command = [sys.executable, "-m", "flashsae.benchmarking", provider, json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {provider} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return ProviderResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def environment() -> dict[str, Any]:
    """Machine and versions a result came from."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_report(config: BenchConfig, results: list[ProviderResult], gemm_ms: float, env: dict[str, Any]) -> str:
    """The table `flashsae bench` prints: time and memory per provider, as ratios to torch_dense."""
    dense = next((r for r in results if r.provider == "torch_dense"), None)
    mib = 1024 * 1024
    lines = [
        f"TopK SAE training step: d={config.d_in} n={config.n_latents} k={config.k} batch={config.batch} "
        f"{config.dtype} on {config.device} ({env['cpu_threads']} threads), optimizer {config.optimizer}",
        f"torch {env['torch']}, {env.get('gpu', env['processor'])}, {env['date']}",
        "",
        f"{'provider':<13} {'step ms':>9} {'speedup':>8} {'fwd+bwd ms':>11} {'tokens/s':>10} "
        f"{'peak MiB':>9} {'vs dense':>9} {'step MiB':>9} {'vs dense':>9}",
    ]
    for r in results:
        speed = f"{dense.step_ms / r.step_ms:.2f}x" if dense else "-"
        peak = f"{r.peak_bytes / dense.peak_bytes:.2f}x" if dense else "-"
        step = f"{r.step_bytes / dense.step_bytes:.2f}x" if dense and dense.step_bytes > 0 else "-"
        lines.append(
            f"{r.provider:<13} {r.step_ms:>9.1f} {speed:>8} {r.fwd_bwd_ms:>11.1f} "
            f"{config.batch / r.step_ms * 1e3:>10.0f} {r.peak_bytes / mib:>9.0f} {peak:>9} "
            f"{r.step_bytes / mib:>9.0f} {step:>9}"
        )
    lines.append("")
    lines.append(
        f"one encoder GEMM [{config.batch}x{config.d_in}]x[{config.d_in}x{config.n_latents}]: {gemm_ms:.1f} ms"
    )
    for r in results:
        lines.append(f"  {r.provider:<13} forward+backward = {r.fwd_bwd_ms / gemm_ms:.2f}x that GEMM")
    return "\n".join(lines)


def run_benchmark(config: BenchConfig, providers: tuple[str, ...] = PROVIDERS) -> dict[str, Any]:
    """Measures every provider (each in its own subprocess) and the encoder GEMM."""
    for name in providers:
        if name not in PROVIDERS:
            raise ValueError(f"providers: expected names from {', '.join(PROVIDERS)}, got {name!r}")
    results = [run_provider_subprocess(name, config) for name in providers]
    if config.threads:
        torch.set_num_threads(config.threads)
    gemm_ms = measure_encoder_gemm(config)
    env = environment()
    return {
        "config": asdict(config),
        "environment": env,
        "encoder_gemm_ms": gemm_ms,
        "results": [asdict(r) for r in results],
        "report": format_report(config, results, gemm_ms, env),
    }


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="internal: measure one provider and print JSON")
    parser.add_argument("provider", choices=PROVIDERS)
    parser.add_argument("config", help="BenchConfig as JSON")
    args = parser.parse_args(argv)
    result = measure_provider(args.provider, BenchConfig(**json.loads(args.config)))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _worker_main(sys.argv[1:])
