"""The test harness tests/cuda_fake.py: it checks the ops' cuda glue only if its bindings take what
the real flashsae._C_cuda bindings take."""

import inspect

import pytest

import cuda_fake
from flashsae import _native


def test_the_fake_has_the_real_modules_bindings():
    if not _native.cuda_module_available():
        pytest.skip("flashsae was built without its CUDA module")
    real = _native.cuda_module()
    for name in cuda_fake.BINDINGS:
        doc = getattr(real, name).__doc__.splitlines()[0]  # "name(arg0: int, arg1: bool, ...) -> None"
        fake_arity = len(inspect.signature(getattr(cuda_fake.FakeCudaModule, name)).parameters) - 1
        assert doc.count("arg") == fake_arity, f"{name}: real {doc} vs fake arity {fake_arity}"
    for name in ("TOPK_MAX_K", "TOPK_SLICE", "TOPK_CAPACITY"):
        assert getattr(real, name) == getattr(cuda_fake.FakeCudaModule, name)
