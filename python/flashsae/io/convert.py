"""``flashsae convert SRC DST --to FORMAT``: rewrites an SAE (or every SAE of a multi-hookpoint
directory) in another format.

    flashsae convert gemma-scope/layer_12 out/layer_12 --to native
    flashsae convert sparsify_run/ out_run/ --to saelens          # one output folder per hookpoint
    flashsae convert org/repo out/ --subfolder layers.3 --to sparsify

SRC is any path ``flashsae.load`` reads (format detected unless ``--from`` is given; a Hub id needs
huggingface_hub). A SRC directory holding SAE subdirectories (a sparsify or flashsae training run) is
converted folder by folder into DST/<name>. Writes are atomic per SAE; what the target format cannot
express stops the conversion with an error naming the field. The command is registered by
``flashsae.cli`` through :func:`add_convert_parser` and :func:`run_convert`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_args import add_subcommand, add_verify_flag
from . import api
from ._common import DTYPES, FormatError


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``convert`` subcommand to an argparse subparsers object (``parser.add_subparsers()``)."""
    parser = add_subcommand(
        subparsers,
        "convert",
        help="convert an SAE between native, SAELens, sparsify, dictionary_learning, OpenAI and lm-saes formats",
        description=__doc__,
    )
    parser.add_argument("src", help="SAE directory or file, multi-hookpoint directory, or Hub id org/repo")
    parser.add_argument("dst", type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--to", required=True, choices=api.SAVE_FORMATS, help="format to write")
    parser.add_argument(
        "--from", dest="source_format", choices=api.FORMATS, default=None, help="format of SRC (default: detected)"
    )
    parser.add_argument("--subfolder", default=None, help="one SAE of a multi-hookpoint SRC (or a Hub repo folder)")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: keep the source dtype)"
    )
    add_verify_flag(parser)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Runs ``convert`` for parsed arguments; 0 on success, 2 (with a message on stderr) on an error."""
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        source = api.resolve(args.src, args.subfolder)
        if source.is_dir() and args.subfolder is None and _is_multi(source, args.source_format):
            saes = api.load_many(source, format=args.source_format, dtype=dtype, verify=args.verify)
            for name, sae in saes.items():
                api.save(sae, args.dst / name, format=args.to)
                print(f"{source / name} -> {args.dst / name} ({sae.architecture}, {args.to})")
            return 0
        sae = api.load(source, format=args.source_format, dtype=dtype, verify=args.verify)
        api.save(sae, args.dst, format=args.to)
        print(f"{source} -> {args.dst} ({sae.architecture}, {args.to})")
        return 0
    except (FormatError, ValueError, OSError, ImportError) as exc:
        print(f"flashsae convert: error: {exc}", file=sys.stderr)
        return 2


def _is_multi(path: Path, source_format: str | None) -> bool:
    """A directory that holds no SAE itself but SAE subdirectories."""
    try:
        api.detect_format(path)
        return False
    except (FormatError, FileNotFoundError):
        return bool(api.sae_subdirectories(path)) and source_format not in ("openai",)


def main(argv: list[str] | None = None) -> int:
    """A standalone entry point (``python -m flashsae.io.convert SRC DST --to FORMAT``)."""
    parser = argparse.ArgumentParser(prog="flashsae")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
