"""The test harness tests/cuda_fake.py: it checks the ops' cuda glue only if its bindings take what
the real flashsae._C_cuda bindings take."""

import inspect

import pytest

import cuda_fake
from flashsae import _native
from helpers import binding_params


def test_the_fake_has_the_real_modules_bindings():
    if not _native.cuda_module_available():
        pytest.skip("flashsae was built without its CUDA module")
    real = _native.cuda_module()
    for name in cuda_fake.BINDINGS:
        fake = inspect.signature(getattr(cuda_fake.FakeCudaModule, name)).parameters.values()
        fake_names = [p.name for p in fake if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert binding_params(getattr(real, name)) == fake_names, name
    queries = {"device_count", "runtime_version"}
    kernels = {name for name, fn in vars(real).items() if callable(fn) and name not in queries}
    assert kernels == set(cuda_fake.BINDINGS)
    for name in ("TOPK_MAX_K", "TOPK_SLICE", "TOPK_CAPACITY"):
        assert getattr(real, name) == getattr(cuda_fake.FakeCudaModule, name)
