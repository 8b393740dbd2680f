"""The compiled modules: torch-free boundary, shared OpenMP pool, lazy CUDA module, C++ checks."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import flashsae
from flashsae import _C, _native


def test_openmp_pool_is_torchs():
    # torch's wheel ships libgomp with the system soname, so both share one pool and one setting
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.openmp_max_threads() == 1
        torch.set_num_threads(2)
        assert _C.openmp_max_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_import_does_not_load_the_cuda_module():
    code = "import sys, flashsae; print('flashsae._C_cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def cuda_module_built() -> bool:
    return importlib.util.find_spec("flashsae._C_cuda") is not None


def test_cuda_module_is_built_when_required():
    # .ci/run builds with FLASHSAE_CUDA=ON: there the module must exist (every .cu file compiled)
    if os.environ.get("FLASHSAE_CUDA", "").upper() == "ON":
        assert cuda_module_built()
    elif not cuda_module_built():
        pytest.skip("flashsae was built without its CUDA module (FLASHSAE_CUDA unset and no nvcc)")
    module = _native.cuda_module()
    assert module.device_count() == torch.cuda.device_count()  # 0 here: no driver, no GPU
    assert module.runtime_version() >= 12000
    for name in ("DTYPE_FLOAT32", "DTYPE_FLOAT64", "DTYPE_BFLOAT16", "DTYPE_FLOAT16"):
        assert getattr(module, name) == getattr(_C, name)


def test_dtype_codes_cover_the_supported_dtypes():
    assert set(_native.DTYPE_CODES) == {torch.float32, torch.float64, torch.bfloat16, torch.float16}
    assert len(set(_native.DTYPE_CODES.values())) == 4


def test_boundary_checks_sizes_before_running_a_kernel():
    scores = torch.zeros(4, 10)
    heap = torch.zeros(4, 3)
    ids = torch.zeros(4, 3, dtype=torch.int32)
    args = [scores.data_ptr(), 10, 4, 10, 0, 10, heap.data_ptr(), ids.data_ptr(), 3, 0, 0, 0, 0, _C.DTYPE_FLOAT32]
    tail = [_C.DTYPE_FLOAT32, 0, 0, 0, 0.0]  # chunk dtype, bias, row_bound, col_bound, rel
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= n_latents \(10\), got 11"):
        _C.topk_state_merge(*args[:8], 11, *args[9:], *tail)
    with pytest.raises(ValueError, match=r"col0: tile \[5, 15\) leaves \[0, 10\)"):
        _C.topk_state_merge(*args[:4], 5, *args[5:], *tail)
    with pytest.raises(ValueError, match=r"heap_scores: null address"):
        _C.topk_state_merge(*args[:6], 0, *args[7:], *tail)
    with pytest.raises(ValueError, match=r"dead_mask: null address"):
        _C.topk_state_merge(*args[:12], 2, _C.DTYPE_FLOAT32, *tail)
    with pytest.raises(ValueError, match=r"heap_scores: unsupported dtype bfloat16 \(expected float32 or float64\)"):
        _C.topk_state_merge(*args[:13], _C.DTYPE_BFLOAT16, *tail)
    with pytest.raises(ValueError, match=r"row_bound: given without col_bound"):
        _C.topk_state_merge(*args, _C.DTYPE_FLOAT32, 0, heap.data_ptr(), 0, 0.0)


def test_version():
    assert flashsae.__version__ == "0.1.0"
