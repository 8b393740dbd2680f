"""What the benchmark suites share when they choose their cases (imported by the suites and conftest)."""

import pytest
import torch

#: Timed rounds per benchmark under --benchmark-only (after one warm-up round).
ROUNDS = 3
DEVICES = ("cpu", "cuda")


def full_run(config: pytest.Config) -> bool:
    """Whether this is a timing run (--benchmark-only) rather than CI's one tiny call per case."""
    return bool(config.getoption("benchmark_only"))


def device_marks(device: str) -> list:
    """CUDA cases are collected everywhere (so CI lists them) and skip without a GPU."""
    if device != "cuda":
        return []
    return [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
