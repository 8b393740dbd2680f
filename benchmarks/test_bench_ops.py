"""The per-op benchmark suite: one case per op (test_topk_encode, test_sparse_decode, test_sae_loss),
each parametrized over stage, size and provider: torch_dense, torch_sparse (sparsify-style eager),
torch_gemm (the encoder's GEMM alone) and every flashsae backend available on the device (providers
and the work each op must do: flashsae.bench.op_cases). Before a provider is timed, its forward is
checked against torch_dense's on the same inputs.

    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json=ops.json
    python benchmarks/report.py ops.json --out DIR         # = flashsae bench --report ops.json --report-dir DIR

A new row is one line: a size in full_cases / tiny_cases, or an entry of op_cases.VARIANTS (the
flashsae op with extra keyword arguments, on every backend).
"""

import pytest

from flashsae.bench.op_cases import OpCase, check, make_call, make_inputs, providers, work
from suite_params import DEVICES, device_marks, full_run

STAGES = {"topk_encode": ("fwd", "fwd+bwd"), "sparse_decode": ("fwd", "fwd+bwd"), "sae_loss": ("fwd", "fwd+bwd")}


def full_cases(op: str, device: str) -> list[OpCase]:
    """Sizes for `--benchmark-only`: the CPU half takes minutes on this project's 2-core machine; the
    CUDA half (d = 4096, n up to 2^20) fits run_device.sh's time limits on an H200."""
    if device == "cpu":
        base = {"d": 768, "k": 32, "batch": 1024, "dtype": "float32"}
        n_sweep, mid, other_dtype = (4096, 8192, 16384, 32768), 16384, "bfloat16"
    else:
        base = {"d": 4096, "k": 64, "batch": 4096, "dtype": "bfloat16"}
        n_sweep, mid, other_dtype = (1 << 15, 1 << 17, 1 << 20), 1 << 17, "float32"
    k, batch = base["k"], base["batch"]

    def case(stage: str, n: int = mid, **change) -> OpCase:
        return OpCase(**({"op": op, "stage": stage, "n": n, "device": device} | base | change))

    cases = [case(stage, n) for n in n_sweep for stage in STAGES[op]]
    cases += [case(stage, dtype=other_dtype) for stage in STAGES[op]]
    if op == "topk_encode":
        cases += [case("fwd+bwd", batch=b) for b in (batch // 4, 4 * batch)]
        cases += [case("fwd", k=kk) for kk in (k // 2, 2 * k)]
        cases += [case(stage, aux_k=64) for stage in STAGES[op]]
    if op == "sparse_decode":
        cases += [case("fwd+bwd", k=kk) for kk in (k // 4, 4 * k)]
    if op == "sae_loss":
        cases += [case(stage, aux_k=64) for stage in STAGES[op]]
    if device == "cuda":
        if op == "topk_encode":  # the top-k kernel alone vs torch.topk, and narrow / tall encoder shapes
            cases += [case("select", n=1 << 17, d=1, batch=16384, k=kk) for kk in (32, 64, 256)]
            cases += [case("fwd", n=n, d=768, k=32, batch=b) for n, b in ((1 << 15, 4096), (1 << 17, 16384))]
            cases += [case("fwd", n=1 << 17, d=768, k=32, aux_k=384)]  # aux_k = d / 2: TopKSAE's default
        if op == "sparse_decode":
            cases += [case("fwd+bwd", batch=8192)]
    return cases


def tiny_cases(op: str, device: str) -> list[OpCase]:
    """One small call per case in CI."""
    cases = [OpCase(op, stage, 16, 96, 4, 32, "float32", device) for stage in STAGES[op]]
    if op != "sparse_decode":
        cases.append(OpCase(op, "fwd+bwd", 16, 96, 4, 32, "float32", device, aux_k=4))
    if op == "topk_encode" and device == "cuda":
        cases.append(OpCase(op, "select", 1, 96, 4, 32, "float32", device))
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    op = metafunc.function.__name__.removeprefix("test_")
    full = full_run(metafunc.config)
    params = []
    for device in DEVICES:
        cases = full_cases(op, device) if full else tiny_cases(op, device)
        sizes = sorted({c.n for c in cases})
        for case in cases:
            for provider in providers(case):
                if full and provider.startswith("flashsae-torch") and case.n != sizes[len(sizes) // 2]:
                    continue  # the pure-torch fallback is measured at one size: it is not the product
                params.append(pytest.param(case, provider, id=f"{case.name}-{provider}", marks=device_marks(device)))
    metafunc.parametrize(("case", "provider"), params)


def run_case(run_benchmark, case: OpCase, provider: str) -> None:
    inputs = make_inputs(case)
    check(case, provider, inputs)
    flop, moved = work(case)
    run_benchmark(make_call(case, provider, inputs), **case.as_dict(), provider=provider, flop=flop, bytes=moved)


def test_topk_encode(run_benchmark, case, provider):
    run_case(run_benchmark, case, provider)


def test_sparse_decode(run_benchmark, case, provider):
    run_case(run_benchmark, case, provider)


def test_sae_loss(run_benchmark, case, provider):
    run_case(run_benchmark, case, provider)
