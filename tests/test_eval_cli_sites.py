"""``flashsae eval`` and ``flashsae report`` on a CLT and a crosscoder trained by flashsae train (tiny
BERT): the sites come from the run's --hookpoints / --targets, the printed table has one row per
layer, the JSON holds every layer, and the report has a section for the whole CLT and one per layer
(with its latent cards and its end-of-training metrics)."""

from __future__ import annotations

import json
import re

import pytest

from flashsae.train import Trainer
from test_eval_cli import main
from train_helpers import text, tiny_train_config  # noqa: F401 - text: a fixture the tests request by name

INPUTS, TARGETS = "encoder.layer.*.attention.output", "encoder.layer.*.output.dense"


@pytest.fixture(scope="module")
def clt_run(tmp_path_factory, text):
    config = tiny_train_config(
        tmp_path_factory.mktemp("runs"), "clt", text, architecture="clt", hookpoints=[INPUTS], targets=[TARGETS],
        k=4, batch_size=64, train_tokens=256, log_every=2, eval_tokens=64, optimizer="sparse_adam",
    )  # fmt: skip
    return Trainer(config).train().run_dir


def test_eval_of_a_clt_run(clt_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", str(clt_run), "--n-tokens", "96", "--part", "all", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clt over 3 layers" in printed
    for i in range(3):
        sites = rf"encoder\.layer\.{i}\.attention\.output -> encoder\.layer\.{i}\.output\.dense"
        row = re.search(rf"layer{i}\s+{sites}\s", printed)
        assert row, printed
    assert "embedding_cosine_recovered" in printed
    (record,) = json.loads(out.read_text())["saes"]
    assert record["architecture"] == "clt" and record["tokens"] == 96 and record["downstream"] == "embedding"
    assert [site["site"] for site in record["sites"]] == ["layer0", "layer1", "layer2"]
    evs = [site["metrics"]["explained_variance"] for site in record["sites"]]
    assert record["metrics"]["explained_variance"] == pytest.approx(sum(evs) / 3)
    assert all(0 < site["metrics"]["l0"] <= 4 for site in record["sites"])
    assert 0 < record["metrics"]["embedding_cosine"] <= 1
    # sites given on the command line: one layer's worth is refused
    bad = main([*argv, "--hookpoint", "encoder.layer.0.attention.output", "--target-hookpoint", TARGETS])
    assert bad == 2 and "hookpoint: names 1 modules" in capsys.readouterr().err


def test_report_of_a_clt_run(clt_run, tmp_path):
    page = tmp_path / "report.html"
    argv = ["report", str(clt_run), "--out", str(page), "--n-tokens", "96", "--part", "all", "--top-latents", "4"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    html = page.read_text()
    hookpoints = re.findall(r'<section class="sae" id="sae-\d+" data-hookpoint="([^"]+)"', html)
    assert hookpoints == ["clt", "clt/layer0", "clt/layer1", "clt/layer2"]
    data = json.loads(re.search(r'<script type="application/json" id="flashsae-data">(.*?)</script>', html).group(1))
    assert [len(section["latents"]) for section in data["sections"]] == [0, 4, 4, 4]
    assert html.count('class="latent-grid"') == 3
    assert "reads encoder.layer.1.attention.output -&gt; encoder.layer.1.output.dense" in html
    assert "At the end of training" in html  # the per-layer figures flashsae train measured


def test_eval_of_a_crosscoder_run(tmp_path, text, capsys):
    config = tiny_train_config(
        tmp_path, "cc", text, architecture="crosscoder", hookpoints=["encoder.layer.1", "encoder.layer.2"], k=4,
        batch_size=64, train_tokens=128, eval_tokens=64,
    )  # fmt: skip
    run_dir = Trainer(config).train().run_dir
    out = tmp_path / "eval.json"
    argv = ["eval", str(run_dir), "--n-tokens", "64", "--part", "all", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "crosscoder over 2 layers" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())["saes"]
    assert [site["hookpoint"] for site in record["sites"]] == ["encoder.layer.1", "encoder.layer.2"]
    assert record["sites"][0]["metrics"]["l0"] == record["sites"][1]["metrics"]["l0"]  # one dictionary
