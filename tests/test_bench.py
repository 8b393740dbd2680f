"""flashsae.bench: the timer, the memory meter, the environment record, the per-op providers and the
check that runs before a provider is timed."""

import subprocess
import sys

import pytest
import torch

from flashsae.bench import Spread, environment, op_cases, time_ms
from flashsae.bench.environment import describe
from flashsae.bench.op_cases import OpCase


def test_spread_and_time_ms():
    spread = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (spread.median, spread.low, spread.high) == (2.5, 1.0, 10.0)
    assert spread.format() == "2.5 (1.0-10.0)"
    assert Spread.of([4.0]).format(2) == "4.00"
    with pytest.raises(ValueError, match="samples"):
        Spread.of([])
    calls = []
    times = time_ms(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)


def test_peak_memory_sees_an_allocation():
    # In a fresh interpreter: the CPU meter reads the process's resident set, which threads and
    # buffers left behind by earlier tests in this process can lower while fn allocates.
    script = (
        "import torch; from flashsae.bench import PeakMemory; "
        "print(PeakMemory('cpu').added_by(lambda: torch.ones((64 << 20) // 4).sum()))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    size = 64 << 20
    added = int(done.stdout.split()[-1])
    assert size * 0.9 <= added <= size * 4


def test_environment_names_the_cpu_and_its_bf16_units():
    env = environment()
    assert env["processor"] and env["torch"] == torch.__version__
    assert isinstance(env["amx_bf16"], bool) and isinstance(env["avx512_bf16"], bool)
    line = describe(env)
    assert env["processor"] in line and f"torch {torch.__version__}" in line
    assert ("amx_bf16" in line) == env["amx_bf16"]
    assert "no AMX / AVX-512 BF16" in describe({**env, "amx_bf16": False, "avx512_bf16": False})
    assert f"bf16 GEMM {env['bf16_gemm_share']:.2f}x the fp32 one's time" in line


def test_report_headers_say_what_auto_runs_as(monkeypatch):
    from flashsae.bench.environment import precision_label
    from flashsae.ops import _topk_encode_cpu

    monkeypatch.setattr(_topk_encode_cpu, "bf16_gemm_share", lambda: 0.3)
    assert precision_label("auto", torch.float32, "cpu") == "auto (= certified on this CPU)"
    monkeypatch.setattr(_topk_encode_cpu, "bf16_gemm_share", lambda: 3.0)
    assert precision_label("auto", torch.float32, "cpu") == "auto (= exact on this CPU)"
    assert precision_label("certified", torch.float32, "cpu") == "certified"
    assert precision_label("auto", torch.float32, "cuda") == "auto"


def test_providers_per_stage(monkeypatch):
    fwd = op_cases.providers(OpCase("topk_encode", "fwd", 16, 96, 4, 32))
    assert fwd[:3] == ["torch_dense", "torch_sparse", "torch_gemm"] and "flashsae-cpu" in fwd
    assert "torch_gemm" not in op_cases.providers(OpCase("topk_encode", "fwd+bwd", 16, 96, 4, 32))
    monkeypatch.setitem(op_cases.VARIANTS, "sparse_decode", {"fast": {}, "amp": {"autocast": "bfloat16"}})
    case = OpCase("sparse_decode", "fwd+bwd", 16, 96, 4, 32)
    names = op_cases.providers(case)
    assert {"flashsae-cpu", "flashsae-cpu-fast", "flashsae-cpu-amp", "flashsae-torch-amp"} <= set(names)
    inputs = op_cases.make_inputs(case)
    op_cases.check(case, "flashsae-torch-amp", inputs)
    # a variant limited to some backends: the certified top-k has a low-precision pass on cpu only
    assert "flashsae-cpu-certified" in fwd and "flashsae-torch-certified" not in fwd
    op_cases.make_call(case, "flashsae-torch-amp", inputs)()
    with pytest.raises(ValueError, match="stage"):
        OpCase("sae_loss", "select", 16, 96, 4, 32)
    with pytest.raises(ValueError, match="aux_k"):
        OpCase("sparse_decode", "fwd", 16, 96, 4, 32, aux_k=2)


@pytest.mark.parametrize("op", ["topk_encode", "sparse_decode", "sae_loss"])
def test_every_provider_passes_the_check_and_its_call_runs(op):
    for aux_k in (0, 3) if op != "sparse_decode" else (0,):
        for stage in ("fwd", "fwd+bwd"):
            case = OpCase(op, stage, 24, 200, 5, 33, aux_k=aux_k)
            inputs = op_cases.make_inputs(case)
            for provider in op_cases.providers(case):
                op_cases.check(case, provider, inputs)
                op_cases.make_call(case, provider, inputs)()


def test_check_catches_a_wrong_result(monkeypatch):
    case = OpCase("sparse_decode", "fwd", 16, 96, 4, 32)
    inputs = op_cases.make_inputs(case)
    op_cases.check(case, "flashsae-cpu", inputs)
    monkeypatch.setattr(op_cases, "sparse_decode", lambda values, indices, W, b, **_: torch.zeros(32, 16) + b)
    with pytest.raises(AssertionError, match="sparse_decode .* flashsae-cpu: max error"):
        op_cases.check(case, "flashsae-cpu", inputs)
