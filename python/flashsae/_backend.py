"""Backend choice for every op.

Order of precedence: the ``backend=`` argument, then the ``FLASHSAE_BACKEND`` environment variable,
then ``auto``. ``auto`` picks, per op stage (forward or backward), the fastest backend with a kernel
for that stage on the tensors' device:

- CUDA tensor: ``cuda``, else ``triton``, else ``torch`` (CUDA stages still awaiting their first run
  on a GPU, :data:`CUDA_AWAITING_VALIDATION`, are skipped);
- CPU tensor: ``cpu``, else ``torch``;
- any other device: ``torch``.

An explicit choice that cannot run (module not built, no GPU, wrong device or dtype, no kernel for
the stage yet) raises :class:`~flashsae.errors.BackendUnavailableError`; it never falls back silently.

``triton`` runs on CUDA tensors in float32, bfloat16 or float16. Under the Triton interpreter
(``TRITON_INTERPRET=1`` before the first Triton kernel is imported) it also accepts CPU tensors: that
is how CI tests the kernels. ``auto`` never picks the interpreter (it is a test tool, not a fast path).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import _native
from .errors import BackendUnavailableError

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

#: Every op's dispatch table, ``{stage: {backend: fn}}``: what runs each stage (e.g. "topk_encode",
#: "topk_encode_backward") on each backend. Each op module registers its own at import
#: (:func:`register`); ``torch`` (pure PyTorch) implements every stage.
_DISPATCH: dict[str, dict[str, Callable[..., Any]]] = {}

#: The backends with compiled kernels, in the order of :data:`KERNELS`.
_COMPILED = ("cpu", "cuda", "triton")


def register(table: dict[str, dict[str, Callable[..., Any]]]) -> dict[str, dict[str, Callable[..., Any]]]:
    """Registers an op's dispatch table ``{stage: {backend: fn}}`` and returns it."""
    for stage, impls in table.items():
        unknown = set(impls) - set(BACKENDS[1:])
        if "torch" not in impls or unknown:
            raise ValueError(f"{stage}: a dispatch table needs a torch entry and known backends, got {sorted(impls)}")
        _DISPATCH[stage] = impls
    return table


def _dispatch_tables() -> dict[str, dict[str, Callable[..., Any]]]:
    """Every registered table; importing flashsae.ops registers them all."""
    importlib.import_module(f"{__package__}.ops")
    return _DISPATCH


def _all_registered() -> bool:
    """Whether flashsae.ops has finished importing (its __all__ comes after every op module)."""
    return hasattr(sys.modules.get(f"{__package__}.ops"), "__all__")


def __getattr__(name: str) -> Any:
    # KERNELS and CUDA_AWAITING_VALIDATION are derived from the dispatch tables on first read (the op
    # modules register after this module is imported) and then kept as plain module attributes.
    if name == "KERNELS":
        tables = _dispatch_tables()
        value: Any = {b: frozenset(s for s, impls in tables.items() if b in impls) for b in _COMPILED}
    elif name == "CUDA_AWAITING_VALIDATION":
        value = _derived("KERNELS")["cuda"]  # all of them, until validated on a GPU
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _all_registered():  # read while flashsae.ops is still importing: derive again next time
        globals()[name] = value
    return value


def _derived(name: str) -> Any:
    return globals()[name] if name in globals() else __getattr__(name)


#: Op stages each backend has a kernel for, ``{backend: frozenset(stages)}``, derived from the
#: dispatch tables (read as ``_backend.KERNELS``).
KERNELS: dict[str, frozenset[str]]

#: CUDA stages that CI compiles but that have not yet run on a GPU: every stage with a cuda kernel.
#: ``auto`` skips them on CUDA tensors (falling to triton, else torch); an explicit ``backend="cuda"``
#: (or FLASHSAE_BACKEND=cuda) still runs them, and FLASHSAE_AUTO_UNVALIDATED=1 lets ``auto`` pick them
#: too (benchmarks/run_device.sh sets it for its benchmark steps once the CUDA tests and
#: compute-sanitizer have passed in the same run). A stage leaves this set once tests/ops on a GPU
#: and compute-sanitizer (memcheck + racecheck; run_device.sh steps ``cuda`` and ``sanitize``) pass.
CUDA_AWAITING_VALIDATION: frozenset[str]

