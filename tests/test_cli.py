"""The `flashsae` entry point: bench (progress, repeats, the table, JSON), its errors, the console script, convert."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashsae.cli import main

TINY = ["--d-in", "16", "--n-latents", "96", "--k", "4", "--batch", "32", "--steps", "2", "--repeats", "2"]


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    assert main(["bench", *TINY, "--json", str(tmp_path / "out.json")]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    for provider in ("torch_dense", "torch_sparse", "flashsae"):
        assert provider in printed
    assert "one encoder GEMM [32x16]x[16x96]" in printed
    assert "vs dense" in printed and "vs sparse" in printed and "2 steps x 2 runs per provider" in printed
    # progress: one line per run (3 providers x 2 repeats), interleaved
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert [line.split(" ... ")[0] for line in progress] == [
        f"[{i + 1}/6] {p} run {r}/2" for i, (r, p) in enumerate((r, p) for r in (1, 2)
                                                                for p in ("torch_dense", "torch_sparse", "flashsae"))
    ]  # fmt: skip
    assert all(line.endswith("s elapsed)") for line in progress)
    outcome = json.loads((tmp_path / "out.json").read_text())
    assert outcome["config"]["n_latents"] == 96 and outcome["config"]["precision"] == "auto"
    assert "flashsae precision auto" in printed
    results = {r["provider"]: r for r in outcome["results"]}
    assert set(results) == {"torch_dense", "torch_sparse", "flashsae"}
    for r in results.values():
        assert r["step_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_bytes"] > 0
        assert len(r["step_times_ms"]) == 2 * 2 and len(r["run_step_ms"]) == 2
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert r["step_ms_min"] == min(r["run_step_ms"]) and r["step_ms_max"] == max(r["run_step_ms"])
        assert 0 < r["final_fvu"] < 10
    assert [r["provider"] for r in outcome["runs"]].count("flashsae") == 2
    env = outcome["environment"]
    assert env["processor"] and env["torch"].startswith("2.")
    assert isinstance(env["amx_bf16"], bool) and isinstance(env["avx512_bf16"], bool)
    assert env["processor"] in printed


def test_bench_rejects_bad_settings(capsys):
    assert main(["bench", "--k", "100", "--n-latents", "50", "--providers", "flashsae"]) == 2
    assert "k: expected <= n_latents (50), got 100" in capsys.readouterr().err
    assert main(["bench", *TINY, "--providers", "flashsae,sparsify"]) == 2
    assert "providers: expected names from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own choices check
        main(["bench", *TINY, "--precision", "bf16"])
    assert exit_info.value.code == 2 and "--precision" in capsys.readouterr().err


def test_bench_builds_flashsae_at_the_precision_asked_for():
    from flashsae.bench.train_step import BenchConfig, prepare

    config = BenchConfig(d_in=16, n_latents=96, k=4, batch=32, precision="certified")
    sae, _, _ = prepare("flashsae", config)
    assert sae.config.precision == "certified"
    assert prepare("flashsae", BenchConfig(d_in=16, n_latents=96, k=4, batch=32))[0].config.precision == "auto"


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "flashsae"  # pip puts console scripts next to the interpreter
    assert exe.is_file(), f"no console script at {exe}"
    out = subprocess.run([str(exe), "bench", "--help"], capture_output=True, text=True, check=True)
    assert "--n-latents" in out.stdout and "--optimizer" in out.stdout


def test_convert_through_the_cli(tmp_path, capsys):
    import torch

    import flashsae

    sae = flashsae.create("topk", d_in=8, n_latents=32, k=3)
    sae.save(tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "lens"), "--to", "saelens"]) == 0
    assert (tmp_path / "lens" / "sae_weights.safetensors").is_file()
    x = torch.randn(6, 8)
    torch.testing.assert_close(flashsae.load(tmp_path / "lens")(x).x_hat, sae(x).x_hat)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "native"]) != 0
    assert "missing" in capsys.readouterr().err
