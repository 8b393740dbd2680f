"""The width bar, measured: the widest flashsae TopK SAE that trains within a memory budget
against the widest dense PyTorch TopK SAE (same d, k, batch, parameter dtype), each found by measuring
peak memory of real training steps.

    python benchmarks/width_ratio.py                       # CPU, 1.5 GiB budget, d=256 k=64 batch=512
    python benchmarks/width_ratio.py --device cuda --budget 139GiB --d 4096 --k 64 --batch 8192 --dtype bfloat16

Each measurement (flashsae.plan.measure) runs two training steps (forward, backward, Adam step) in a
fresh process: peak RSS on CPU (glibc's mmap threshold fixed so freed tensors leave the resident set),
torch.cuda.max_memory_allocated on a GPU. The search starts at the width flashsae.plan predicts, then
brackets and bisects on measurements to a resolution of ``--resolution`` (2%). Providers:

- ``dense``: flashsae.bench.DenseTopKSAE + torch's fused Adam (what most codebases write);
- ``flashsae``: TopKSAE + SparseAdam (row-sparse gradients), moments in the parameter dtype;
- ``flashsae-bf16-moments``: the same with bfloat16 moments (SparseAdam(state_dtype="bfloat16"));
- ``flashsae-row-int8``: SparseAdam(moments="row-int8"): one second moment per latent row and an int8
  first moment (1 byte per weight of optimizer state; flashsae/ops/sparse_adam_rowwise.py).

The CPU run keeps the GPU setting's shape ratio (batch = 2 d, k = 64) at a size this machine can train; the
plan's model (checked against these measurements in tests/test_plan.py) gives the GPU-scale ratios,
printed alongside. Results go to --out as JSON and markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flashsae import plan
from flashsae.bench.environment import describe, environment

PROVIDERS = {
    "dense": {"provider": "dense"},
    "flashsae": {"provider": "flashsae"},
    "flashsae-bf16-moments": {"provider": "flashsae", "state_dtype": "bfloat16"},
    "flashsae-row-int8": {"provider": "flashsae", "moments": "row-int8"},
}


def plan_config(args, options: dict, **overrides) -> plan.PlanConfig:
    settings = {
        "d": args.d,
        "n": max(args.k, 1024),
        "k": args.k,
        "batch": args.batch,
        "dtype": args.dtype,
        "state_dtype": options.get("state_dtype"),
        "moments": options.get("moments", "elementwise"),
        "device": args.device,
        "buffer_tokens": 0,
        "memory": args.budget,
        "reserve": 0,
    }
    return plan.PlanConfig(**(settings | overrides))


def search(args, name: str, options: dict, log: list) -> dict:
    """Widest n (multiple of 1024) whose measured peak fits the budget."""
    estimate = plan.dense_memory if options["provider"] == "dense" else plan.flashsae_memory
    cfg = plan_config(args, options)
    predicted = plan.widest(estimate, cfg, args.budget)

    def fits(n: int) -> bool:
        started = time.time()
        config = plan.MeasureConfig(
            d=args.d, n=n, k=args.k, batch=args.batch, dtype=args.dtype, device=args.device, **options
        )
        peak = plan.measure(config)["peak_bytes"]
        ok = peak <= args.budget
        log.append({"provider": name, "n": n, "peak_bytes": peak, "fits": ok, "seconds": round(time.time() - started)})
        print(f"  {name:<22} n={n:>9,}  peak {peak / plan.GiB:6.3f} GiB  {'fits' if ok else 'too big'}", flush=True)
        return ok

    def rounded(n: float) -> int:
        return max(1024, int(n) // 1024 * 1024)

    low = high = None
    n = rounded(predicted)
    factor = 1 + 4 * args.resolution
    while low is None or high is None:
        if fits(n):
            low = n
            n = rounded(n * factor) if high is None else n
            if high is None and n == low:
                n += 1024
        else:
            high = n
            n = rounded(n / factor) if low is None else n
    while high - low > max(1024, args.resolution * low):
        middle = rounded((low + high) / 2)
        if middle in (low, high):
            break
        if fits(middle):
            low = middle
        else:
            high = middle
    return {"provider": name, "options": options, "widest_n": low, "first_too_big_n": high, "predicted_n": predicted}


def gpu_model_ratios() -> list[dict]:
    """The plan's widest n at the GPU setting (H200, d=4096, k=64, batch=8192), per weight dtype and
    flashsae optimizer-state layout; the dense SAE keeps torch Adam in the weights' dtype."""
    shape = {"d": 4096, "n": 1 << 20, "k": 64, "batch": 8192}
    variants = (
        ("bf16 weights, bf16 moments (like-for-like)", {"dtype": "bfloat16"}),
        ("bf16 weights, fp32 moments", {"dtype": "bfloat16", "state_dtype": "float32"}),
        ("bf16 weights, fp32 master + fp32 moments",
         {"dtype": "bfloat16", "state_dtype": "float32", "master_weights": True}),
        ("bf16 weights, int8 first moment + row-wise second moment", {"dtype": "bfloat16", "moments": "row-int8"}),
        ("fp32 weights, fp32 moments", {"dtype": "float32"}),
        ("fp32 weights, bf16 moments", {"dtype": "float32", "state_dtype": "bfloat16"}),
        ("fp32 weights, int8 first moment + row-wise second moment", {"dtype": "float32", "moments": "row-int8"}),
    )  # fmt: skip
    rows = []
    for label, settings in variants:
        result = plan.plan(plan.PlanConfig(**shape, **settings))
        rows.append({"flashsae": label, "widest_flashsae": result["widest_flashsae"],
                     "widest_dense": result["widest_dense"], "ratio": result["width_ratio"]})  # fmt: skip
    return rows


