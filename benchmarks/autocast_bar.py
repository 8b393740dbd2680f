"""The autocast bar: a TopKSAE training step under ``torch.autocast`` against the dense PyTorch TopK SAE
under the same autocast, in one process (a ratio of medians; the bar is >= 4x on CPU in bfloat16).

    PYTHONSAFEPATH=1 python benchmarks/autocast_bar.py                      # CPU, bf16, the bar's shape
    PYTHONSAFEPATH=1 python benchmarks/autocast_bar.py --steps 9 --auxk     # with AuxK over dead latents
    PYTHONSAFEPATH=1 python benchmarks/autocast_bar.py --device cuda --d 4096 --n 131072 --k 64 --batch 4096

Both SAEs hold float32 parameters (the same init) and train with torch's fused Adam; a step is the
forward under ``torch.autocast(device, dtype)``, ``loss.backward()`` and the optimizer step outside it
(as flashsae's trainer and torch's AMP recipe do). Under autocast flashsae's ops receive the autocast
dtype (flashsae/ops/_autocast.py): the script checks that before timing, so a run that silently fell
back to float32 cannot report a ratio. The providers alternate step by step (dense, flashsae, dense,
...), so a noisy machine slows both alike; each reports the median and min-max of ``--steps`` steps
after ``--warmup`` untimed ones. Without ``--auxk`` no latent is dead (no AuxK term, as ``flashsae
bench``'s step); with it a fixed ``--dead-fraction`` of latents is passed as dead_mask.
"""

from __future__ import annotations

import argparse
import json

import torch

from flashsae import TopKSAE
from flashsae.bench import DenseTopKSAE, Spread, environment, time_ms

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(AUTOCAST_DTYPES), help="autocast dtype")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per provider")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per provider first")
    parser.add_argument("--auxk", action="store_true", help="pass a dead_mask (AuxK on)")
    parser.add_argument("--dead-fraction", type=float, default=0.1, help="share of latents marked dead with --auxk")
    parser.add_argument("--backend", default=None, help="flashsae backend (default: auto)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    return parser.parse_args(argv)


def make_step(sae, optimizer, x, dead_mask, device_type: str, dtype: torch.dtype):
    def step() -> torch.Tensor:
        with torch.autocast(device_type, dtype):
            out = sae(x, dead_mask=dead_mask)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    return step


def check_autocast_reaches_the_ops(sae: TopKSAE, x: torch.Tensor, device_type: str, dtype: torch.dtype) -> None:
    """flashsae's encoder and loss outputs come back in the autocast dtype only when its ops ran in it."""
    with torch.no_grad(), torch.autocast(device_type, dtype):
        out = sae(x)
    if out.latents.values.dtype != dtype or out.x_hat.dtype != dtype:
        raise RuntimeError(
            f"flashsae's ops did not run in {dtype} under autocast (values {out.latents.values.dtype}, "
            f"x_hat {out.x_hat.dtype}): no autocast rule is registered"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = AUTOCAST_DTYPES[args.dtype]
    torch.manual_seed(0)
    flash = TopKSAE(args.d, args.n, args.k, device=device, backend=args.backend)
    dense = DenseTopKSAE(args.d, args.n, args.k, device=device)
    dense.load_state_dict(flash.state_dict())
    x = torch.randn(args.batch, args.d, device=device)
    dead_mask = None
    if args.auxk:
        dead_mask = torch.zeros(args.n, dtype=torch.bool, device=device)
        dead_mask[torch.randperm(args.n, device=device)[: max(1, int(args.dead_fraction * args.n))]] = True
    check_autocast_reaches_the_ops(flash, x, device.type, dtype)

    steps = {}
    for name, sae in (("torch_dense", dense), ("flashsae", flash)):
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        steps[name] = make_step(sae, optimizer, x, dead_mask, device.type, dtype)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            step_ms = time_ms(step, device, repeats=1)
            if i >= args.warmup:
                times[name] += step_ms

    spreads = {name: Spread.of(t) for name, t in times.items()}
    medians = {name: spread.median for name, spread in spreads.items()}
    ratio = medians["torch_dense"] / medians["flashsae"]
    shape = f"d={args.d} n={args.n} k={args.k} batch={args.batch}"
    print(f"autocast {args.dtype} training step on {device} ({shape}, fused Adam, AuxK {'on' if args.auxk else 'off'})")
    for name, spread in spreads.items():
        print(f"  {name:12s} median {spread.median:9.1f} ms   min-max {spread.low:.1f}-{spread.high:.1f} ms   "
              f"({len(times[name])} steps)")  # fmt: skip
    print(f"  flashsae / torch_dense speed ratio: {ratio:.2f}x")
    result = {
        "config": vars(args),
        "times_ms": times,
        "median_ms": medians,
        "ratio": ratio,
        "environment": environment(),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
