"""`flashsae bench --architecture clt` (flashsae.bench.clt_step): the dense baseline computes the same
loss and gradients as the CrossLayerTranscoder, the CLI's table, progress, JSON and errors (small
sizes, no timing assertions)."""

import json

import pytest
import torch

import flashsae
from flashsae.bench import clt_step
from flashsae.bench.clt_step import CLTBenchConfig, DenseCLT
from flashsae.cli import main

TINY = ["--n-layers", "3", "--d-in", "16", "--n-latents", "96", "--k", "4", "--batch", "32", "--steps", "2"]


def test_dense_clt_has_the_loss_and_gradients_of_the_crosslayer_transcoder_float64():
    L, d, n, k, B = 3, 13, 37, 5, 19  # odd sizes
    torch.manual_seed(0)
    clt = flashsae.create("clt", n_layers=L, d_in=d, n_latents=n, k=k, dtype=torch.float64)
    with torch.no_grad():
        for W in clt.decoder_matrices():
            W.normal_(0, d**-0.5)
        for j in range(L):
            getattr(clt, f"b_dec_{j}").normal_()
            getattr(clt, f"b_enc_{j}").normal_(0, 0.1)
    dense = DenseCLT(L, d, n, k).double()
    dense.load_state_dict(clt.state_dict())
    x = torch.randn(B, L, d, dtype=torch.float64)
    y = torch.randn(B, L, d, dtype=torch.float64)
    ours, theirs = clt(x, y).loss, dense(x, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    ours.backward()
    theirs.backward()
    dense_params = dict(dense.named_parameters())
    for name, p in clt.named_parameters():
        torch.testing.assert_close(p.grad, dense_params[name].grad, rtol=1e-10, atol=1e-12, msg=name)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="k: expected <= n_latents"):
        CLTBenchConfig(n_latents=8, k=9)
    with pytest.raises(ValueError, match="n_layers: expected an int >= 1"):
        CLTBenchConfig(n_layers=0)
    with pytest.raises(ValueError, match="precision"):
        CLTBenchConfig(precision="bf16")
    with pytest.raises(ValueError, match="device"):
        CLTBenchConfig(device="tpu")


def test_measure_provider_in_process_starts_both_providers_at_the_same_loss():
    config = CLTBenchConfig(n_layers=2, d_in=8, n_latents=24, k=3, batch=16, steps=2, repeats=1)
    runs = [clt_step.measure_provider(p, config) for p in clt_step.PROVIDERS]
    for r in runs:
        assert len(r.losses) == clt_step.WARMUP_STEPS + 2 and len(r.step_times_ms) == 2
        assert r.losses[-1] < r.losses[0]  # Adam steps lower the loss of the fixed batch
    torch.testing.assert_close(runs[0].losses[0], runs[1].losses[0], rtol=1e-5, atol=0)


def test_bench_architecture_clt_prints_a_table_and_writes_json(tmp_path, capsys):
    assert main(["bench", "--architecture", "clt", *TINY, "--repeats", "2", "--json", str(tmp_path / "out.json")]) == 0
    captured = capsys.readouterr()
    assert "CLT training step: L=3 d=16 n=96 per layer k=4 batch=32" in captured.out
    assert "2 steps x 2 runs per provider" in captured.out and "load average" in captured.out
    # progress: one line per run, the order reversed in the second repeat
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert [line.split(" ... ")[0] for line in progress] == [
        "[1/4] torch_dense run 1/2", "[2/4] flashsae run 1/2", "[3/4] flashsae run 2/2", "[4/4] torch_dense run 2/2"
    ]  # fmt: skip
    assert all(line.endswith("s elapsed)") for line in progress)
    outcome = json.loads((tmp_path / "out.json").read_text())
    assert outcome["architecture"] == "clt" and outcome["config"]["n_layers"] == 3
    assert outcome["config"]["precision"] == "auto"
    results = {r["provider"]: r for r in outcome["results"]}
    assert set(results) == {"torch_dense", "flashsae"}
    for r in results.values():
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] and len(r["run_step_ms"]) == 2
        assert len(r["step_times_ms"]) == 2 * 2
        assert r["provider"] in captured.out
    torch.testing.assert_close(results["flashsae"]["first_loss"], results["torch_dense"]["first_loss"], rtol=1e-5, atol=0)
    assert outcome["speedup"] == pytest.approx(results["torch_dense"]["step_ms"] / results["flashsae"]["step_ms"])
    assert len(outcome["environment"]["load_before"]) == 3


def test_bench_architecture_clt_rejects_bad_settings(capsys):
    assert main(["bench", "--architecture", "clt", *TINY, "--dtype", "bfloat16"]) == 2
    assert "dtype: --dtype is not a setting of --architecture clt" in capsys.readouterr().err
    assert main(["bench", "--architecture", "clt", *TINY, "--providers", "flashsae,torch_sparse"]) == 2
    assert "providers: expected names from torch_dense, flashsae, got 'torch_sparse'" in capsys.readouterr().err
    assert main(["bench", "--architecture", "clt", "--k", "100", "--n-latents", "50"]) == 2
    assert "k: expected <= n_latents (50), got 100" in capsys.readouterr().err
    assert main(["bench", "--n-layers", "3", *TINY[2:]]) == 2  # an SAE has no layers
    assert "n_layers: --n-layers is not a setting of --architecture topk" in capsys.readouterr().err
