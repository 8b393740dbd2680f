"""Backend choice for every op (DESIGN.md §3).

Order of precedence: the ``backend=`` argument, then the ``FLASHSAE_BACKEND`` environment variable,
then ``auto``. ``auto`` picks, per op stage (forward or backward), the fastest backend with a kernel
for that stage on the tensors' device:

- CUDA tensor: ``cuda``, else ``triton``, else ``torch``;
- CPU tensor: ``cpu``, else ``torch``;
- any other device: ``torch``.

An explicit choice that cannot run (module not built, no GPU, wrong device, no kernel for the stage
yet) raises :class:`~flashsae.errors.BackendUnavailableError`; it never falls back silently.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _native
from .errors import BackendUnavailableError

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

#: Op stages each backend has a kernel for. ``torch`` (pure PyTorch) implements every stage.
KERNELS: dict[str, frozenset[str]] = {
    "cpu": frozenset(
        {
            "topk_encode",
            "topk_encode_backward",
            "sparse_decode",
            "sparse_decode_backward",
            "sae_loss",
            "sae_loss_backward",
        }
    ),
    "cuda": frozenset({"sparse_decode"}),
    "triton": frozenset(),
}

_DEVICE_OF = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else FLASHSAE_BACKEND, else "auto" (validated)."""
    name = backend if backend is not None else os.environ.get("FLASHSAE_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        source = "backend" if backend is not None else "FLASHSAE_BACKEND"
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name.lower()


def _unavailable_reason(backend: str, stage: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `stage` on `device`, or None when it can."""
    if backend == "torch":
        return None
    if device.type != _DEVICE_OF[backend]:
        return f"it runs on {_DEVICE_OF[backend]} tensors and these are on {device}"
    if backend == "cuda" and not _native.cuda_module_available():
        return "flashsae was built without its CUDA module (rebuild with FLASHSAE_CUDA=ON and nvcc on PATH)"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if stage not in KERNELS[backend]:
        return f"it has no kernel for {stage} yet"
    return None


def available_backends(stage: str, device: torch.device) -> list[str]:
    """Backends that can run `stage` on `device`, fastest first."""
    return [b for b in ("cuda", "triton", "cpu", "torch") if _unavailable_reason(b, stage, device) is None]


def resolve(stage: str, device: torch.device, requested: str) -> str:
    """The backend that runs `stage` (e.g. "sparse_decode_backward") for tensors on `device`."""
    if requested == "auto":
        return available_backends(stage, device)[0]
    reason = _unavailable_reason(requested, stage, device)
    if reason is not None:
        raise BackendUnavailableError(
            f"flashsae backend {requested!r} cannot run {stage}: {reason}. "
            f"Backends that can: {', '.join(available_backends(stage, device))} "
            "(pass backend=... or set FLASHSAE_BACKEND; 'auto' picks the fastest)."
        )
    return requested
