"""The ``flashsae`` command line.

    flashsae train [--model ... --hookpoints ... --dataset ... --out DIR ...]   (no flags: the demo)
    flashsae cache --out DIR [--model ... --hookpoints ... --dataset ...]
    flashsae bench [--d-in 768 --n-latents 24576 --k 32 --batch 1024 ...] [--architecture clt --n-layers 6 ...]
    flashsae convert SRC DST --to {native,saelens,sparsify}
    flashsae eval RUN_DIR | SAE_DIR [--n-tokens ...]
    flashsae report RUN_DIR
    flashsae plan --d 4096 --n 16M --k 64 --batch 8192 [--gpu h200]

``train`` trains one SAE per hookpoint on a transformers model's activations (or on a cache written
by ``cache``); every field of :class:`flashsae.train.TrainConfig` is a flag.

``bench`` times one TopK SAE training step (forward, backward, Adam) of flashsae against the dense
PyTorch baseline and a sparsify-style eager one at a size that fits a 2-core CPU by default, each
provider over several fresh-process runs, and prints speed (median, min-max) and peak memory of each
as ratios to both baselines; ``--architecture clt`` does the same for a cross-layer transcoder step
against a dense PyTorch CLT.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .bench.cli import add_bench_parser, run_bench
from .cli_args import add_config_flags, add_subcommand, config_kwargs, fail
from .eval.cli import add_eval_parser, add_report_parser, run_eval, run_report
from .io.convert import add_convert_parser, run_convert
from .plan import add_plan_parser, run_plan
from .train import CacheConfig, TrainConfig, Trainer, resume_config, write_cache
from .train import config as train_config
from .train.signals import EXIT_INTERRUPTED, StopSignals


# ------------------------------------------------------------------------------ train and cache


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
    # Ctrl-C from here on: before training, abort with one line; then stop after a step and save;
    # a second one aborts at once (flashsae.train.signals)
    with StopSignals(abort_process=True):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
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
        models = " + ".join(str(trainer.source_info[key]) for key in ("model", "model_b") if key in trainer.source_info)
        print(
            f"flashsae train: {models} -> {', '.join(trainer.hookpoints)} "
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
    held_out = result.evaluation
    if held_out:
        print(f"measured on {held_out['tokens']:,} held-out tokens: the {held_out['split']} of {held_out['dataset']}")
    for name, figures in result.metrics.items():
        if "explained_variance" in figures:
            # a crosscoder's sites share its latents: their dead share is the crosscoder's, printed once
            dead = (
                f", dead {figures['dead_pct']:.1f}% (no firing in the last {trainer.dead_tokens:,} training tokens)"
                if "dead_pct" in figures
                else ""
            )
            print(
                f"{name}: explained variance {figures['explained_variance']:.3f}, L0 {figures['l0']:.1f} (held out)"
                + dead
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
    "bench": (add_bench_parser, run_bench),
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
