"""Benchmark report: pytest-benchmark JSON -> a markdown table and PNG plots.

    python benchmarks/report.py ops.json train.json --out benchmarks/results/<date>-<machine>/
    flashsae bench --report ops.json train.json --report-dir <dir>

Reads the rows written by benchmarks/test_bench_ops.py and test_bench_train_step.py (their
extra_info: op, stage, sizes, provider, flop, bytes, peak memory, machine peaks). For every group of
rows that share op, stage, sizes, dtype and device, each provider is compared with torch_dense and
torch_sparse of the same group, i.e. measured in the same run. Writes:

- ``report.md``: machine (CPU model, AMX / AVX-512 BF16), versions and date, then one table per op
  stage: median time, speedup vs torch_dense, peak memory one call adds (and its ratio to
  torch_dense), achieved FLOP/s and GB/s of the op's own work, the fraction of the roofline floor
  (max(flop/peak_flops, bytes/peak_bw) / time, 1.0 = at the machine's measured limit), the speedup vs
  torch_sparse and, for the encoder, the vendor GEMM's time as a fraction of this one (torch_gemm /
  this; 1.0 = as fast as the GEMM alone);
- ``speedup_vs_n.png``, ``memory_vs_n.png``: per op stage, over the dictionary size n;
- ``roofline_fraction.png``: the fraction of the floor per provider at the largest n.

Plots need matplotlib (``pip install 'flashsae[bench]'``); the markdown does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .environment import describe
from .op_cases import CaseKey

BASELINE = "torch_dense"
SPARSE_BASELINE = "torch_sparse"
GEMM = "torch_gemm"


@dataclass(frozen=True, kw_only=True)
class Row(CaseKey):
    """One benchmark: a provider on an op stage at one size."""

    provider: str
    median_s: float
    flop: float
    bytes: float
    peak_bytes: int
    peak_flops: float | None = None
    peak_bytes_per_s: float | None = None

    @property
    def group(self) -> tuple:
        return self.key()

    @property
    def roofline_fraction(self) -> float | None:
        if not self.peak_flops or not self.peak_bytes_per_s:
            return None
        floor_s = max(self.flop / self.peak_flops, self.bytes / self.peak_bytes_per_s)
        return floor_s / self.median_s


def load_rows(paths: Iterable[str | Path]) -> tuple[list[Row], dict[str, Any]]:
    """Rows of every benchmark with flashsae extra_info in the given pytest-benchmark JSON files,
    and the machine_info of the first file."""
    rows: list[Row] = []
    machine: dict[str, Any] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
        machine = machine or data.get("machine_info", {})
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if "op" not in info or "provider" not in info:
                continue  # a benchmark without flashsae's extra_info
            fields = {f: info[f] for f in Row.__dataclass_fields__ if f in info and f != "median_s"}
            rows.append(Row(median_s=bench["stats"]["median"], **fields))
    if not rows:
        raise ValueError(
            "no flashsae benchmark rows found: run pytest benchmarks/ --benchmark-only --benchmark-json=FILE"
        )
    return rows, machine


def by_group(rows: list[Row]) -> dict[tuple, dict[str, Row]]:
    groups: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        groups[row.group][row.provider] = row
    return groups


def _ratio(value: float, base: float | None) -> str:
    return f"{base / value:.2f}x" if base and value else "-"


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def markdown(rows: list[Row], machine: dict[str, Any]) -> str:
    env = machine.get("flashsae_environment", {})
    lines = ["# flashsae benchmarks", ""]
    if env:
        lines += [describe(env), ""]
    lines += [
        "Speedup and memory are ratios to torch_dense in the same run (higher speedup is better, lower",
        "memory is better); vs sparse: the speedup vs torch_sparse (sparsify-style eager). Memory: the",
        "peak one call adds. Floor: the op's own work at the machine's measured peaks (GEMM FLOP/s, copy",
        "bandwidth); 1.00 = at the limit. GEMM: torch_gemm's time / this one's (the encoder's GEMM alone).",
        "",
    ]
    groups = by_group(rows)
    stages = sorted({(g[0], g[1]) for g in groups}, key=lambda s: (s[0] != "train_step", s))
    for op, stage in stages:
        lines += [
            f"## {op} {stage}",
            "",
            "| d | n | k | batch | dtype | device | provider | median ms | speedup | peak MiB | memory "
            "| GFLOP/s | GB/s | floor | vs sparse | GEMM |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key in sorted(g for g in groups if g[:2] == (op, stage)):
            members = groups[key]
            base, sparse, gemm = members.get(BASELINE), members.get(SPARSE_BASELINE), members.get(GEMM)
            order = (BASELINE, SPARSE_BASELINE, GEMM)
            for provider in sorted(members, key=lambda p: (order.index(p) if p in order else len(order), p)):
                r = members[provider]
                fraction = r.roofline_fraction
                k = f"{r.k}+aux{r.aux_k}" if r.aux_k else str(r.k)
                lines.append(
                    f"| {r.d} | {r.n} | {k} | {r.batch} | {r.dtype} | {r.device} | {provider} | "
                    f"{r.median_s * 1e3:.2f} | {_ratio(r.median_s, base.median_s if base else None)} | "
                    f"{_mib(r.peak_bytes)} | "
                    f"{f'{r.peak_bytes / base.peak_bytes:.2f}x' if base and base.peak_bytes else '-'} | "
                    f"{r.flop / r.median_s / 1e9:.1f} | {r.bytes / r.median_s / 1e9:.1f} | "
                    f"{f'{fraction:.2f}' if fraction is not None else '-'} | "
                    f"{_ratio(r.median_s, sparse.median_s if sparse else None)} | "
                    f"{f'{gemm.median_s / r.median_s:.2f}' if gemm else '-'} |"
                )
        lines.append("")
    return "\n".join(lines)


def _sweeps(rows: list[Row]) -> dict[tuple, dict[str, list[Row]]]:
    """(op, stage, d, k, aux_k, batch, dtype, device) -> provider -> rows sorted by n, for sizes seen
    at two or more n."""
    series: dict[tuple, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        series[(r.op, r.stage, r.d, r.k, r.aux_k, r.batch, r.dtype, r.device)][r.provider].append(r)
    return {
        key: {p: sorted(v, key=lambda r: r.n) for p, v in providers.items()}
        for key, providers in series.items()
        if len({r.n for v in providers.values() for r in v}) >= 2
    }


def plots(rows: list[Row], out_dir: Path) -> list[Path]:
    """speedup_vs_n.png, memory_vs_n.png, roofline_fraction.png in out_dir."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'flashsae[bench]'") from exc
    sweeps = _sweeps(rows)
    groups = by_group(rows)
    # One colour per provider across every panel and plot, so a line reads the same everywhere.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {p: palette[i % len(palette)] for i, p in enumerate(sorted({r.provider for r in rows}))}
    written = []
    for name, ylabel, value in (
        ("speedup_vs_n", "speedup vs torch_dense (x)", "speedup"),
        ("memory_vs_n", "peak memory per call (MiB)", "memory"),
    ):
        keys = sorted(sweeps)
        if not keys:
            continue
        cols = min(3, len(keys))
        grid_rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(grid_rows, cols, figsize=(5 * cols, 3.6 * grid_rows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            for provider, series in sorted(sweeps[key].items()):
                xs, ys = [], []
                for r in series:
                    base = groups[r.group].get(BASELINE)
                    if value == "speedup":
                        if base is None:
                            continue
                        ys.append(base.median_s / r.median_s)
                    else:
                        ys.append(r.peak_bytes / 2**20)
                    xs.append(r.n)
                if xs:
                    ax.plot(xs, ys, marker="o", label=provider, color=colors[provider])
            op, stage, d, k, aux_k, batch, dtype, device = key
            aux = f" aux_k={aux_k}" if aux_k else ""
            ax.set_title(f"{op} {stage}\nd={d} k={k}{aux} B={batch} {dtype} {device}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n_latents")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    largest = {}
    for r in rows:
        key = (r.op, r.stage, r.dtype, r.device)
        if r.roofline_fraction is not None and (key not in largest or r.n > largest[key]):
            largest[key] = r.n
    if largest:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(largest)), 4))
        labels = sorted(largest)
        providers = sorted({r.provider for r in rows})
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            heights = []
            for key in labels:
                match = [r for r in rows if (r.op, r.stage, r.dtype, r.device) == key and r.n == largest[key]
                         and r.provider == provider]  # fmt: skip
                heights.append(match[0].roofline_fraction if match else 0.0)
            ax.bar([x + i * width for x in range(len(labels))], heights, width, label=provider, color=colors[provider])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
        names = [f"{op}\n{stage}\n{dtype} n={largest[(op, stage, dtype, dev)]}" for op, stage, dtype, dev in labels]
        ax.set_xticklabels(names, fontsize=7)
        ax.set_ylabel("fraction of roofline floor")
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "roofline_fraction.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(json_paths: Iterable[str | Path], out_dir: str | Path, *, with_plots: bool = True) -> Path:
    """Writes report.md (and the plots) to out_dir; returns the report path."""
    rows, machine = load_rows(json_paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    text = markdown(rows, machine)
    if with_plots:
        images = plots(rows, out)
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    report.write_text(text)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pytest-benchmark JSON -> markdown table + PNG plots")
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", default="benchmark-report", help="output directory (default: benchmark-report)")
    parser.add_argument("--no-plots", action="store_true", help="markdown only (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.json, args.out, with_plots=not args.no_plots)
    except (ValueError, ImportError, FileNotFoundError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"written: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
