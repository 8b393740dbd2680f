"""The one timer of every flashsae benchmark: wall clock (time.perf_counter) around a call that
waits for the device, so queued GPU work is inside the interval (a CUDA launch returns before its
kernels finish). The pytest suites hand the same synchronized call to pytest-benchmark, whose
default clock is the same perf_counter."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def synchronized(fn: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """fn, followed by a wait for the device's queued work (no wait on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def call() -> Any:
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def time_ms(fn: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int = 0) -> list[float]:
    """Milliseconds of `repeats` synchronized calls of fn, after `warmup` untimed ones."""
    call = synchronized(fn, device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # work queued before us is not ours
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        if not samples:
            raise ValueError("samples: expected at least one measurement")
        return cls(statistics.median(samples), min(samples), max(samples))

    def format(self, digits: int = 1) -> str:
        """'812.3 (790.1-830.2)'; the range is left out for a single sample."""
        text = f"{self.median:.{digits}f}"
        if self.high > self.low:
            text += f" ({self.low:.{digits}f}-{self.high:.{digits}f})"
        return text
