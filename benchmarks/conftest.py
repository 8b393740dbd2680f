"""Benchmark conventions.

``pytest benchmarks/ --benchmark-only`` times every suite at the sizes that fit the machine (CPU
always, CUDA when a GPU is visible); each suite chooses its sizes in its own
``pytest_generate_tests``. A plain ``pytest`` run (CI) executes each benchmark once at a tiny size,
so the suites cannot rot, and reports no timings worth reading; CUDA cases skip without a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import, as in tests/

import pytest

from suite_params import ROUNDS, full_run

_PEAKS: dict[tuple[str, str], dict[str, float]] = {}


def machine_peaks(device: str, dtype: str) -> dict[str, float]:
    """GEMM FLOP/s and copy bandwidth of the device, measured once per session and dtype."""
    from flashsae.bench.op_cases import calibrate

    if (device, dtype) not in _PEAKS:
        _PEAKS[(device, dtype)] = calibrate(device, dtype)
    return _PEAKS[(device, dtype)]


@pytest.fixture
def run_benchmark(benchmark, request):
    """run_benchmark(fn, **info): one warm-up call, the peak memory one call adds, then
    pytest-benchmark timing of the synchronized call (flashsae.bench.timer) under --benchmark-only
    or a single call otherwise. info (op, stage, sizes, dtype, device, provider, flop, bytes, ...), the peak memory
    and, in a timing run, the machine's peaks land in the row's extra_info (read by report.py).
    Returns fn's last result."""
    from flashsae.bench import PeakMemory, synchronized

    def run(fn, **info):
        device = info["device"]
        call = synchronized(fn, device)
        call()  # warm-up: allocator, first-touch pages, kernel compilation
        peak_bytes = PeakMemory(device).added_by(call)
        if full_run(request.config):
            result = benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
            info |= machine_peaks(device, info["dtype"])
        else:
            result = benchmark.pedantic(call, rounds=1, iterations=1)
        benchmark.extra_info.update(info, peak_bytes=peak_bytes)
        return result

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions, CPU features and devices the numbers come from, in the JSON's machine_info."""
    from flashsae.bench import environment

    machine_info["flashsae_environment"] = environment()
