"""The ``flashsae eval`` and ``flashsae report`` subcommands (wired into flashsae.cli by
``add_eval_parser`` / ``run_eval`` and ``add_report_parser`` / ``run_report``).

    flashsae eval PATH [--n-tokens 32768 --dataset ... --part eval --json results.json]
    flashsae report RUN_DIR [--out report.html --top-latents 24 --latent-selection spread --examples 5]

PATH is an SAE folder (cfg.json + sae.safetensors) or a run directory of ``flashsae train`` (every
SAE in it is evaluated). Model, hookpoint, dataset, context length and special-token handling
default to what the SAE's metadata records (the trainer writes them); flags override them. Both
read the dataset's eval part by default: the documents the trainer held out (flashsae.train.split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli_args import add_subcommand, add_verify_flag, count_flag, fail
from ..model_loading import resolve_device
from ..modules import load
from ..train.sites import MULTI_SITE
from ..train.split import DEFAULT_EVAL_FRACTION, PARTS
from . import report
from .data import load_eval_model
from .downstream import DOWNSTREAM_KINDS
from .examples import LATENT_SELECTIONS
from .evaluate import EvalConfig, EvalResult, evaluate
from .report import REPORT_FILE, write_report
from .runs import sae_directories, source_settings
from .sites import trained_sites

DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="text to run the model on, as flashsae train takes it (default: the SAE's)")
    parser.add_argument(
        "--part",
        default="eval",
        choices=PARTS,
        help="documents of the dataset to read: eval (held out from training; default), train or all",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        help="share of documents in the eval part (default: the SAE's, as it was trained, else "
        f"{DEFAULT_EVAL_FRACTION})",
    )
    parser.add_argument("--device", default="auto", choices=DEVICES, help="(default: auto, cuda when available)")
    parser.add_argument(
        "--model-dtype", choices=MODEL_DTYPES, help="dtype of the model (default: the run's, else auto)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=EvalConfig.batch_size,
        help=f"contexts per forward (default: {EvalConfig.batch_size})",
    )
    parser.add_argument(
        "--downstream",
        default="auto",
        choices=DOWNSTREAM_KINDS,
        help="downstream metrics: causal_lm (CE recovered, KL), embedding (pooled cosine), none, or auto (default)",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    add_verify_flag(parser)


EVAL_DESCRIPTION = """Evaluates SAEs on a model's activations: MSE, explained variance, FVU, cosine similarity,
L0, L1, shrinkage, relative reconstruction bias, dead and dense latent fractions and the latent
density histogram; for causal LMs the clean, spliced and zero-ablation CE, CE loss recovered and KL;
for encoders the cosine of the pooled embedding (definitions: flashsae.eval.metrics and
flashsae.eval.downstream).

PATH is an SAE folder (cfg.json + sae.safetensors) or a run directory of flashsae train (every SAE
in it is evaluated). Model, hookpoint, dataset, context length and special-token handling default to
what the SAE's metadata records; the flags override them. The dataset's eval part is read by default:
the documents flashsae train held out (--part, --eval-fraction). A transcoder takes --hookpoint (its
input) and --target-hookpoint (what it predicts)."""


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``eval`` to a subparsers object (from ArgumentParser.add_subparsers)."""
    parser = add_subcommand(
        subparsers,
        "eval",
        help="evaluate SAEs: reconstruction, sparsity, density and downstream (CE loss recovered, KL) metrics",
        description=EVAL_DESCRIPTION,
    )
    parser.add_argument("path", help="an SAE folder or a flashsae train run directory")
    parser.add_argument("--model", help="transformers model name or directory (default: the SAE's)")
    parser.add_argument(
        "--hookpoint",
        nargs="+",
        help="module path the SAE reads (default: the SAE's); for a clt or a crosscoder its input sites "
        "(paths or globs; default: the --hookpoints it was trained with)",
    )
    parser.add_argument(
        "--target-hookpoint",
        nargs="+",
        help="for a transcoder: the module path it predicts; for a clt: its target sites (default: its --targets)",
    )
    parser.add_argument(
        "--n-tokens",
        type=count_flag(),
        default=EvalConfig.n_tokens,
        help=f"tokens to evaluate (default: {EvalConfig.n_tokens})",
    )
    parser.add_argument("--ctx-len", type=int, help="tokens per context (default: the SAE's, else 128)")
    parser.add_argument("--dataset-config", help="configuration name of a hub dataset")
    parser.add_argument("--dataset-split", help="split of a Hugging Face dataset (default: the SAE's, else train)")
    parser.add_argument("--text-field", help="field holding the text (default: the SAE's, else text)")
    parser.add_argument(
        "--exclude-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave special tokens out of metrics and splice (default: as in training, else yes)",
    )
    parser.add_argument(
        "--dense-threshold",
        type=float,
        default=EvalConfig.dense_threshold,
        help=f"firing frequency above which a latent counts as dense (default: {EvalConfig.dense_threshold})",
    )
    _add_source_flags(parser)
    parser.add_argument("--json", type=Path, help="also write the results (metrics, histogram) to this JSON file")
    return parser


