"""Peak memory of a device: torch's allocator on CUDA, the process's peak resident set on CPU."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch


class PeakMemory:
    """Peak memory since the last reset(): torch.cuda on CUDA, else the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as handle:  # "5": reset VmHWM to the current RSS
                handle.write("5")

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM")

    def added_by(self, fn: Callable[[], Any]) -> int:
        """Peak bytes one call of fn adds to what is resident before it (never negative).

        The garbage collector is run first and paused during fn: a collection that frees earlier
        tensors while fn allocates lowers the resident set by what it freed, and on CPU a 64 MiB
        allocation then read as 0 bytes added (seen in a full test run)."""
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            before = self.current()
            self.reset()
            fn()
            return max(0, self.peak() - before)
        finally:
            if collecting:
                gc.enable()


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")
