"""The Triton op benchmarks (benchmarks/test_bench_ops_triton.py, --benchmark-json output) as a
markdown table: every do_bench timing and ratio a row recorded in its extra_info.

    python benchmarks/report_ops_triton.py bench_ops_triton.json [out.md]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def report(data: dict) -> str:
    machine = data.get("machine_info", {})
    lines = [f"Triton ops, {data.get('datetime', '')}, {machine.get('node', '')}", ""]
    rows = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    for op in dict.fromkeys(r.get("op") for r in rows if r.get("op")):
        group = [r for r in rows if r.get("op") == op]
        keys = [k for k in dict.fromkeys(k for r in group for k in r) if k not in ("op", "dtype")]
        lines += [f"### {op} ({group[0].get('dtype', '')})", "", "| " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in group]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    text = report(json.loads(Path(argv[1]).read_text()))
    if len(argv) > 2:
        Path(argv[2]).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv)
