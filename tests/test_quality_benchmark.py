"""benchmarks/quality.py --update: rerun rows replace their earlier selves, the rest are kept with their dates."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(library, architecture, ev, **extra):
    return {"library": library, "architecture": architecture, "explained_variance": ev, "l0": 32.0,
            "dead_fraction": 0.01, "embedding_cosine": 0.9, "wall_seconds": 10.0, "cpu_seconds": 12.0} | extra  # fmt: skip


def test_update_replaces_same_library_and_architecture_and_keeps_the_rest(quality, tmp_path):
    earlier_env = {"date": "2026-12-05T08:34:44+00:00", "cpu": "Xeon", "cores": 2}
    earlier = {"environment": earlier_env,
               "results": [row("flashsae", "relu", 0.78), row("saelens", "relu", 0.14, coefficient=13.2),
                           row("flashsae", "gated", 0.76)]}  # fmt: skip
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(earlier))
    loaded = quality.load_earlier_results(path)
    assert [r["run_date"] for r in loaded["results"]] == [earlier_env["date"]] * 3

    latest_env = {"date": "2026-12-06T02:00:00+00:00", "cpu": "Xeon", "cores": 2}
    latest = {"environment": latest_env,
              "results": [row("flashsae", "relu", 0.82, run_date=latest_env["date"]),
                          row("flashsae", "topk", 0.84, run_date=latest_env["date"])]}  # fmt: skip
    merged = quality.merge_results(loaded, latest)
    assert [(r["library"], r["architecture"], r["explained_variance"]) for r in merged["results"]] == [
        ("flashsae", "relu", 0.82), ("saelens", "relu", 0.14), ("flashsae", "gated", 0.76), ("flashsae", "topk", 0.84)]
    assert merged["environment"] == latest_env and merged["earlier_environments"] == [earlier_env]

    args = SimpleNamespace(n_latents=3072, tokens=262_144, target_l0=32, eval_tokens=16384)
    table = quality.markdown(merged["results"], args, latest_env)
    assert "| relu | flashsae | 0.820 |" in table and "| 2026-12-06T02:00 |" in table
    assert "| relu | saelens | 0.140 |" in table and "| 13.2 | 2026-12-05T08:34 |" in table


def test_update_without_earlier_results_names_the_flag(quality, tmp_path):
    with pytest.raises(SystemExit, match="--update"):
        quality.load_earlier_results(tmp_path / "quality.json")