_DEVICE_OF = {"cpu": "cpu", "cuda": "cuda"}

#: The order ``auto`` tries, per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPES = TRITON_DTYPES


def triton_interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter: as decided when flashsae.kernels was
    imported, or (not imported yet) as TRITON_INTERPRET says now."""
    kernels = sys.modules.get("flashsae.kernels")
    if kernels is not None:
        return kernels.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else FLASHSAE_BACKEND, else "auto" (validated)."""
    name = backend if backend is not None else os.environ.get("FLASHSAE_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        source = "backend" if backend is not None else "FLASHSAE_BACKEND"
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name.lower()


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if not triton_installed():
        return "triton is not installed (pip install triton; it ships wheels for Linux)"
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return (
            f"it runs on cuda tensors and these are on {device} (CPU tensors only under the Triton "
            "interpreter, a test tool: TRITON_INTERPRET=1 before the first Triton kernel is imported)"
        )
    if dtype is not None and dtype not in TRITON_DTYPES:
        return (
            f"its kernels take float32, bfloat16 or float16 tensors and these are {str(dtype).removeprefix('torch.')}"
        )
    return None


def _unavailable_reason(backend: str, stage: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why `backend` cannot run `stage` on `device` (for tensors of `dtype`, when given), or None."""
    if backend == "torch":
        return None
    if backend == "triton":
        reason = _triton_reason(device, dtype)
        if reason is not None:
            return reason
    elif device.type != _DEVICE_OF[backend]:
        return f"it runs on {_DEVICE_OF[backend]} tensors and these are on {device}"
    if backend == "cuda" and not _native.cuda_module_available():
        return "flashsae was built without its CUDA module (rebuild with FLASHSAE_CUDA=ON and nvcc on PATH)"
    if backend == "cuda" and dtype is not None and dtype not in CUDA_DTYPES:
        return (
            f"its kernels take float32, bfloat16 or float16 tensors and these are {str(dtype).removeprefix('torch.')}"
        )
    if stage not in _derived("KERNELS")[backend]:
        return f"it has no kernel for {stage} yet"
    return None


def awaiting_validation(backend: str, stage: str) -> bool:
    """Whether ``auto`` skips `backend` for `stage` because its kernel has not run on a GPU yet
    (:data:`CUDA_AWAITING_VALIDATION`, unless FLASHSAE_AUTO_UNVALIDATED=1)."""
    if backend != "cuda" or stage not in _derived("CUDA_AWAITING_VALIDATION"):
        return False
    return os.environ.get("FLASHSAE_AUTO_UNVALIDATED", "0") != "1"


def available_backends(stage: str, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    """Backends ``auto`` may pick for `stage` on `device`, fastest first (never the Triton interpreter,
    nor a CUDA kernel awaiting its first GPU validation)."""
    order = _AUTO_ORDER.get(device.type, ("torch",))
    if "triton" in order and triton_interpreting():
        order = tuple(b for b in order if b != "triton")
    order = tuple(b for b in order if not awaiting_validation(b, stage))
    return [b for b in order if _unavailable_reason(b, stage, device, dtype) is None]


def resolve(stage: str, device: torch.device, requested: str, dtype: torch.dtype | None = None) -> str:
    """The backend that runs `stage` (e.g. "sparse_decode_backward") for tensors on `device` (and of
    `dtype`, which only the triton backend restricts)."""
    if requested == "auto":
        return available_backends(stage, device, dtype)[0]
    reason = _unavailable_reason(requested, stage, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f"flashsae backend {requested!r} cannot run {stage}: {reason}. "
            f"Backends that can: {', '.join(available_backends(stage, device, dtype))} "
            "(pass backend=... or set FLASHSAE_BACKEND; 'auto' picks the fastest)."
        )
    return requested


def dispatch(stage: str, device: torch.device, requested: str, dtype: torch.dtype | None = None) -> Callable[..., Any]:
    """The function of the registered dispatch table that runs `stage` for tensors on `device` (see
    :func:`resolve`)."""
    return _DISPATCH[stage][resolve(stage, device, requested, dtype)]
