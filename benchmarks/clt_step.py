"""One training step of a cross-layer transcoder: flashsae's CrossLayerTranscoder against a dense
PyTorch CLT of the same math, time and step memory measured in one invocation.

    python benchmarks/clt_step.py                       # L=6, d=384, n=8192/layer, k=32, B=1024, fp32, CPU
    python benchmarks/clt_step.py --out benchmarks/results/<dir>   # also writes clt_step.json + .md

Providers (same initial weights, same batch, same loss: the mean over layers of each layer's FVU):

- ``dense``: what a plain PyTorch CLT does: per layer the [B, n] pre-activations (one GEMM), relu,
  torch.topk, the dense latents scattered into [B, n], then one dense GEMM per layer against its
  [n, (L - i) * d] decoder; torch.optim.Adam (fused: one kernel per tensor, no [n, d] temporaries).
- ``flashsae``: :class:`flashsae.CrossLayerTranscoder` (topk_encode per layer, one sparse_decode per
  layer to all later layers) with :class:`flashsae.optim.SparseAdam` (row-sparse gradients: no [n, d]
  gradient tensor), as ``flashsae train --optimizer sparse_adam`` runs it.

A step is forward, backward, optimizer step and zero_grad(set_to_none=True). Each provider runs in a
fresh subprocess, so its memory is its own: ``step`` memory is the peak resident set during the timed
steps minus the resident set after the warm-up steps (weights and optimizer state resident), as in
flashsae.bench.train_step. Runs alternate between providers so that a slow phase of a shared machine
hits both; the report gives medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

PROVIDERS = ("dense", "flashsae")
WARMUP_STEPS = 2


@dataclass
class Config:
    n_layers: int = 6
    d: int = 384
    n_latents: int = 8192
    k: int = 32
    batch: int = 1024
    steps: int = 4
    repeats: int = 2
    threads: int | None = None
    seed: int = 0


class DenseCLT(nn.Module):
    """The same CLT written densely: [B, n] latents per layer and dense decoder GEMMs."""

    def __init__(self, n_layers: int, d: int, n: int, k: int) -> None:
        super().__init__()
        self.n_layers, self.d, self.n, self.k = n_layers, d, n, k
        for i in range(n_layers):
            self.register_parameter(f"W_enc_{i}", nn.Parameter(torch.empty(n, d)))
            self.register_parameter(f"b_enc_{i}", nn.Parameter(torch.zeros(n)))
            self.register_parameter(f"W_dec_{i}", nn.Parameter(torch.empty(n, (n_layers - i) * d)))
            self.register_parameter(f"b_dec_{i}", nn.Parameter(torch.zeros(d)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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


def build(provider: str, config: Config):
    """(model, optimizer, step function) with seeded weights shared by both providers."""
    import flashsae
    from flashsae.optim import SparseAdam

    L, d, n, k = config.n_layers, config.d, config.n_latents, config.k
    torch.manual_seed(config.seed)
    clt = flashsae.create("clt", n_layers=L, d_in=d, n_latents=n, k=k)
    with torch.no_grad():  # decoders start at 0 in flashsae: give them values so every gradient flows
        for W in clt.decoder_matrices():
            W.normal_(0, d**-0.5)
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(config.batch, L, d, generator=generator)
    y = torch.randn(config.batch, L, d, generator=generator)
    if provider == "flashsae":
        optimizer = SparseAdam(clt.parameters(), lr=1e-4, update_in_backward=True)

        def loss() -> torch.Tensor:
            return clt(x, y).loss

        model = clt
    else:
        model = DenseCLT(L, d, n, k)
        model.load_state_dict(clt.state_dict())
        del clt
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

        def loss() -> torch.Tensor:
            return model(x, y)

    def step() -> float:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(value)

    return model, optimizer, step


def measure(provider: str, config: Config) -> dict:
    """One run of one provider in this process."""
    from flashsae.bench.memory import PeakMemory

    if config.threads:
        torch.set_num_threads(config.threads)
    memory = PeakMemory("cpu")
    _, _, step = build(provider, config)
    losses = [step() for _ in range(WARMUP_STEPS)]
    resident = memory.current()
    memory.reset()
    times = []
    for _ in range(config.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append((time.perf_counter() - start) * 1000)
    return {
        "provider": provider,
        "step_ms": statistics.median(times),
        "step_times_ms": times,
        "step_bytes": max(0, memory.peak() - resident),
        "resident_bytes": resident,
        "losses": losses,
    }


def run_subprocess(provider: str, config: Config) -> dict:
    command = [sys.executable, __file__, "--worker", provider, json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{provider} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(config: Config, runs: list[dict]) -> dict:
    from flashsae.bench.environment import environment

    by = {p: [r for r in runs if r["provider"] == p] for p in PROVIDERS}
    summary = {
        p: {
            "step_ms": statistics.median(r["step_ms"] for r in rs),
            "step_ms_range": [min(r["step_ms"] for r in rs), max(r["step_ms"] for r in rs)],
            "step_bytes": int(statistics.median(r["step_bytes"] for r in rs)),
            "resident_bytes": int(statistics.median(r["resident_bytes"] for r in rs)),
            "first_loss": rs[0]["losses"][0],
        }
        for p, rs in by.items()
    }
    dense, ours = summary["dense"], summary["flashsae"]
    import flashsae

    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "flashsae": flashsae.__version__,
        "config": asdict(config),
        "environment": environment(),
        "providers": summary,
        "speedup": dense["step_ms"] / ours["step_ms"],
        "step_memory_ratio": ours["step_bytes"] / max(dense["step_bytes"], 1),
        "runs": runs,
    }


def markdown(result: dict) -> str:
    from flashsae.bench.environment import describe

    c, p = result["config"], result["providers"]
    lines = [
        f"# CLT training step, CPU float32 ({result['date']})",
        "",
        f"L = {c['n_layers']}, d = {c['d']}, n = {c['n_latents']} per layer, k = {c['k']}, B = {c['batch']}; "
        f"{c['steps']} timed steps after {WARMUP_STEPS} warm-up, {c['repeats']} runs per provider (fresh processes, "
        "alternating). Command: `python benchmarks/clt_step.py --out <dir>`.",
        "",
        f"Machine: {describe(result['environment'])}; flashsae {result.get('flashsae', '?')}.",
        "",
        "| provider | step (ms, median) | range over runs | step memory | resident (weights + optimizer) |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for name in PROVIDERS:
        r = p[name]
        lo, hi = r["step_ms_range"]
        lines.append(
            f"| {name} | {r['step_ms']:.0f} | {lo:.0f}-{hi:.0f} | {r['step_bytes'] / 2**20:.0f} MiB | "
            f"{r['resident_bytes'] / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        f"flashsae is **{result['speedup']:.2f}x** the dense CLT's speed with **{result['step_memory_ratio']:.2f}x** "
        "its step memory.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("PROVIDER", "CONFIG"), help=argparse.SUPPRESS)
    for field, default in asdict(Config()).items():
        kind = int if field != "threads" else (lambda s: int(s))
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--out", type=Path, help="directory for clt_step.json and clt_step.md")
    parser.add_argument("--markdown-from", type=Path, help=argparse.SUPPRESS)  # re-render a saved clt_step.json
    args = parser.parse_args(argv)
    if args.markdown_from:
        result = json.loads(args.markdown_from.read_text())
        args.markdown_from.with_suffix(".md").write_text(markdown(result))
        return
    if args.worker:
        provider, payload = args.worker
        print(json.dumps(measure(provider, Config(**json.loads(payload)))))
        return
    config = Config(**{f: getattr(args, f) for f in asdict(Config())})
    runs = []
    for repeat in range(config.repeats):
        for provider in PROVIDERS if repeat % 2 == 0 else reversed(PROVIDERS):
            run = run_subprocess(provider, config)
            print(f"{provider}: {run['step_ms']:.0f} ms, step memory {run['step_bytes'] / 2**20:.0f} MiB", flush=True)
            runs.append(run)
    result = summarize(config, runs)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "clt_step.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "clt_step.md").write_text(text)


if __name__ == "__main__":
    main()
