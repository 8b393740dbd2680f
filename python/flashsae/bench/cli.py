"""``flashsae bench``: the training-step comparison (flashsae.bench.train_step), or with ``--report``
the markdown + plots of the pytest benchmark suites (flashsae.bench.report)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from ..cli_args import count_flag
from . import train_step
from .train_step import BenchConfig

_INT_FIELDS = {"d_in", "n_latents", "k", "batch", "steps", "repeats", "threads", "seed"}
#: The sizes among them: 24k, 2^15 as in flashsae train and plan (cli_args.parse_count).
_SIZE_FIELDS = {"d_in", "n_latents", "k", "batch"}
_CHOICES = {"dtype": list(train_step.DTYPES), "optimizer": list(train_step.OPTIMIZERS), "device": ["cpu", "cuda"]}


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="time a TopK SAE training step: flashsae vs dense PyTorch and sparsify-style eager PyTorch",
        description=train_step.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = BenchConfig()
    for f in fields(BenchConfig):
        default = getattr(defaults, f.name)
        bench.add_argument(
            "--" + f.name.replace("_", "-"),
            type=(count_flag() if f.name in _SIZE_FIELDS else int) if f.name in _INT_FIELDS else str,
            default=default,
            choices=_CHOICES.get(f.name),
            help=f"(default: {default})",
        )
    names = ",".join(train_step.PROVIDERS)
    bench.add_argument("--providers", default=names, help=f"comma-separated subset of {names} (default: all)")
    bench.add_argument("--json", type=Path, default=None, help="also write the raw results to this JSON file")
    bench.add_argument(
        "--report",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="instead of measuring: turn pytest-benchmark JSON files (pytest benchmarks/ --benchmark-only "
        "--benchmark-json=FILE) into a markdown table and PNG plots in --report-dir",
    )
    bench.add_argument("--report-dir", type=Path, default=Path("benchmark-report"), help="(default: benchmark-report)")


def run_bench(args: argparse.Namespace) -> int:
    if args.report:
        from .report import main as report_main

        return report_main([*map(str, args.report), "--out", str(args.report_dir)])
    try:
        config = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
        providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        outcome = train_step.run_benchmark(config, providers, progress=sys.stderr)
    except ValueError as exc:
        print(f"flashsae bench: error: {exc}", file=sys.stderr)
        return 2
    print(outcome["report"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(outcome, indent=2) + "\n")
        print(f"\nraw results: {args.json}")
    return 0
