"""Quality side by side: flashsae, SAELens and dictionary_learning SAEs trained on the same cached
activations with the same token budget at the same L0, all measured by one evaluator.

    flashsae cache --out CACHE                        # the demo's MiniLM layer 3 (train + eval parts)
    python benchmarks/quality.py --activations CACHE --peers-python /path/to/peers-venv/bin/python \
        --out benchmarks/results/DATE-cpu-2core-quality

The peers run in a separate venv (`pip install torch==2.13.0 sae-lens dictionary-learning`), never
as flashsae dependencies: benchmarks/quality_peers.py trains them there with their own trainers and
defaults. What is held equal:
- data: the cache's train part (the same shuffled rows, batches of 1024) for every library, and
  the token budget (--tokens, the demo's 262,144: 256 steps);
- sparsity: L0 = --target-l0 (32). The TopK family gets k = 32. flashsae's penalty architectures use
  their target-L0 controller (`flashsae train --target-l0`), dictionary_learning's JumpReLU its own
  target_l0; for the others (SAELens JumpReLU / ReLU / Gated, dictionary_learning ReLU / Gated) the
  sparsity coefficient is searched as a user would: train, measure L0 on the cache's eval rows, move
  the coefficient along the log-log secant, keep the run closest to the target (--max-trials runs);
- evaluation: every SAE is loaded with flashsae.load (its own format), saved natively with the
  cache's model / hookpoint / dataset, and measured by `flashsae eval` on the eval part (documents
  never trained on): explained variance, L0, dead fraction (no firing on those tokens) and the
  cosine of MiniLM's pooled embedding with the SAE spliced in.
Training time is the wall time and the CPU time of the training process (CPU time is the fairer
figure when other work shares the machine); each library uses its own default learning rate.
`--reuse-trained` keeps the runs already in --out (train.json present) and their evaluations (newer than
the run), so a table can be completed library by library. `--update` merges this run's rows into the
quality.json already in --out (a row of the same library and architecture is replaced, the others are
kept), so a few rows can be rerun after a change without retraining the peers; every row records the
date of the run that produced it and the table shows it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import flashsae

HERE = Path(__file__).resolve().parent
ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "gated")
LIBRARIES = ("flashsae", "saelens", "dictionary_learning")
PENALTY = ("jumprelu", "relu", "gated")
#: Where the coefficient search starts (the library's default coefficient) for the peers that
#: set sparsity only through a coefficient.
START_COEFFICIENT = {
    ("saelens", "jumprelu"): 1.0,
    ("saelens", "relu"): 1.0,
    ("saelens", "gated"): 1.0,
    ("dictionary_learning", "relu"): 0.1,
    ("dictionary_learning", "gated"): 0.1,
}
L0_TOLERANCE = 0.15  # the L0 bar of the training defaults: within 15% of the target


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Runs `command` with its output in `log`; returns (wall, CPU) seconds. A failure raises with
    the log's tail."""
    print("$", shlex.join(command), flush=True)
    cpu_before, wall_before = cpu_seconds_of_children(), time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=HERE.parent, check=False)
    wall, cpu = time.perf_counter() - wall_before, cpu_seconds_of_children() - cpu_before
    if status.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(command)} failed ({status.returncode}); {log}:\n{tail}")
    return wall, cpu


def eval_rows(cache: Path) -> torch.Tensor:
    """The cache's eval-part activations (never trained on): where the coefficient search reads L0."""
    from safetensors.torch import load_file

    manifest = json.loads((cache / "manifest.json").read_text())
    (hookpoint,) = manifest["hookpoints"]
    shards = manifest.get("eval_shards") or []
    if not shards:
        raise ValueError(f"--activations: {cache} has no eval part (written before the train / eval split?)")
    return torch.cat([load_file(str(cache / s["files"][hookpoint]["path"]))["activations"] for s in shards]).float()


