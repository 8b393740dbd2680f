"""``flashsae bench``: the training-step comparison of TopK SAEs (flashsae.bench.train_step) or, with
``--architecture clt``, of cross-layer transcoders (flashsae.bench.clt_step); with ``--report`` the
markdown + plots of the pytest benchmark suites (flashsae.bench.report)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from ..cli_args import count_flag
from . import clt_step, train_step
from .clt_step import CLTBenchConfig
from .train_step import BenchConfig

_INT_FIELDS = {"n_layers", "d_in", "n_latents", "k", "batch", "steps", "repeats", "threads", "seed"}
#: The sizes among them: 24k, 2^15 as in flashsae train and plan (cli_args.parse_count).
_SIZE_FIELDS = {"d_in", "n_latents", "k", "batch"}
_CHOICES = {
    "dtype": list(train_step.DTYPES),
    "optimizer": list(train_step.OPTIMIZERS),
    "device": ["cpu", "cuda"],
    "precision": list(clt_step.TOPK_PRECISIONS),
}
#: --architecture -> (config class, module with PROVIDERS and run_benchmark).
ARCHITECTURES = {"topk": (BenchConfig, train_step), "clt": (CLTBenchConfig, clt_step)}


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="time a training step (TopK SAE, or --architecture clt): flashsae vs dense PyTorch baselines",
        description=f"{train_step.__doc__}\n--architecture clt:\n\n{clt_step.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--architecture",
        choices=list(ARCHITECTURES),
        default="topk",
        help="topk: a TopK SAE step; clt: a cross-layer transcoder step (default: topk)",
    )
    # every setting of either benchmark; a flag left out takes the architecture's default
    defaults = {name: (config_class(), {f.name for f in fields(config_class)}) for name, (config_class, _) in
                ARCHITECTURES.items()}  # fmt: skip
    seen = []
    for config_class, _ in ARCHITECTURES.values():
        for f in fields(config_class):
            if f.name not in seen:
                seen.append(f.name)
    for name in seen:
        shown = [f"{arch}: {getattr(config, name)}" for arch, (config, names) in defaults.items() if name in names]
        bench.add_argument(
            "--" + name.replace("_", "-"),
            type=(count_flag() if name in _SIZE_FIELDS else int) if name in _INT_FIELDS else str,
            default=None,
            choices=_CHOICES.get(name),
            help=f"(default: {'; '.join(shown)})",
        )
    bench.add_argument("--providers", default=None, help="comma-separated subset of the architecture's providers "
                       f"(topk: {','.join(train_step.PROVIDERS)}; clt: {','.join(clt_step.PROVIDERS)}; default: all)")  # fmt: skip
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


def _config(args: argparse.Namespace):
    """(config, benchmark module) of --architecture from the flags given (ValueError names a flag
    the architecture has no setting for)."""
    config_class, module = ARCHITECTURES[args.architecture]
    names = {f.name for f in fields(config_class)}
    for other, _ in ARCHITECTURES.values():
        for f in fields(other):
            if f.name not in names and getattr(args, f.name, None) is not None:
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{f.name}: {flag} is not a setting of --architecture {args.architecture}")
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return config_class(**given), module


def run_bench(args: argparse.Namespace) -> int:
    if args.report:
        from .report import main as report_main

        return report_main([*map(str, args.report), "--out", str(args.report_dir)])
    try:
        config, module = _config(args)
        names = ",".join(module.PROVIDERS) if args.providers is None else args.providers
        providers = tuple(p.strip() for p in names.split(",") if p.strip())
        outcome = module.run_benchmark(config, providers, progress=sys.stderr)
    except ValueError as exc:
        print(f"flashsae bench: error: {exc}", file=sys.stderr)
        return 2
    print(outcome["report"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(outcome, indent=2) + "\n")
        print(f"\nraw results: {args.json}")
    return 0
