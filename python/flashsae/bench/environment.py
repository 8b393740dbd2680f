"""The machine and versions a benchmark result comes from (stored with every result)."""

from __future__ import annotations

import math
import platform
import re
import time
from typing import Any

import torch

from ..ops import _topk_encode_cpu


def environment() -> dict[str, Any]:
    """Date, Python / torch / oneDNN versions, the CPU (model, the bf16 matrix units torch's CPU
    GEMM can use, threads) and the GPU when one is visible."""
    flags = _cpu_flags()
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onednn": _onednn_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        # AMX tiles and AVX-512 BF16 are what make torch's bfloat16 GEMM on CPU fast (oneDNN)
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        # what precision="auto" goes by on this CPU (_topk_encode_cpu.AUTO_CERTIFIED_BELOW)
        "bf16_gemm_share": _finite_or_none(_topk_encode_cpu.bf16_gemm_share()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def describe(env: dict[str, Any]) -> str:
    """One line for a report header: date, device, CPU features, versions."""
    units = [name for name in ("amx_bf16", "avx512_bf16") if env.get(name)]
    cpu = f"{env.get('processor', 'unknown CPU')} ({env.get('cpu_threads', '?')} threads"
    cpu += f", {' + '.join(units)}" if units else ", no AMX / AVX-512 BF16"
    if env.get("bf16_gemm_share") is not None:
        cpu += f"; bf16 GEMM {env['bf16_gemm_share']:.2f}x the fp32 one's time"
    cpu += ")"
    versions = f"python {env.get('python')}, torch {env.get('torch')}, oneDNN {env.get('onednn') or 'unknown'}"
    if env.get("cuda"):
        versions += f", CUDA {env['cuda']}"
    device = f"{env['gpu']}, " if env.get("gpu") else ""
    return f"{env.get('date', '')}, {device}{cpu}, {versions}"


def precision_label(precision: str, dtype: torch.dtype, device: str) -> str:
    """`precision` for a report header, with what "auto" runs as on this machine's cpu backend."""
    if precision != "auto" or device != "cpu":
        return precision
    return f"auto (= {_topk_encode_cpu.resolve_precision(precision, dtype)} on this CPU)"


def _finite_or_none(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def _cpu_name() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.readlines()
    except OSError:
        return []


def _onednn_version() -> str | None:
    """oneDNN (named MKL-DNN in torch's build summary) version torch was built with, if any."""
    match = re.search(r"(?:MKL-DNN|oneDNN) v([0-9][0-9.]*)", torch.__config__.show())
    return match.group(1) if match else None