@torch.no_grad()
def mean_l0(sae: Any, rows: torch.Tensor) -> float:
    sae.eval()
    active = 0
    for start in range(0, rows.shape[0], 4096):
        # padding slots of a variable-width encoding hold 0, so nonzero values are the active latents
        active += int((sae.encode(rows[start : start + 4096]).values != 0).sum())
    return active / rows.shape[0]


def saved_sae_path(library: str, run_dir: Path) -> Path:
    if library == "flashsae":
        (child,) = [p for p in run_dir.iterdir() if (p / "cfg.json").is_file()]
        return child
    record = json.loads((run_dir / "train.json").read_text())
    return run_dir / record.get("path", "sae")


def train_flashsae(args, architecture: str, run_dir: Path) -> dict[str, Any]:
    command = [str(Path(sys.executable).parent / "flashsae"), "train", "--activations", str(args.activations),
               "--architecture", architecture, "--target-l0", str(args.target_l0), "--train-tokens", str(args.tokens),
               "--n-latents", str(args.n_latents), "--out", str(run_dir), "--no-progress"]  # fmt: skip
    wall, cpu = run(command, run_dir.with_suffix(".log"))
    record = {"library": "flashsae", "architecture": architecture, "wall_seconds": wall, "cpu_seconds": cpu,
              "version": flashsae.__version__, "command": shlex.join(command)}  # fmt: skip
    (run_dir / "train.json").write_text(json.dumps(record, indent=2))
    return record


def train_peer(args, library: str, architecture: str, run_dir: Path, coefficient: float | None) -> dict[str, Any]:
    command = [args.peers_python, str(HERE / "quality_peers.py"), "--library", library, "--architecture",
               architecture, "--activations", str(args.activations), "--out", str(run_dir), "--tokens",
               str(args.tokens), "--n-latents", str(args.n_latents), "--k", str(args.target_l0)]  # fmt: skip
    if coefficient is not None:
        command += ["--coefficient", repr(coefficient)]
    wall, cpu = run(command, run_dir.with_suffix(".log"))
    record = json.loads((run_dir / "train.json").read_text())
    record |= {"wall_seconds": wall, "cpu_seconds": cpu, "command": shlex.join(command)}
    (run_dir / "train.json").write_text(json.dumps(record, indent=2))
    return record


def next_coefficient(trials: list[tuple[float, float]], target: float) -> float:
    """The next coefficient to try: on the log-log secant through the last two (coefficient, L0)
    trials; from one trial, L0 ∝ 1 / coefficient (a larger penalty, fewer active latents)."""
    (c1, l1), *_ = trials[-1:]
    if len(trials) == 1 or trials[-2][1] == l1 or trials[-2][0] == c1:
        slope = -1.0
    else:
        c0, l0 = trials[-2]
        slope = (math.log(l1) - math.log(l0)) / (math.log(c1) - math.log(c0))
        if not math.isfinite(slope) or slope >= -0.05:  # L0 should fall as the penalty grows
            slope = -1.0
    step = (math.log(target) - math.log(max(l1, 1e-3))) / slope
    return c1 * math.exp(max(-4.0, min(4.0, step)))  # at most e^4 ≈ 55x per trial


