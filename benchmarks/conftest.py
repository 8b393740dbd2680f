"""Benchmark conventions (DESIGN.md §6).

``pytest benchmarks/ --benchmark-only`` times every suite at the sizes that fit this machine (CPU
always, CUDA when a GPU is visible); each suite chooses its sizes in its own
``pytest_generate_tests``. A plain ``pytest`` run (CI) executes each benchmark once at a tiny size,
so the suites cannot rot, and reports no timings worth reading.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import, as in tests/

import pytest


@pytest.fixture
def run_benchmark(benchmark, request):
    """run_benchmark(fn): pytest-benchmark timing under --benchmark-only, a single call otherwise."""

    def run(fn):
        if request.config.getoption("benchmark_only"):
            return benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
        return benchmark.pedantic(fn, rounds=1, iterations=1)

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions and devices the numbers come from, in the JSON's machine_info (read by report.py)."""
    from flashsae.benchmarking import environment

    machine_info["flashsae_environment"] = environment()
