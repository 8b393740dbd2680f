"""Argument validation: the one place that checks tensors before their addresses go to C++, and
the scalar checks every config and keyword argument uses (at the end of this module).

The compiled kernels trust the sizes and addresses they are given, so every public op calls these
checks first. Errors name the argument and say what was expected:

- ``TypeError`` for a non-tensor or a wrong dtype (integer or bool activations included:
  :func:`check_floating`),
- ``ValueError`` for a wrong shape, device, layout, an empty batch, NaN/Inf, or an out-of-range k.

Structural checks (:func:`check_tensor`, :func:`check_k`) look only at metadata, so they also run
while ``torch.compile`` traces. Value checks (:func:`check_finite`, the CUDA kernels' index-range
flag) read data and therefore run inside the ops' real implementations; ``FLASHSAE_VALUE_CHECKS=0``
skips them (on a GPU each one is a device-to-host sync). Memory safety does not depend on them: the
CPU kernels always range-check indices, and the CUDA kernels skip out-of-range ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)

VALUE_CHECKS = os.environ.get("FLASHSAE_VALUE_CHECKS", "1") != "0"


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _format_shape(shape: Mapping[str, int | None]) -> str:
    return "[" + ", ".join(name if size is None else f"{name}={size}" for name, size in shape.items()) + "]"


def check_tensor(
    name: str,
    value: object,
    *,
    shape: Mapping[str, int | None],
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    like: tuple[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Checks type, dtype, rank and sizes, device and contiguity of one argument.

    `shape` maps dimension names to required sizes (None: any size), e.g.
    ``{"n_latents": n, "d": d}``; the names appear in the error message. An empty tensor is
    rejected. `like` is ``(other_name, other)``: this argument must be on other's device and, unless
    `dtype` says otherwise, have other's dtype. Without both, any floating dtype is accepted.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtype is None:
        dtypes = FLOAT_DTYPES if like is None else (like[1].dtype,)
        source = "" if like is None else f" (the dtype of {like[0]})"
    else:
        dtypes, source = (dtype if isinstance(dtype, tuple) else (dtype,)), ""
    if value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}{source}, got {value.dtype}")
    if value.dim() != len(shape) or any(
        size is not None and actual != size for actual, size in zip(value.shape, shape.values(), strict=False)
    ):
        raise ValueError(f"{name}: expected shape {_format_shape(shape)}, got {list(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor {_format_shape(shape)}, got {list(value.shape)}")
    if like is not None and value.device != like[1].device:
        raise ValueError(f"{name}: expected a tensor on {like[1].device} (the device of {like[0]}), got {value.device}")
    if not value.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, got strides {value.stride()} for shape "
            f"{list(value.shape)}; call .contiguous() first"
        )
    return value


def check_floating(name: str, value: object) -> torch.Tensor:
    """A tensor of floating-point values (activations, latent values), else TypeError naming it.

    The modules cast floating inputs to their own dtype, but never integers or bools: token ids or a
    mask passed by mistake would otherwise be encoded as if they were activations (nn.Linear refuses
    them too)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor ({_dtype_names(FLOAT_DTYPES)}), got {value.dtype}")
    return value