def train_one(args, library: str, architecture: str, rows: torch.Tensor) -> dict[str, Any]:
    run_dir = args.out / "runs" / f"{library}-{architecture}"
    if args.reuse_trained and (run_dir / "train.json").is_file():
        print(f"reusing {run_dir}", flush=True)
        return json.loads((run_dir / "train.json").read_text())
    if library == "flashsae":
        return train_flashsae(args, architecture, run_dir)
    if (library, architecture) not in START_COEFFICIENT:
        return train_peer(args, library, architecture, run_dir, None)
    # coefficient search: each trial a full run; the one closest to the target L0 (in log) is kept
    coefficient, trials, best = START_COEFFICIENT[library, architecture], [], None
    for trial in range(args.max_trials):
        trial_dir = run_dir.parent / f"{run_dir.name}-trial{trial}"
        record = train_peer(args, library, architecture, trial_dir, coefficient)
        l0 = mean_l0(flashsae.load(saved_sae_path(library, trial_dir)), rows)
        print(f"  {library} {architecture}: coefficient {coefficient:.4g} -> L0 {l0:.1f} on the eval rows", flush=True)
        trials.append((coefficient, max(l0, 1e-3)))
        distance = abs(math.log(max(l0, 1e-3) / args.target_l0))
        if best is None or distance < best[0]:
            best = (distance, trial_dir, record)
        if distance <= math.log(1 + L0_TOLERANCE):
            break
        coefficient = next_coefficient(trials, args.target_l0)
    _, trial_dir, record = best
    record["coefficient_search"] = [{"coefficient": c, "eval_l0": l} for c, l in trials]
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists; remove it or pass --reuse-trained")
    trial_dir.rename(run_dir)
    (run_dir / "train.json").write_text(json.dumps(record, indent=2))
    return record


def evaluate_one(args, library: str, architecture: str, manifest: dict[str, Any]) -> dict[str, Any]:
    run_dir = args.out / "runs" / f"{library}-{architecture}"
    result_file = args.out / "eval" / f"{library}-{architecture}.json"
    if args.reuse_trained and result_file.is_file() and (run_dir / "train.json").stat().st_mtime < result_file.stat().st_mtime:
        print(f"reusing {result_file}", flush=True)
        (result,) = json.loads(result_file.read_text())["saes"]
        return result["metrics"] | {"eval_tokens": result["tokens"], "loaded_as": result["architecture"]}
    sae = flashsae.load(saved_sae_path(library, run_dir))
    (hookpoint,) = manifest["hookpoints"]
    # what flashsae eval needs to rerun the model: the cache's source, as the trainer records it
    sae.metadata.update({key: manifest.get(key) for key in ("model", "dataset", "dataset_config", "dataset_split",
                         "eval_fraction", "ctx_len", "exclude_special_tokens")} | {"hookpoint": hookpoint})  # fmt: skip
    native = args.out / "eval" / f"{library}-{architecture}"
    sae.save(native)
    command = [str(Path(sys.executable).parent / "flashsae"), "eval", str(native), "--n-tokens", str(args.eval_tokens),
               "--json", str(result_file), "--no-progress"]  # fmt: skip
    run(command, args.out / "eval" / f"{library}-{architecture}.log")
    (result,) = json.loads(result_file.read_text())["saes"]
    return result["metrics"] | {"eval_tokens": result["tokens"], "loaded_as": sae.architecture}


def load_earlier_results(path: Path) -> dict[str, Any]:
    """The quality.json that --update merges into; read before training so a missing file fails fast."""
    if not path.is_file():
        raise SystemExit(f"--update: no earlier results at {path} (run once without --update first)")
    earlier = json.loads(path.read_text())
    for row in earlier["results"]:  # rows written before rows carried their own date
        row.setdefault("run_date", earlier["environment"]["date"])
    return earlier


def merge_results(earlier: dict[str, Any], latest: dict[str, Any]) -> dict[str, Any]:
    """Earlier rows in their order, each replaced by this run's row of the same library and
    architecture; this run's new rows after them. The earlier runs' environments are kept."""
    fresh = {(row["library"], row["architecture"]): row for row in latest["results"]}
    merged = [fresh.pop((row["library"], row["architecture"]), row) for row in earlier["results"]]
    history = earlier.get("earlier_environments", []) + [earlier["environment"]]
    return {"environment": latest["environment"], "earlier_environments": history,
            "results": merged + list(fresh.values())}  # fmt: skip


def environment() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "flashsae": flashsae.__version__}  # fmt: skip


