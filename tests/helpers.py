"""Shared test helpers: tolerances, input factories and checks against float64 references."""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashsae import _backend, _native

CPU_BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

#: Relative tolerance (to the largest reference magnitude) per dtype: a few roundings of the storage dtype
#: (float32 accumulation throughout, float64 for float64 storage).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

#: (rows, d, n_latents, k): odd sizes, k = 1, k = n, a single row.
SIZES = [(37, 97, 1000, 7), (6, 16, 64, 1), (9, 33, 50, 50), (1, 8, 300, 3)]
SIZE_IDS = ["odd", "k1", "k_eq_n", "one_row"]


def binding_params(fn) -> list[str]:
    """Parameter names of a compiled (pybind11) function, read from the signature line of its docstring
    ("name(*, x: int, rows: int) -> None")."""
    first = fn.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", first[first.index("(") + 1 : first.rindex(")")])


def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def sae_tensors(rows: int, d: int, n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """x, W_enc, b_enc, b_dec, W_dec in `dtype`, scaled like a real SAE (pre-activations ~ N(0, 1))."""
    return {
        "x": randn(rows, d, dtype=dtype),
        "W_enc": randn(n, d, scale=d**-0.5, dtype=dtype),
        "b_enc": randn(n, scale=0.1, dtype=dtype),
        "b_dec": randn(d, scale=0.1, dtype=dtype),
        "W_dec": randn(n, d, scale=d**-0.5, dtype=dtype),
    }


def f64(tensors: dict[str, torch.Tensor], requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """The same values in float64 (the reference's precision)."""
    return {k: v.detach().double().requires_grad_(requires_grad) for k, v in tensors.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """max |actual - expected| <= RTOL[dtype] * max |expected| (expected in float64)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (an unwritten, poisoned output?)"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-12)
    assert err <= RTOL[dtype] * scale, f"{what}: max error {err:.3e} > {RTOL[dtype]:.0e} x scale {scale:.3e}"


def assert_valid_topk(
    activations: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype, what: str = "topk"
) -> None:
    """values/indices [rows, k] are a correct top-k of `activations` [rows, n] (float64, already
    relu'd and masked) up to rounding: indices distinct and valid, values sorted and equal to the
    activations they name, and no unselected activation larger than a selected one beyond tolerance."""
    k = values.shape[1]
    n = activations.shape[1]
    assert indices.dtype == torch.int32, f"{what}: indices dtype {indices.dtype}"
    assert ((indices >= 0) & (indices < n)).all(), f"{what}: index outside [0, {n})"
    assert all(len(set(r.tolist())) == k for r in indices), f"{what}: repeated index in a row"
    v = values.double()
    assert torch.isfinite(v).all(), f"{what}: non-finite values"
    assert (v[:, :-1] >= v[:, 1:]).all(), f"{what}: values not sorted descending"
    tol = RTOL[dtype] * max(activations.abs().max().item(), 1e-12)
    named = activations.gather(1, indices.long())
    assert (v - named).abs().max() <= tol, f"{what}: values differ from the activations of their indices"
    if k < n:
        unselected = activations.scatter(1, indices.long(), float("-inf"))
        assert (unselected.max(1).values <= named.min(1).values + tol).all(), f"{what}: a better latent was skipped"


class LargestTensorMode(TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.largest_op = t.numel(), str(func)
        return out


class OpOperands(TorchDispatchMode):
    """Records every flashsae op that runs while active: (op name, {argument: dtype}) of its floating
    tensor arguments, as the op's implementation receives them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "flashsae":
            names = [a.name for a in func._schema.arguments]
            bound = dict(zip(names, args, strict=False)) | kwargs
            floats = {k: v.dtype for k, v in bound.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
            self.calls.append((func._schema.name.removeprefix("flashsae::"), floats))
        return func(*args, **kwargs)

    def dtypes(self, op: str) -> list[dict[str, torch.dtype]]:
        found = [floats for name, floats in self.calls if name == op]
        assert found, f"{op} never ran (ran: {sorted({name for name, _ in self.calls})})"
        return found


def assert_received(mode: OpOperands, op: str, dtype: torch.dtype, names) -> None:
    """Every recorded call of `op` received each of `names` it was given in `dtype` (and some call was
    given each of them)."""
    calls = mode.dtypes(op)
    for name in names:
        assert any(name in floats for floats in calls), f"{op} was never given {name}"
    for floats in calls:
        for name in names:
            if name in floats:
                assert floats[name] == dtype, f"{op} received {name} in {floats[name]}, expected {dtype}"


# ------------------------------------------------------------------------------------- backends
#
# The backends every op test runs on, as one parametrization. A test takes the ``be`` fixture
# (tests/ops/conftest.py: ``Backend(name, device)``) parametrized with :func:`backends` or
# :func:`backends_and_dtypes` (which leaves out float64 where a backend has no float64 kernels):
#
# - ``cpu`` and ``torch``: CPU tensors;
# - ``triton``: CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py),
#   CUDA tensors when the interpreter is off and a GPU is visible; skipped otherwise;
# - ``cuda``: CUDA tensors through flashsae._C_cuda's kernels (skipped without a GPU and the module);
# - ``cuda_fake``: the cuda backend on CPU tensors through tests/cuda_fake.py, which stands in for
#   the kernels with torch, so CI checks the ops' cuda glue (argument order, sizes, strides,
#   chunking, select state, segment sorting, gradient plumbing) on every run.

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRETING = _backend.triton_interpreting()
TRITON_READY = _backend.triton_installed() and (INTERPRETING or torch.cuda.is_available())
GPU_READY = torch.cuda.is_available() and _native.cuda_module_available()
ALL_BACKENDS = ("cpu", "torch", "triton", "cuda", "cuda_fake")

_MARKS = {
    "cpu": [],
    "torch": [],
    "triton": [pytest.mark.skipif(not TRITON_READY, reason="triton needs a CUDA GPU or TRITON_INTERPRET=1")],
    "cuda": [pytest.mark.cuda, pytest.mark.skipif(not GPU_READY, reason="needs a CUDA GPU + _C_cuda")],
    "cuda_fake": [],
}
#: Backends whose kernels take float32 / bfloat16 / float16 only.
_GPU_BACKENDS = ("triton", "cuda", "cuda_fake")


class Backend(NamedTuple):
    name: str
    """What the op is called with (``backend=``)."""
    device: torch.device
    """Where its tensors live."""


def backends(*names: str) -> list:
    """pytest params for the ``be`` fixture (parametrize ``"be"`` with ``indirect=True``)."""
    return [pytest.param(name, marks=_MARKS[name], id=name) for name in names]


def backends_and_dtypes(names=ALL_BACKENDS, dtypes=DTYPES) -> list:
    """pytest params ``(be, dtype)``: every backend with every dtype it takes (parametrize
    ``"be, dtype"`` with ``indirect=["be"]``)."""
    return [
        pytest.param(name, dtype, marks=_MARKS[name], id=f"{name}-{str(dtype).removeprefix('torch.')}")
        for name in names
        for dtype in dtypes
        if not (name in _GPU_BACKENDS and dtype == torch.float64)
    ]


def on(device: torch.device, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in t.items()}
