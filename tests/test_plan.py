"""flashsae plan: the memory model against measured peak memory (CPU, small sizes), the CLI, the fit
verdicts and the widest-n search."""

import json
import re

import pytest

from flashsae import plan as plan_module
from flashsae.plan import (
    GPUS,
    MeasureConfig,
    PlanConfig,
    dense_memory,
    flashsae_memory,
    measure,
    parse_bytes,
    parse_count,
    widest,
)

MiB = 1 << 20

# (provider, d, n, k, batch, dtype, options): sizes where the model's terms dominate the constants
MEASURED = [
    ("flashsae", 256, 65536, 16, 256, "float32", {}),
    ("dense", 256, 65536, 16, 256, "float32", {}),
    ("dense", 64, 32768, 8, 512, "float32", {"dead_fraction": 0.3}),  # AuxK: a fourth [batch, n] tensor
    ("flashsae", 128, 65536, 16, 512, "bfloat16", {"master_weights": True, "state_dtype": "float32"}),
    # every row touched (batch * k = 4 n): the backward's [m, d] blocks are as large as they get
    ("flashsae", 1024, 16384, 64, 1024, "bfloat16", {"moments": "row-int8"}),
]


@pytest.mark.parametrize(
    ("provider", "d", "n", "k", "batch", "dtype", "options"),
    MEASURED,
    ids=["flashsae-f32", "dense-f32", "dense-f32-auxk", "flashsae-bf16-master", "flashsae-bf16-row-int8"],
)
def test_model_matches_measured_peak_memory(provider, d, n, k, batch, dtype, options):
    cfg = PlanConfig(d=d, n=n, k=k, batch=batch, dtype=dtype, device="cpu", buffer_tokens=0, memory=1 << 40, **options)
    predicted = (flashsae_memory if provider == "flashsae" else dense_memory)(cfg).peak
    measured = measure(MeasureConfig(provider, d, n, k, batch, dtype=dtype, **options))["peak_bytes"]
    # the model counts tensors; the process adds allocator slack and small buffers (a few MiB)
    assert abs(measured - predicted) <= 0.1 * predicted + 8 * MiB, (
        f"{provider}: predicted {predicted / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB"
    )


def test_flashsae_has_no_batch_by_n_term():
    n, extra = 1 << 24, 4096  # 4096 more tokens per batch
    small = PlanConfig(d=4096, n=n, k=64, batch=4096)
    large = PlanConfig(d=4096, n=n, k=64, batch=4096 + extra)
    grown = flashsae_memory(large).peak - flashsae_memory(small).peak
    # O(batch * k * d): the touched rows' gradients (2 [m, d] bf16), the batch itself
    assert grown <= extra * (2 * 64 + 8) * 4096 * 2, "no [batch, n] term"
    dense_grown = dense_memory(large).peak - dense_memory(small).peak
    assert dense_grown >= 3 * extra * n * 2, "the dense SAE grows by 3 [batch, n] bf16 tensors"
    assert dense_grown > 20 * grown


def test_peak_is_at_most_the_sum_and_components_are_consistent():
    cfg = PlanConfig(d=2048, n=1 << 24, k=32, batch=4096, dtype="float32")
    for estimate in (flashsae_memory(cfg), dense_memory(cfg)):
        total = estimate.weights + estimate.gradients + estimate.optimizer + estimate.activations + estimate.buffer
        assert estimate.weights + estimate.optimizer + estimate.buffer < estimate.peak <= total
    ours, theirs = flashsae_memory(cfg), dense_memory(cfg)
    assert ours.weights == theirs.weights == (2 * (1 << 24) * 2048 + (1 << 24) + 2048) * 4
    assert theirs.gradients == theirs.weights and theirs.optimizer == 2 * theirs.weights
    assert ours.gradients < theirs.gradients / 10, "row-sparse gradients"


def test_widest_is_the_boundary():
    cfg = PlanConfig(d=4096, n=1 << 20, k=64, batch=8192)
    for estimate in (flashsae_memory, dense_memory):
        n = widest(estimate, cfg, cfg.usable)
        assert n > 0 and n % 1024 == 0
        assert estimate(cfg, n).peak <= cfg.usable < estimate(cfg, n + 1024).peak
    assert widest(dense_memory, cfg, 1 << 20) == 0, "nothing fits 1 MiB"


def test_tensor_parallel_divides_the_latents():
    one = PlanConfig(d=4096, n=1 << 24, k=64, batch=8192)
    eight = PlanConfig(d=4096, n=1 << 24, k=64, batch=8192, tensor_parallel=8)
    assert flashsae_memory(eight).weights == pytest.approx(flashsae_memory(one).weights / 8, rel=1e-3)
    assert widest(flashsae_memory, eight, eight.usable) > 7 * widest(flashsae_memory, one, one.usable)


