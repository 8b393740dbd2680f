"""Benchmark report: real suite output -> markdown; synthetic rows -> exact ratios, fractions, plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashsae.bench import report as bench_report
from flashsae.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_report_from_a_real_suite_run(tmp_path):
    out = tmp_path / "ops.json"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "benchmarks" / "test_bench_ops.py"),
         f"--benchmark-json={out}"],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    rows, machine = bench_report.load_rows([out])
    assert {r.op for r in rows} == {"topk_encode", "sparse_decode", "sae_loss"}
    assert {"torch_dense", "torch_sparse", "flashsae-cpu"} <= {r.provider for r in rows}
    assert machine["flashsae_environment"]["torch"].startswith("2.")
    text = bench_report.markdown(rows, machine)
    assert "## topk_encode fwd+bwd" in text and "| flashsae-cpu |" in text
    assert "1.00x" in text  # torch_dense against itself


def synthetic(tmp_path: Path) -> Path:
    """Two sizes, two providers, known times: flashsae 4x and 8x faster, at half the memory."""
    benches = []
    for n, dense_s, flash_s in ((1024, 0.08, 0.02), (4096, 0.32, 0.04)):
        for provider, seconds, peak in (("torch_dense", dense_s, 8 << 20), ("flashsae-cpu", flash_s, 4 << 20)):
            info = {"op": "topk_encode", "stage": "fwd", "d": 64, "n": n, "k": 8, "batch": 256, "dtype": "float32",
                    "device": "cpu", "provider": provider, "flop": 2.0 * 256 * n * 64, "bytes": 1e6,
                    "peak_bytes": peak, "peak_flops": 1e11, "peak_bytes_per_s": 1e10}  # fmt: skip
            benches.append({"name": f"{provider}-{n}", "stats": {"median": seconds}, "extra_info": info})
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return path


def test_ratios_and_roofline_fraction(tmp_path):
    rows, _ = bench_report.load_rows([synthetic(tmp_path)])
    text = bench_report.markdown(rows, {})
    assert "| 64 | 4096 | 8 | 256 | float32 | cpu | flashsae-cpu | 40.00 | 8.00x | 4.0 | 0.50x |" in text
    assert "| 64 | 1024 | 8 | 256 | float32 | cpu | flashsae-cpu | 20.00 | 4.00x |" in text
    big = next(r for r in rows if r.n == 4096 and r.provider == "flashsae-cpu")
    # floor = max(2*256*4096*64 / 1e11, 1e6 / 1e10) = 1.342e-3 s; fraction = floor / 0.04
    assert big.roofline_fraction == pytest.approx(2 * 256 * 4096 * 64 / 1e11 / 0.04)


def test_plots_and_cli(tmp_path):
    report_dir = tmp_path / "report"
    assert main(["bench", "--report", str(synthetic(tmp_path)), "--report-dir", str(report_dir)]) == 0
    for name in ("speedup_vs_n.png", "memory_vs_n.png", "roofline_fraction.png"):
        data = (report_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "![speedup_vs_n](speedup_vs_n.png)" in (report_dir / "report.md").read_text()


def test_report_rejects_foreign_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    assert bench_report.main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err
