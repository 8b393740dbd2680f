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
PyTorch baseline and a sparsify-style eager one at a size that fits a 2-core CPU by default, each
provider over several fresh-process runs, and prints speed (median, min-max) and peak memory of each
as ratios to both baselines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .bench.cli import add_bench_parser, run_bench
from .eval.cli import add_eval_parser, add_report_parser, run_eval, run_report
from .io.convert import add_convert_parser, run_convert
from .plan import add_plan_parser, run_plan


# ------------------------------------------------------------------------------ train and cache

#: Fixed choices of string fields (validated again by the config classes).
_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "model_dtype": ("auto", "float32", "bfloat16", "float16"),
    "cache_dtype": ("auto", "float32", "bfloat16", "float16"),
    "autocast": ("auto", "bf16", "off"),
    "precision": ("auto", "exact", "certified", "fast"),
    "b_dec_init": ("geometric_median", "mean", "zeros"),
    "optimizer": ("adam", "sparse_adam"),
}
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per dataclass field (help = the field's docstring). Defaults are suppressed so that
    the parsed namespace holds only the flags actually given."""
    from .train import field_docs

    docs = field_docs(config_class)
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
        origin = typing.get_origin(base)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif origin is list:
            parser.add_argument(flag, nargs="+", metavar=f.name.upper().removesuffix("S"), help=help_text)
        elif origin is dict:
            option_flag = flag.removesuffix("s")
            parser.add_argument(
                option_flag, dest=f.name, action="append", type=_option, metavar="NAME=VALUE", help=help_text
            )
        else:
            kind = _optional(base) if optional else base
            parser.add_argument(flag, type=kind, choices=_CHOICES.get(f.name), help=help_text)


def _config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    given = {key: value for key, value in vars(args).items() if key != "command"}
    if "sae_options" in given:
        given["sae_options"] = dict(given["sae_options"])
    return given


def _add_train_parser(subparsers) -> None:
    from .train import TrainConfig, config

    train = subparsers.add_parser(
        "train",
        help="train SAEs on a transformers model's activations (no flags: the offline demo)",
        description=config.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    _add_config_flags(train, TrainConfig)


def _add_cache_parser(subparsers) -> None:
    from .train import CacheConfig

    cache = subparsers.add_parser(
        "cache",
        help="run a model once and store its activations as safetensors shards",
        description="Writes manifest.json and one folder of safetensors shards per hookpoint; "
        "train from it with flashsae train --activations DIR.",
        argument_default=argparse.SUPPRESS,
    )
    _add_config_flags(cache, CacheConfig)


def _fail(command: str, exc: BaseException) -> int:
    print(f"flashsae {command}: error: {exc}", file=sys.stderr)
    return 2


def _run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, Trainer, resume_config

    started = time.perf_counter()
    kwargs = _config_kwargs(args)
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
        return _fail("train", exc)
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
    from .train import CacheConfig, write_cache

    try:
        config = CacheConfig(**_config_kwargs(args))
        manifest = write_cache(config)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        return _fail("cache", exc)
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
