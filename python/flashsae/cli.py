"""The ``flashsae`` command line.

    flashsae bench [--d-in 768 --n-latents 24576 --k 32 --batch 1024 ...]

``bench`` times one TopK SAE training step (forward, backward, Adam) of flashsae against the dense
PyTorch baseline (and a sparsify-style eager one) at a size that fits a 2-core CPU by default, and
prints speed and peak memory of each as ratios to the dense baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from . import benchmarking


def _add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="time a TopK SAE training step: flashsae vs dense PyTorch",
        description=benchmarking.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = benchmarking.BenchConfig()
    for f in fields(benchmarking.BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = int if f.name in {"d_in", "n_latents", "k", "batch", "steps", "threads", "seed"} else str
        choices = {
            "dtype": list(benchmarking.DTYPES),
            "optimizer": list(benchmarking.OPTIMIZERS),
            "device": ["cpu", "cuda"],
        }.get(f.name)
        bench.add_argument(flag, type=kind, default=default, choices=choices, help=f"(default: {default})")
    bench.add_argument(
        "--providers",
        default=",".join(benchmarking.PROVIDERS),
        help=f"comma-separated subset of {','.join(benchmarking.PROVIDERS)} (default: all)",
    )
    bench.add_argument("--json", type=Path, default=None, help="also write the raw results to this JSON file")


def _run_bench(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(benchmarking.BenchConfig)}
    try:
        config = benchmarking.BenchConfig(**{name: getattr(args, name) for name in names})
        providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        outcome = benchmarking.run_benchmark(config, providers)
    except ValueError as exc:
        print(f"flashsae bench: error: {exc}", file=sys.stderr)
        return 2
    print(outcome["report"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(outcome, indent=2) + "\n")
        print(f"\nraw results: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashsae", description="Fast, memory-lean sparse autoencoders.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_bench_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _run_bench(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