def markdown(results: list[dict[str, Any]], args, env: dict[str, Any]) -> str:
    lines = [
        f"# Quality side by side ({env['date'][:10]}, {env['cpu']}, {env['cores']} cores)",
        "",
        f"MiniLM layer 3 (d=384), {args.n_latents} latents, {args.tokens:,} training tokens from the same cache, "
        f"target L0 {args.target_l0}; every SAE evaluated by `flashsae eval` on {args.eval_tokens:,} held-out "
        "tokens. Dead: fires on none of them. Embedding cosine: MiniLM's pooled embedding with the SAE "
        "spliced in vs without. Times: training only (wall / CPU seconds; the machine was shared, CPU time "
        "is the fairer figure). Coefficient: the searched sparsity coefficient, where one was needed.",
        "",
        "| architecture | library | explained variance | L0 | dead | embedding cosine | wall s | CPU s | coefficient | run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results:
        coefficient = row.get("coefficient")
        lines.append(
            f"| {row['architecture']} | {row['library']} | {row['explained_variance']:.3f} | {row['l0']:.1f} | "
            f"{100 * row['dead_fraction']:.1f}% | {row.get('embedding_cosine', float('nan')):.3f} | "
            f"{row['wall_seconds']:.0f} | {row['cpu_seconds']:.0f} | "
            f"{'' if coefficient is None else f'{coefficient:.3g}'} | {row.get('run_date', env['date'])[:16]} |"
        )
    lines += ["", "Reproduce:", "", "```", "python benchmarks/quality.py " + shlex.join(sys.argv[1:]), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", type=Path, required=True, help="a flashsae cache directory")
    parser.add_argument("--out", type=Path, required=True, help="results directory (runs/, eval/, quality.json/.md)")
    parser.add_argument("--peers-python", help="python of a venv with sae-lens and dictionary-learning")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--tokens", type=int, default=262_144, help="training tokens per SAE (default: the demo's)")
    parser.add_argument("--n-latents", type=int, default=3072)
    parser.add_argument("--target-l0", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--max-trials", type=int, default=3, help="coefficient-search runs per peer SAE")
    parser.add_argument("--reuse-trained", action="store_true", help="keep runs already trained in --out")
    parser.add_argument("--update", action="store_true",
                        help="merge this run's rows into the quality.json already in --out instead of replacing it")  # fmt: skip
    args = parser.parse_args()
    args.activations = args.activations.resolve()
    args.out = args.out.resolve()
    peers = [lib for lib in args.libraries if lib != "flashsae"]
    if peers and not args.peers_python:
        parser.error("--peers-python: needed to train " + " and ".join(peers))
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    (args.out / "eval").mkdir(parents=True, exist_ok=True)
    earlier = load_earlier_results(args.out / "quality.json") if args.update else None
    manifest = json.loads((args.activations / "manifest.json").read_text())
    rows = eval_rows(args.activations)
    env = environment()
    results = []
    for architecture in args.architectures:
        for library in args.libraries:
            record = train_one(args, library, architecture, rows)
            metrics = evaluate_one(args, library, architecture, manifest)
            results.append(record | metrics | {"run_date": env["date"]})
            print(
                f"{architecture:>10} {library:<19} EV {metrics['explained_variance']:.3f}  L0 {metrics['l0']:.1f}  "
                f"dead {100 * metrics['dead_fraction']:.1f}%  train {record['wall_seconds']:.0f} s wall, "
                f"{record['cpu_seconds']:.0f} s CPU",
                flush=True,
            )
    env["load_average_end"] = os.getloadavg()
    document: dict[str, Any] = {"environment": env, "results": results}
    if earlier is not None:
        document = merge_results(earlier, document)
        results = document["results"]
    (args.out / "quality.json").write_text(json.dumps(document, indent=2))
    (args.out / "quality.md").write_text(markdown(results, args, env))
    print(f"results: {args.out / 'quality.md'}")


if __name__ == "__main__":
    main()
