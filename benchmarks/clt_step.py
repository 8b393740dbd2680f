"""One training step of a cross-layer transcoder: flashsae's CrossLayerTranscoder against a dense
PyTorch CLT of the same math, time and step memory measured in one invocation, results written
for benchmarks/results/. The providers and the harness are flashsae.bench.clt_step (the same as
``flashsae bench --architecture clt``).

    python benchmarks/clt_step.py                       # L=6, d=384, n=8192/layer, k=32, B=1024, fp32, CPU
    python benchmarks/clt_step.py --out benchmarks/results/<dir>   # also writes clt_step.json + .md
    python benchmarks/clt_step.py --precision exact     # flashsae's encoders without the bf16 candidates
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from flashsae.bench.clt_step import WARMUP_STEPS, CLTBenchConfig, run_benchmark


def markdown(outcome: dict) -> str:
    c = outcome["config"]
    lines = [
        f"# CLT training step, {c['device'].upper()} float32 ({outcome['date']})",
        "",
        f"L = {c['n_layers']}, d = {c['d_in']}, n = {c['n_latents']} per layer, k = {c['k']}, B = {c['batch']}; "
        f"flashsae encoder precision `{c['precision']}`; {c['steps']} timed steps after {WARMUP_STEPS} warm-up, "
        f"{c['repeats']} runs per provider (fresh processes, alternating). Command: `{outcome['command']}`.",
        "",
        "```",
        outcome["report"],
        "```",
        "",
    ]
    if "speedup" in outcome:
        lines.append(
            f"flashsae is **{outcome['speedup']:.2f}x** the dense CLT's speed with "
            f"**{outcome['step_memory_ratio']:.2f}x** its step memory."
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = CLTBenchConfig()
    for f in fields(CLTBenchConfig):
        kind = str if f.name in ("device", "precision") else int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name))
    parser.add_argument("--out", type=Path, help="directory for clt_step.json and clt_step.md")
    args = parser.parse_args(argv)
    config = CLTBenchConfig(**{f.name: getattr(args, f.name) for f in fields(CLTBenchConfig)})
    outcome = run_benchmark(config, progress=sys.stderr)
    outcome["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    outcome["command"] = " ".join(["python benchmarks/clt_step.py", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(outcome)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "clt_step.json").write_text(json.dumps(outcome, indent=2) + "\n")
        (args.out / "clt_step.md").write_text(text)


if __name__ == "__main__":
    main()
