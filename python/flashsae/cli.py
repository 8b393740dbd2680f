"""The ``flashsae`` command line.

    flashsae train [--model ... --hookpoints ... --dataset ... --out DIR ...]   (no flags: the demo)
    flashsae cache --out DIR [--model ... --hookpoints ... --dataset ...]
    flashsae bench [--d-in 768 --n-latents 24576 --k 32 --batch 1024 ...]
    flashsae convert SRC DST --to {native,saelens,sparsify}
    flashsae eval RUN_DIR | SAE_DIR [--n-tokens ...]
    flashsae report RUN_DIR
    flashsae plan --d 4096 --n 16M --k 64 --batch 8192 [--gpu h200]

``train`` trains one SAE per hookpoint on a transformers model's activations (or on a cache written
by ``cache``); every field of :class:`flashsae.train.TrainConfig` is a flag.

``bench`` times one TopK SAE training step (forward, backward, Adam) of flashsae against the dense
PyTorch baseline (and a sparsify-style eager one) at a size that fits a 2-core CPU by default, and
prints speed and peak memory of each as ratios to the dense baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import benchmarking
from .cli_args import add_config_flags, add_subcommand, config_kwargs, fail
from .eval.cli import add_eval_parser, add_report_parser, run_eval, run_report
from .io.convert import add_convert_parser, run_convert
from .plan import add_plan_parser, run_plan
from .train import CacheConfig, TrainConfig, Trainer, resume_config, write_cache
from .train import config as train_config


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


def _run_bench(args: argparse.Namespace) -> int:
    if args.report:
        from .bench_report import main as report_main

        return report_main([*map(str, args.report), "--out", str(args.report_dir)])
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


# ------------------------------------------------------------------------------ train and cache

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def _add_train_parser(subparsers) -> None:
    train = add_subcommand(
        subparsers,
        "train",
        help="train SAEs on a transformers model's activations (no flags: the offline demo)",
        description=train_config.__doc__,
        argument_default=argparse.SUPPRESS,
    )
    add_config_flags(train, TrainConfig)


def _add_cache_parser(subparsers) -> None:
    cache = subparsers.add_parser(
        "cache",
        help="run a model once and store its activations as safetensors shards",
        description="Writes manifest.json and one folder of safetensors shards per hookpoint; "
        "train from it with flashsae train --activations DIR.",
        argument_default=argparse.SUPPRESS,
    )
    add_config_flags(cache, CacheConfig)


def _run_train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    kwargs = config_kwargs(args)
    try:
        if kwargs.get("resume"):
            overrides = {key: value for key, value in kwargs.items() if key not in ("resume", "out")}
            # the run's own settings, plus the flags given now (TrainConfig refuses a resume without --out)
            config = resume_config(kwargs["out"], **overrides) if "out" in kwargs else TrainConfig(**kwargs)
        else:
            config = TrainConfig(**kwargs)
        trainer = Trainer(config)
        print(
            f"flashsae train: {trainer.source_info['model']} -> {', '.join(trainer.hookpoints)} "
            f"({', '.join(f'{type(s).__name__} {s.d_in}x{s.n_latents}' for s in trainer.saes.values())}), "
            f"{config.train_tokens:,} tokens, run dir {trainer.run_dir}",
            flush=True,
        )
        result = trainer.train()
    except (ValueError, TypeError, OSError, ImportError, ArithmeticError) as exc:
        return fail("train", exc)
    wall = time.perf_counter() - started
    print(
        f"trained {result.tokens:,} tokens in {result.step:,} steps "
        f"({result.elapsed_s:.1f} s training, {wall:.1f} s in all)"
    )
    for name, figures in result.metrics.items():
        if "explained_variance" in figures:
            print(
                f"{name}: explained variance {figures['explained_variance']:.3f}, L0 {figures['l0']:.1f}, "
                f"dead {figures['dead_pct']:.1f}% (on the next {config.eval_tokens:,} tokens of the stream)"
            )
    for name, path in result.sae_paths.items():
        print(f"saved {name}: {path}  (flashsae.load({str(path)!r}))")
    print(f"checkpoint: {result.run_dir / 'checkpoint'}; metrics: {result.run_dir / 'metrics.jsonl'}")
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: flashsae train --out {result.run_dir} --resume")
        return EXIT_INTERRUPTED
    return 0


def _run_cache(args: argparse.Namespace) -> int:
    try:
        config = CacheConfig(**config_kwargs(args))
        manifest = write_cache(config)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        return fail("cache", exc)
    widths = ", ".join(f"{name} (d={info['d']})" for name, info in manifest["hookpoints"].items())
    shards = len(manifest["shards"])
    print(f"cached {manifest['tokens']:,} tokens of {widths} in {shards} shard(s) of {manifest['dtype']}")
    print(f"manifest: {Path(config.out) / 'manifest.json'}")
    return 0


#: subcommand -> (adds its parser to the subparsers, runs it and returns the exit code)
COMMANDS: dict[str, tuple[Any, Any]] = {
    "train": (_add_train_parser, _run_train),
    "cache": (_add_cache_parser, _run_cache),
    "bench": (_add_bench_parser, _run_bench),
    "convert": (add_convert_parser, run_convert),
    "eval": (add_eval_parser, run_eval),
    "report": (add_report_parser, run_report),
    "plan": (add_plan_parser, run_plan),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashsae", description="Fast, memory-lean sparse autoencoders.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(subparsers)
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