def _pick(given: Any, recorded: dict[str, Any], key: str, default: Any = None) -> Any:
    return given if given is not None else recorded.get(key, default)


#: Columns of the per-layer table of a clt or a crosscoder: (metric, heading, percent).
SITE_COLUMNS = (
    ("explained_variance", "EV", False), ("fvu", "FVU", False), ("l0", "L0", False), ("cossim", "cos", False),
    ("dead_fraction", "dead", True), ("dense_fraction", "dense", True),
)  # fmt: skip


def _print_sites(result: EvalResult) -> None:
    """One row per layer (site): its input -> target and its metrics."""
    names = [
        f"{site.hookpoint} -> {site.target_hookpoint}" if site.target_hookpoint else site.hookpoint
        for site in result.sites
    ]
    label_width = max(len(label) for label in result.site_labels)
    name_width = max(len(name) for name in names)
    heading = "".join(f"{title:>9}" for _, title, _ in SITE_COLUMNS)
    print(f"  {'':<{label_width}}  {'sites':<{name_width}}{heading}")
    for label, name, site in zip(result.site_labels, names, result.sites, strict=True):
        cells = "".join(
            f"{100 * site.metrics[key]:>8.2f}%" if percent else f"{site.metrics[key]:>9.4g}"
            for key, _, percent in SITE_COLUMNS
        )
        print(f"  {label:<{label_width}}  {name:<{name_width}}{cells}")
    print(f"  whole {result.architecture} (reconstruction and sparsity: the mean over its {len(result.sites)} "
          "layers; downstream: all of them spliced at once):")  # fmt: skip


def _print_result(path: Path, result: EvalResult) -> None:
    if result.sites:
        layers = f"{len(result.sites)} layers"
        print(f"{path}: {result.architecture} over {layers}, {result.tokens:,} tokens of {result.data}")
        _print_sites(result)
    else:
        target = f" -> {result.target_hookpoint}" if result.target_hookpoint else ""
        print(f"{path}: {result.architecture} at {result.hookpoint}{target}, {result.tokens:,} tokens of {result.data}")
    width = max(len(name) for name in result.metrics)
    for name, value in result.metrics.items():
        shown = f"{100 * value:.2f}%" if name.endswith("_fraction") else f"{value:.6g}"
        print(f"  {name:<{width}}  {shown}")


def _sites_of(
    sae: Any, model: Any, hookpoint: list[str] | None, target: list[str] | None, recorded: str
) -> tuple[str | list[str], str | list[str] | None]:
    """(hookpoint, target_hookpoint) to evaluate: an SAE's one module each (the flags', else the
    recorded hookpoint); a clt's input and target sites or a crosscoder's sites: the flags', else
    what flashsae train paired (its --hookpoints and --targets, resolved on the model as it did)."""
    if sae.architecture not in MULTI_SITE:
        for name, value in (("--hookpoint", hookpoint), ("--target-hookpoint", target)):
            if value is not None and len(value) != 1:
                raise ValueError(f"{name}: a {sae.architecture} reads one module, got {len(value)}")
        return (hookpoint[0] if hookpoint else recorded), (target[0] if target else None)
    if hookpoint is None and target is None:
        return trained_sites(sae, model)
    if hookpoint is None:
        raise ValueError(f"--hookpoint: the {sae.architecture} records no sites (trained from a cache?); pass them")
    if sae.architecture == "clt" and target is None:
        raise ValueError("--target-hookpoint: pass the clt's target sites with its input sites")
    return hookpoint, target


