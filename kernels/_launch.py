"""What every launcher shares: interpreter detection, power-of-two sizes, the SM count, dot precision.

Block sizes are chosen per mode. On a GPU they are sized for sm_80 / sm_90 (tl.dot tiles of at
least 16 in every dimension, fp32 accumulators that fit the register file); under the CPU
interpreter (``TRITON_INTERPRET=1``) every statement costs a numpy call per program, so the
interpreter configs use few, large programs and a single config, which keeps CI fast.
"""

from __future__ import annotations

import os

import torch
import triton


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads its settings through knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: Whether the kernels below were decorated for the interpreter (read once, at import: triton.jit
#: decides between a compiled and an interpreted function when the kernel module is imported).
INTERPRETED: bool = _interpreting()


def next_pow2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def log2(value: int) -> int:
    """log2 of a power of two."""
    assert value > 0 and value & (value - 1) == 0, value
    return value.bit_length() - 1


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 on an H100/H200 SXM); 1 under the interpreter."""
    if INTERPRETED or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") unless torch itself allows TF32 for float32
    matmuls (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision("high")), in which
    case the encoder GEMM uses TF32 like torch's would. 16-bit inputs ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def check_int32_addressable(name: str, count: int) -> None:
    """Flat slot ids travel as int32 (sorted pair ids, per-row offsets)."""
    if count >= 2**31:
        raise ValueError(f"{name}: {count} elements; the Triton kernels index at most 2^31 - 1 slots per call")
