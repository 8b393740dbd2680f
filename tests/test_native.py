"""The compiled modules: torch-free boundary, shared OpenMP pool, lazy CUDA module, C++ checks."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import flashsae
from flashsae import _C, _native
from helpers import binding_params


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
    args = merge_args(scores.data_ptr(), heap.data_ptr(), ids.data_ptr())
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= n_latents \(10\), got 11"):
        _C.topk_state_merge(**args | {"k": 11})
    with pytest.raises(ValueError, match=r"col0: tile \[5, 15\) leaves \[0, 10\)"):
        _C.topk_state_merge(**args | {"col0": 5})
    with pytest.raises(ValueError, match=r"heap_scores: null address"):
        _C.topk_state_merge(**args | {"heap_scores": 0})
    with pytest.raises(ValueError, match=r"dead_mask: null address"):
        _C.topk_state_merge(**args | {"aux_k": 2})
    with pytest.raises(ValueError, match=r"scores: unsupported dtype bfloat16 \(expected float32 or float64\)"):
        _C.topk_state_merge(**args | {"score_dtype": _C.DTYPE_BFLOAT16})


def merge_args(scores: int, heap: int, ids: int) -> dict:
    """Valid topk_state_merge arguments for a [4, 10] float32 tile, k = 3, no aux heap."""
    return {
        "scores": scores, "ld": 10, "rows": 4, "cols": 10, "col0": 0, "n_latents": 10, "heap_scores": heap,
        "heap_indices": ids, "k": 3, "dead_mask": 0, "aux_scores": 0, "aux_indices": 0, "aux_k": 0,
        "score_dtype": _C.DTYPE_FLOAT32,
    }  # fmt: skip


KERNEL_BINDINGS = [
    "topk_state_init", "topk_state_merge", "topk_state_finish", "sparse_decode_forward", "sparse_decode_backward",
    "topk_encode_backward", "sae_loss_forward", "sae_loss_backward", "sparse_adam", "sparse_adam_rowwise",
    "topk_select_host", "topk_finish_host", "topk_make_keys_host",
]  # fmt: skip


@pytest.mark.parametrize("name", KERNEL_BINDINGS)
def test_kernel_bindings_take_named_arguments_only(name):
    # addresses are plain ints: passed by position, two swapped ones would run without complaint
    fn = getattr(_C, name)
    params = binding_params(fn)
    assert params and fn.__doc__.startswith(f"{name}(*, {params[0]}: ")
    assert len(set(params)) == len(params) and not any(p.startswith("arg") for p in params)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        fn(*range(len(params)))
    with pytest.raises(TypeError, match="incompatible function arguments"):
        fn(**{p: 0 for p in params[:-1]}, not_an_argument=0)


def test_every_kernel_binding_is_checked():
    compiled = {name for name, fn in vars(_C).items() if callable(fn)} - {"openmp_max_threads"}
    assert compiled == set(KERNEL_BINDINGS)


def test_a_misspelled_keyword_is_refused():
    scores, heap, ids = torch.zeros(4, 10), torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int32)
    args = merge_args(scores.data_ptr(), heap.data_ptr(), ids.data_ptr())
    args["heap_ids"] = args.pop("heap_indices")
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _C.topk_state_merge(**args)


def test_version():
    assert flashsae.__version__ == "0.1.0"
