"""Benchmark conventions (DESIGN.md §6).

``pytest benchmarks/ --benchmark-only`` times every suite at the sizes that fit this machine (CPU
always, CUDA when a GPU is visible). A plain ``pytest`` run (CI) executes each benchmark once at a
tiny size, so the suites cannot rot, and reports no timings.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import, as in tests/

import pytest
import torch

#: (d_in, n_latents, k, batch). The first full size is the bar of the foundation issue.
FULL_SIZES = {
    "cpu": [(768, 24576, 32, 1024), (768, 8192, 32, 1024)],
    "cuda": [(768, 32768, 32, 4096), (4096, 131072, 64, 4096)],
}
TINY_SIZES = [(16, 96, 4, 32)]


def benchmarking(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only"))


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" in metafunc.fixturenames:
        full = benchmarking(metafunc.config)
        cases = [
            pytest.param(device, size, id=f"{device}-d{size[0]}-n{size[1]}-k{size[2]}-b{size[3]}")
            for device in devices()
            for size in (FULL_SIZES[device] if full else TINY_SIZES)
        ]
        metafunc.parametrize(("size_device", "size"), cases)


@pytest.fixture
def run_benchmark(benchmark, request):
    """run_benchmark(fn): pytest-benchmark timing under --benchmark-only, a single call otherwise."""

    def run(fn):
        if benchmarking(request.config):
            return benchmark(fn)
        return benchmark.pedantic(fn, rounds=1, iterations=1)

    return run
