"""Each op stage per provider, side by side (DESIGN.md §6): torch_dense, torch_sparse
(sparsify-style eager) and every flashsae backend available on the device.

Rows carry, in extra_info, the case, the op's own work (flop, bytes: flashsae.bench_ops.work), the
peak memory one call adds, and the machine's peaks measured in the same session, from which
`benchmarks/report.py` derives speedups vs torch_dense and roofline fractions.

    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json=ops.json
"""

import pytest
import torch

from flashsae.bench_ops import OpCase, calibrate, make_call, make_inputs, providers, work
from flashsae.benchmarking import PeakMemory

ALL_STAGES = [
    ("topk_encode", "fwd"),
    ("topk_encode", "fwd+bwd"),
    ("sparse_decode", "fwd"),
    ("sparse_decode", "fwd+bwd"),
    ("sae_loss", "fwd"),
    ("sae_loss", "fwd+bwd"),
]


def full_cases(device: str) -> list[OpCase]:
    """Sizes for `--benchmark-only`: on this project's 2-core CPU the whole file runs in ~5 minutes."""
    if device == "cpu":
        d, k, batch, n_sweep, dtype = 768, 32, 1024, (4096, 8192, 16384, 32768), "float32"
        extra_dtype, mid = "bfloat16", 16384
    else:
        d, k, batch, n_sweep, dtype = 4096, 64, 4096, (1 << 15, 1 << 17, 1 << 20), "bfloat16"
        extra_dtype, mid = "float32", 1 << 17
    cases = [OpCase(op, stage, d, n, k, batch, dtype, device) for n in n_sweep for op, stage in ALL_STAGES]
    cases += [OpCase(op, stage, d, mid, k, batch, extra_dtype, device) for op, stage in ALL_STAGES]
    cases += [OpCase("sparse_decode", "fwd+bwd", d, mid, kk, batch, dtype, device) for kk in (k // 4, 4 * k)]
    cases += [OpCase("topk_encode", "fwd+bwd", d, mid, k, b, dtype, device) for b in (batch // 4, 4 * batch)]
    return cases


def tiny_cases(device: str) -> list[OpCase]:
    return [OpCase(op, stage, 16, 96, 4, 32, "float32", device) for op, stage in ALL_STAGES]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    full = bool(metafunc.config.getoption("benchmark_only"))
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    params = []
    for device in devices:
        cases = full_cases(device) if full else tiny_cases(device)
        mid_n = sorted({c.n for c in cases})[len({c.n for c in cases}) // 2]
        for case in cases:
            for provider in providers(case):
                if full and provider == "flashsae-torch" and case.n != mid_n:
                    continue  # the pure-torch fallback is measured at one size: it is not the product
                params.append(pytest.param(case, provider, id=f"{case.name}-{provider}"))
    metafunc.parametrize(("case", "provider"), params)


_PEAKS: dict[tuple[str, str], dict[str, float]] = {}


def machine_peaks(device: str, dtype: str) -> dict[str, float]:
    if (device, dtype) not in _PEAKS:
        _PEAKS[(device, dtype)] = calibrate(device, dtype)
    return _PEAKS[(device, dtype)]


def test_op(run_benchmark, benchmark, request, case, provider):
    inputs = make_inputs(case)
    call = make_call(case, provider, inputs)
    device = torch.device(case.device)

    def timed() -> None:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timed()  # warm-up (allocator, first-touch pages, kernel compilation)
    memory = PeakMemory(device)
    before = memory.current()
    memory.reset()
    timed()
    peak_bytes = max(0, memory.peak() - before)
    run_benchmark(timed)
    flop, moved = work(case)
    benchmark.extra_info.update(case.as_dict(), provider=provider, flop=flop, bytes=moved, peak_bytes=peak_bytes)
    if request.config.getoption("benchmark_only"):
        benchmark.extra_info.update(machine_peaks(case.device, case.dtype))