def run_eval(args: argparse.Namespace) -> int:
    """Runs ``flashsae eval``; returns the exit status (2 on a user error, printed)."""
    try:
        paths = sae_directories(args.path)
        if len(paths) > 1 and (args.hookpoint or args.target_hookpoint):
            raise ValueError(
                f"--hookpoint: {args.path} holds {len(paths)} SAEs; name one SAE folder to set its hookpoint"
            )
        device = resolve_device(args.device)
        models: dict[tuple[str, str], tuple[Any, Any]] = {}
        results = []
        for path in paths:
            sae = load(path, device=device, verify=args.verify)
            recorded = source_settings(sae.metadata)
            model_name = _pick(args.model, recorded, "model")
            hookpoint = recorded.get("hookpoint")
            if model_name is None:
                raise ValueError(f"--model: the SAE in {path} records no model; pass --model")
            if hookpoint is None and args.hookpoint is None:
                raise ValueError(f"--hookpoint: the SAE in {path} records no hookpoint; pass --hookpoint")
            dtype = _pick(args.model_dtype, recorded, "model_dtype", "auto")
            if (model_name, dtype) not in models:
                models[(model_name, dtype)] = load_eval_model(
                    model_name,
                    device=device,
                    model_dtype=dtype,
                    head="none" if args.downstream in ("none", "embedding") else "auto",
                    trust_remote_code=bool(recorded.get("trust_remote_code", False)),
                )
            model, tokenizer = models[(model_name, dtype)]
            hookpoint, target = _sites_of(sae, model, args.hookpoint, args.target_hookpoint, hookpoint)
            result = evaluate(
                sae,
                model,
                hookpoint,
                _pick(args.dataset, recorded, "dataset", "pydoc"),
                args.n_tokens,
                tokenizer=tokenizer,
                target_hookpoint=target,
                ctx_len=int(_pick(args.ctx_len, recorded, "ctx_len", EvalConfig.ctx_len)),
                batch_size=args.batch_size,
                downstream=args.downstream,
                exclude_special_tokens=bool(
                    _pick(args.exclude_special_tokens, recorded, "exclude_special_tokens", True)
                ),
                dense_threshold=args.dense_threshold,
                text_field=_pick(args.text_field, recorded, "text_field", "text"),
                dataset_split=_pick(args.dataset_split, recorded, "dataset_split", "train"),
                dataset_config=_pick(args.dataset_config, recorded, "dataset_config"),
                part=args.part,
                eval_fraction=float(_pick(args.eval_fraction, recorded, "eval_fraction", DEFAULT_EVAL_FRACTION)),
                progress=args.progress,
            )
            _print_result(path, result)
            results.append({"path": str(path), **result.to_dict()})
    except (ValueError, TypeError, OSError, ImportError) as exc:
        return fail("eval", exc)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"saes": results}, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``report`` to a subparsers object."""
    parser = add_subcommand(
        subparsers,
        "report",
        help="write one self-contained HTML report of a training run (metrics, curves, top latents)",
        description=report.__doc__,
    )
    parser.add_argument("run_dir", help="a flashsae train run directory (or one SAE folder)")
    parser.add_argument("--out", type=Path, help=f"the HTML file to write (default: RUN_DIR/{REPORT_FILE})")
    parser.add_argument(
        "--n-tokens", type=count_flag(), default=16384, help="tokens evaluated for the report (default: 16384)"
    )
    parser.add_argument("--top-latents", type=int, default=24, help="latent cards per SAE (default: 24)")
    parser.add_argument(
        "--latent-selection",
        default="spread",
        choices=LATENT_SELECTIONS,
        help="which latents get cards: spread (a quarter the strongest, the rest spread over decade buckets of "
        "density; default) or busiest (the most frequently firing)",
    )
    parser.add_argument("--examples", type=int, default=5, help="top-activating contexts per latent (default: 5)")
    _add_source_flags(parser)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Runs ``flashsae report``; returns the exit status (2 on a user error, printed)."""
    try:
        path = write_report(
            args.run_dir,
            args.out,
            n_tokens=args.n_tokens,
            top_latents=args.top_latents,
            latent_selection=args.latent_selection,
            examples_per_latent=args.examples,
            dataset=args.dataset,
            part=args.part,
            eval_fraction=args.eval_fraction,
            device=args.device,
            model_dtype=args.model_dtype,
            batch_size=args.batch_size,
            downstream=args.downstream,
            progress=args.progress,
            verify=args.verify,
        )
    except (ValueError, TypeError, OSError, ImportError) as exc:
        return fail("report", exc)
    print(f"report: {path}")
    return 0


__all__ = ["add_eval_parser", "add_report_parser", "run_eval", "run_report"]