def report(args, results: list[dict], model: list[dict], env: dict) -> str:
    dense = next(r for r in results if r["provider"] == "dense")
    lines = [
        "# Width bar: widest TopK SAE that trains in a memory budget",
        "",
        f"{describe(env)}; the CPU is shared with other jobs",
        f"device {args.device}, budget {args.budget / plan.GiB:.2f} GiB, d={args.d}, k={args.k}, batch={args.batch}, "
        f"{args.dtype} weights; two training steps per measurement (forward, backward, Adam)",
        "",
        "| provider | widest n (measured) | first n over budget | plan's prediction | vs dense |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['provider']} | {r['widest_n']:,} | {r['first_too_big_n']:,} | {r['predicted_n']:,} | "
            f"{r['widest_n'] / dense['widest_n']:.2f}x |"
        )
    lines += [
        "",
        "Model (flashsae.plan) at the GPU setting: H200 (140.4 GiB, 2 GiB reserved), d=4096, k=64, "
        "batch=8192, AuxK off; dense = DenseTopKSAE + torch Adam in the weights' dtype. GPU measurement pending.",
        "",
        "| flashsae configuration | widest flashsae n | widest dense n | ratio |",
        "|---|---:|---:|---:|",
    ]
    for r in model:
        lines.append(f"| {r['flashsae']} | {r['widest_flashsae']:,} | {r['widest_dense']:,} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=plan.parse_bytes, default=plan.parse_bytes("1.5GiB"))
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--resolution", type=float, default=0.02, help="relative bisection resolution")
    parser.add_argument("--out", type=Path, default=None, help="directory for width_ratio.json and width_ratio.md")
    args = parser.parse_args(argv)
    log: list[dict] = []
    results = []
    for name in args.providers.split(","):
        print(f"searching {name}", flush=True)
        results.append(search(args, name, PROVIDERS[name], log))
    env = environment()
    model = gpu_model_ratios()
    text = report(args, results, model, env)
    print()
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "environment": env}
        payload |= {"results": results, "measurements": log, "gpu_model": model}
        (args.out / "width_ratio.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "width_ratio.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