def check_latents(latents: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of a latents pair: floating values and integer indices of one shape, else
    TypeError / ValueError naming ``latents.values`` or ``latents.indices``."""
    if not isinstance(latents, tuple) or len(latents) != 2:
        kind = type(latents).__name__
        raise TypeError(f"latents: expected a (values, indices) pair such as SparseLatents, got {kind}")
    values, indices = latents
    check_floating("latents.values", values)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"latents.indices: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"latents.indices: expected dtype {_dtype_names(INDEX_DTYPES)}, got {indices.dtype}")
    if values.dim() == 0 or values.shape != indices.shape:
        raise ValueError(
            f"latents: expected values and indices of one shape [..., slots], got {list(values.shape)} and "
            f"{list(indices.shape)}"
        )
    return values, indices


def check_k(name: str, k: object, n_latents: int, *, allow_zero: bool = False) -> int:
    """k must be an int with 1 <= k <= n_latents (0 allowed when `allow_zero`)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    low = 0 if allow_zero else 1
    if not low <= k <= n_latents:
        raise ValueError(f"{name}: expected {low} <= {name} <= n_latents ({n_latents}), got {k}")
    return k


def check_finite(name: str, value: torch.Tensor) -> None:
    """Rejects NaN and Inf (skipped when FLASHSAE_VALUE_CHECKS=0)."""
    if not VALUE_CHECKS or value.numel() == 0:
        return
    if not all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or Inf value(s); expected finite values")


def all_finite(value: torch.Tensor) -> bool:
    """Whether every element of the floating tensor is finite. The sum is finite when every element
    is (NaN and +-Inf propagate; Inf - Inf is NaN): one vectorized reduction, 1.2 ms against 7.6 ms
    for torch.aminmax and 50 ms for isfinite().all() on a [1820, 2304] float32 gradient (2 busy CPU
    cores). A sum that overflows (finite elements near the dtype's limit) falls back to the
    elementwise test, so the answer is exact either way. The sum stays in the tensor's own dtype:
    sum(dtype=float32) of a bf16 tensor first copies all of it to float32 on CPU (64 MiB extra for a
    [16384, 1024] bf16 gradient, which broke the memory plan), while a bf16 sum accumulates in float32
    internally with no copy; bf16 has float32's exponent range, and an fp16 overflow falls back."""
    if bool(torch.isfinite(value.sum())):
        return True
    return bool(torch.isfinite(value).all())


def narrow_indices(name: str, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Indices travel as int32 (the kernels' type). int64 input is range-checked, then narrowed, so
    a value past 2^31 cannot wrap into a valid latent. (int32 input is range-checked by the kernel.)"""
    if indices.dtype == torch.int32:
        return indices
    low, high = int(indices.min()), int(indices.max())
    if low < -1 or high >= n_latents:
        bad = low if low < -1 else high
        raise ValueError(
            f"{name}: index {bad} is out of range; expected a latent in [0, {n_latents}) or -1 for an empty slot"
        )
    return indices.to(torch.int32)


# ------------------------------------------------------------------------------ scalar arguments
# Config fields and keyword arguments. bool is an int subclass in Python, so every int or number
# check refuses True/False explicitly: `k=True` is a bug, not k=1. Each returns the checked value.


def is_number(value: object) -> bool:
    """Whether `value` is an int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    """value as an int >= 1, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value: object) -> int:
    """value as an int >= 0, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return value


def integer(name: str, value: object) -> int:
    """value as an int (any sign), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    return value


def non_negative(name: str, value: object, *, finite: bool = False) -> float:
    """value as a float >= 0 (NaN refused; inf too when `finite`), else ValueError naming it."""
    if not is_number(value) or not value >= 0 or (finite and value == math.inf):
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    return float(value)


def positive_number(name: str, value: object, *, expected: str = "a finite number > 0") -> float:
    """value as a finite float > 0, else ValueError naming it (and saying `expected`)."""
    if not is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def fraction(name: str, value: object, *, low_open: bool = False, high_closed: bool = False) -> float:
    """value as a float in [0, 1) (the bounds' openness adjustable), else ValueError naming it."""
    low_ok = is_number(value) and (value > 0 if low_open else value >= 0)
    if not low_ok or not (value < 1 or (high_closed and value == 1)):
        bounds = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
        raise ValueError(f"{name}: expected a number in {bounds}, got {value!r}")
    return float(value)


def boolean(name: str, value: object, *, error: type[Exception] = ValueError) -> bool:
    """value as a bool, else `error` naming it (1 and "yes" are refused: JSON keeps bools as bools)."""
    if not isinstance(value, bool):
        raise error(f"{name}: expected True or False, got {value!r}")
    return value


def choice(name: str, value: object, choices: tuple[object, ...]) -> object:
    """value if it is one of `choices`, else ValueError naming it and listing them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def text(name: str, value: object, *, optional: bool = False) -> str | None:
    """value as a non-empty string (None too when `optional`), else ValueError naming it."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    return value
