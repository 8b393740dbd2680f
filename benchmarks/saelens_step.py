"""SAELens' own training step, side by side: its TopK architecture ("topk") against the flashsae
kernels behind the same trainer ("flashsae_topk", flashsae.integrations.saelens).

Each step is SAELens' public ``SAETrainer.step`` (training_forward_pass, dead-latent bookkeeping,
backward, gradient clipping, Adam, scheduler), timed with ``time.perf_counter`` on one batch of
random activations; both architectures start from the same weights and see the same batches.
Repeats alternate the architectures (topk, flashsae_topk, topk, ...) so that a slow phase of a
shared machine hits both alike; the figure per architecture is the median step over all repeats.
Needs sae-lens (the `make test-integrations` venv has it):

    .venv-peers/bin/python benchmarks/saelens_step.py --out benchmarks/results/<date>-saelens-cpu
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ARCHITECTURES = ("topk", "flashsae_topk")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_trainer(architecture: str, args: argparse.Namespace, batches: int):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(
        {"architecture": architecture, "d_in": args.d_in, "d_sae": args.n_latents, "k": args.k, "dtype": "float32"}
    )
    config = SAETrainerConfig(
        total_training_samples=batches * args.batch, train_batch_size_samples=args.batch, lr=3e-4, lr_end=3e-4,
        dead_feature_window=args.dead_window,
    )  # fmt: skip
    return SAETrainer(config, sae, iter(()))


def time_steps(architecture: str, args: argparse.Namespace, data: list[torch.Tensor]) -> list[float]:
    trainer = make_trainer(architecture, args, len(data))
    times = []
    for index, batch in enumerate(data):
        start = time.perf_counter()
        trainer.step(batch)
        trainer.n_training_steps += 1
        elapsed = time.perf_counter() - start
        if index >= args.warmup:
            times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--n-latents", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dead-window",
        type=int,
        default=3,
        help="SAELens' dead_feature_window in steps: small, so the AuxK loss runs in the timed steps",
    )
    parser.add_argument("--out", type=Path, help="folder for saelens_step.json and saelens_step.md")
    args = parser.parse_args(argv)

    import flashsae.integrations.saelens as fs_saelens

    fs_saelens.register()
    load_before = os.getloadavg()[0]
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(args.batch, args.d_in, generator=generator) for _ in range(args.warmup + args.steps)]
    steps: dict[str, list[float]] = {name: [] for name in ARCHITECTURES}
    for repeat in range(args.repeats):
        for name in ARCHITECTURES:
            steps[name] += time_steps(name, args, data)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: median {statistics.median(steps[name]) * 1e3:.1f} ms",
                  file=sys.stderr)  # fmt: skip
    medians = {name: statistics.median(times) * 1e3 for name, times in steps.items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        # a shared machine's other work shows here: both architectures share it (interleaved repeats)
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "python": platform.python_version(),
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "sae-lens", "flashsae")},
        "shape": {"d_in": args.d_in, "n_latents": args.n_latents, "k": args.k, "batch": args.batch},
        "dead_feature_window": args.dead_window,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "step_ms": {name: [t * 1e3 for t in times] for name, times in steps.items()},
        "median_ms": medians,
        "speedup": medians["topk"] / medians["flashsae_topk"],
    }
    rows = [
        f"| {name} | {medians[name]:.1f} | {min(steps[name]) * 1e3:.1f}–{max(steps[name]) * 1e3:.1f} | "
        f"{args.batch / medians[name] * 1e3:.0f} | {medians['topk'] / medians[name]:.2f}x |"
        for name in ARCHITECTURES
    ]
    markdown = "\n".join([
        f"SAELens {result['versions']['sae-lens']} `SAETrainer.step`, d_in={args.d_in}, d_sae={args.n_latents}, "
        f"k={args.k}, batch={args.batch}, float32; {result['cpu']}, {result['threads']} threads, "
        f"torch {result['versions']['torch']}, {result['date']}. Median of {len(steps['topk'])} steps "
        f"({args.repeats} interleaved repeats of {args.steps}); 1-minute load average "
        f"{load_before:.1f} at the start, {result['load_average_1min']['end']:.1f} at the end.",
        "",
        "| architecture | step ms (median) | min–max | tokens/s | speedup |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])  # fmt: skip
    print(markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "saelens_step.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "saelens_step.md").write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