def test_sizes_and_units():
    assert parse_count("16M") == 16 << 20 == parse_count("2^24") == parse_count("16777216") == parse_count("16_777_216")
    assert parse_count("32k") == 32768 and parse_count("1.5M") == 3 << 19 and parse_count(4096) == 4096
    assert parse_bytes("141GB") == 141 * 10**9 and parse_bytes("139GiB") == 139 << 30
    assert parse_bytes("80 GiB") == 80 << 30
    for bad in ("16Q", "1.5", "-3", "2^", ""):
        with pytest.raises(ValueError, match=r"expected an integer, 2\^N or a number with k/M/G|not a whole number"):
            parse_count(bad)
    with pytest.raises(ValueError, match=r"expected a memory size"):
        parse_bytes("lots")


def test_cli_prints_the_table_and_verdict(capsys):
    assert plan_module.main(["--d", "4096", "--n", "16M", "--k", "64", "--batch", "8192"]) == 0
    out = capsys.readouterr().out
    assert "n=16,777,216 (16M), k=64, batch=8192, bfloat16" in out
    for row in ("weights", "gradients", "optimizer", "activations", "buffer", "peak"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "H200" in out and "flashsae does NOT fit" in out and "widest n that fits: flashsae" in out
    assert plan_module.main(["plan", "--d", "4096", "--n", "2097152", "--k", "64", "--batch", "8192", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["n"] == 1 << 21 and result["flashsae_fits"] and not result["dense_fits"]
    assert result["width_ratio"] == result["widest_flashsae"] / result["widest_dense"] > 1
    assert plan_module.main(["--n", "1M", "--memory", "80GiB", "--gpu", "mine"]) == 0
    assert "80.0 GiB" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "0"], r"k: expected a positive int"),
        (["--dtype", "int8"], r"dtype: expected float32, bfloat16 or float16"),
        (["--gpu", "tpu"], r"gpu: expected one of h200"),
        (["--n", "100", "--k", "101"], r"k: expected k <= n \(100\)"),
        (["--dead-fraction", "2"], r"dead_fraction: expected a number in \[0, 1\]"),
        (["--moments", "int4"], r"moments: expected one of elementwise, row, row-int8"),
        (["--moments", "row", "--optimizer", "adam"], r"moments: row moments need optimizer sparse_adam"),
    ],
)
def test_cli_errors(flags, message, capsys):
    assert plan_module.main(flags) == 2
    assert re.search(message, capsys.readouterr().err)


def test_add_plan_parser_is_what_the_cli_wires(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="flashsae")
    plan_module.add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", "--n", "2^22", "--gpu", "h100", "--state-dtype", "float32"])
    assert args.n == 1 << 22 and args.command == "plan"
    assert plan_module.run_plan(args) == 0
    assert "H100" in capsys.readouterr().out
    assert set(GPUS) >= {"h200", "h100", "a100-80gb"}


# (d, n, k, batch, n_layers): CLT steps where the weights, moments, the decodes and the backward's chunk all count
MEASURED_CLT = [(128, 8192, 16, 512, 4), (256, 16384, 16, 256, 3), (96, 4096, 8, 1024, 6)]


@pytest.mark.parametrize(("d", "n", "k", "batch", "n_layers"), MEASURED_CLT, ids=["L4", "L3-wide", "L6-batch"])
def test_clt_model_matches_measured_peak_memory(d, n, k, batch, n_layers):
    cfg = PlanConfig(d=d, n=n, k=k, batch=batch, dtype="float32", device="cpu", buffer_tokens=0, memory=1 << 40,
                     architecture="clt", n_layers=n_layers)  # fmt: skip
    predicted = flashsae_memory(cfg).peak
    measured = measure(MeasureConfig("clt", d, n, k, batch, n_layers=n_layers))["peak_bytes"]
    assert abs(measured - predicted) <= 0.1 * predicted + 8 * MiB, (
        f"clt: predicted {predicted / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB"
    )


def test_clt_parameters_and_cli(capsys):
    L, d, n = 6, 384, 8192
    cfg = PlanConfig(d=d, n=n, k=32, batch=1024, dtype="float32", architecture="clt", n_layers=L)
    ours, theirs = flashsae_memory(cfg), dense_memory(cfg)
    assert ours.weights == theirs.weights == (L * n * d + n * d * L * (L + 1) // 2 + L * n + L * d) * 4
    assert ours.gradients < theirs.gradients / 10 and ours.activations < theirs.activations
    deeper = PlanConfig(d=d, n=n, k=32, batch=1024, dtype="float32", architecture="clt", n_layers=L + 1)
    assert flashsae_memory(deeper).weights > ours.weights * (7 * 8 / 2 + 7) / (6 * 7 / 2 + 6) * 0.99
    assert plan_module.main(["--architecture", "clt", "--n-layers", "6", "--d", "384", "--n", "8k", "--k", "32"]) == 0
    assert "CLT of 6 layers (n per layer) d=384, n=8,192" in capsys.readouterr().out
    with pytest.raises(ValueError, match="n_layers: a topk SAE has one layer"):
        PlanConfig(n_layers=3)
    with pytest.raises(ValueError, match="moments: the clt model covers moments elementwise only"):
        PlanConfig(architecture="clt", n_layers=2, moments="row")
    with pytest.raises(ValueError, match="architecture: expected one of topk, clt"):
        PlanConfig(architecture="gated")
