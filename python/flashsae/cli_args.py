"""The argparse pieces the ``flashsae`` subcommands share: a subcommand parser whose description
keeps its line breaks, one flag per field of a config dataclass (its docstring as help), the one size
parser of every command (:func:`parse_count`: ``--n-latents 16M`` in train as in plan; :func:`parse_bytes`),
the namespace back as config keywords, and the one-line error exit.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import re
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

#: Fixed choices of string fields (validated again by the config classes).
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "model_dtype": ("auto", "float32", "bfloat16", "float16"),
    "cache_dtype": ("auto", "float32", "bfloat16", "float16"),
    "autocast": ("auto", "bf16", "off"),
    "precision": ("auto", "exact", "certified", "fast"),
    "b_dec_init": ("geometric_median", "mean", "zeros"),
    "optimizer": ("adam", "sparse_adam"),
}

#: Config fields that are sizes: their flags take parse_count's forms (16M, 2^24, 32k, 16_777_216).
COUNT_FIELDS = frozenset(
    {"n_latents", "k", "train_tokens", "batch_size", "buffer_tokens", "eval_tokens", "dead_tokens"}
    | {"cache_tokens", "shard_tokens", "checkpoint_every", "log_every", "ctx_len", "max_tokens"}
)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BYTE_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_count(text: str | int) -> int:
    """A size: a plain integer ("16777216", "16_777_216"), a power of two ("2^24") or a number with a
    binary suffix as SAE widths are quoted ("16M" = 16 x 2^20, "32k" = 32768, "1.5M")."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    value = str(text).strip().replace("_", "").replace(",", "")
    power = re.fullmatch(r"(\d+)\^(\d+)", value)
    if power:
        return int(power.group(1)) ** int(power.group(2))
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)(?:i)?", value)
    if not found:
        raise ValueError(f"expected an integer, 2^N or a number with k/M/G (powers of 1024), got {text!r}")
    number = float(found.group(1)) * _UNITS[found.group(2).lower()]
    if number != int(number):
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)


def parse_bytes(text: str | int) -> int:
    """A memory size: bytes, or with a unit: "141GB" (10^9), "139GiB" (2^30), "80 GiB"."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = found.group(2).lower() if found else None
    if not found or unit not in _BYTE_UNITS | {"": 1}:
        raise ValueError(f"expected a memory size such as 141GB or 139GiB, got {text!r}")
    return int(float(found.group(1)) * (_BYTE_UNITS.get(unit, 1)))


def count_flag(optional: bool = False) -> Any:
    """An argparse ``type`` for a size (parse_count's forms; "none" too when `optional`)."""

    def parse(text: str) -> int | None:
        if optional and text.lower() == "none":
            return None
        try:
            return parse_count(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = "count"
    return parse


def add_subcommand(subparsers: Any, name: str, *, help: str, description: str | None, **options: Any) -> Any:
    """``subparsers.add_parser(name, ...)`` with the description printed as written."""
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **options
    )


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a dataclass and its bases (the string literal written under
    each field), one line each, for the CLI's help."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for statement, following in itertools.pairwise(body):
            documented = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            if isinstance(statement, ast.AnnAssign) and documented and isinstance(following.value.value, str):
                docs[statement.target.id] = " ".join(following.value.value.split())  # type: ignore[union-attr]
    return docs


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


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per dataclass field (help = the field's docstring). Defaults are suppressed so that
    the parsed namespace holds only the flags actually given."""
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
        elif base is int and f.name in COUNT_FIELDS:
            parser.add_argument(flag, type=count_flag(optional), metavar=f.name.upper(), help=help_text)
        else:
            kind = _optional(base) if optional else base
            parser.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=help_text)


def add_verify_flag(parser: argparse.ArgumentParser) -> None:
    """--verify / --no-verify: check each checkpoint against the sha256 recorded with it (default)."""
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check every checkpoint's weights against the sha256 written with them; --no-verify skips the "
        "hashing (about 2 s per GiB on a shared 2-core CPU) and loads a file whose bytes changed (default: verify)",
    )


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given (add_config_flags suppresses defaults) as config keywords."""
    given = {key: value for key, value in vars(args).items() if key != "command"}
    if "sae_options" in given:
        given["sae_options"] = dict(given["sae_options"])
    return given


def fail(command: str, exc: BaseException) -> int:
    """Prints ``flashsae <command>: error: <exc>`` to stderr; the exit status of a usage error."""
    print(f"flashsae {command}: error: {exc}", file=sys.stderr)
    return 2
