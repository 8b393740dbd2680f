"""flashsae._C_cuda's host boundary, without a GPU: every binding checks its sizes and addresses before
any CUDA call (ValueError naming the argument), and a CUDA failure surfaces as a RuntimeError.

Needs the module built (CI builds with FLASHSAE_CUDA=ON); no GPU or driver is used.
"""

import pytest
import torch

from flashsae import _native

pytestmark = pytest.mark.skipif(not _native.cuda_module_available(), reason="built without flashsae._C_cuda")

F32, F64, BF16 = (_native.DTYPE_CODES[t] for t in (torch.float32, torch.float64, torch.bfloat16))
A = 4096  # a stand-in address: the checks never dereference it


@pytest.fixture
def cuda():
    return _native.cuda_module()


def select_args(**over):
    args = {
        "scores": A, "score_dtype": BF16, "ld": 100, "rows": 8, "cols": 100, "col0": 0, "bias": 0, "relu": True,
        "state": A, "k": 16, "dead_mask": 0, "aux_state": 0, "aux_k": 0, "device": 0, "stream": 0,
    }  # fmt: skip
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"k": 2049}, r"k: expected 1 <= k <= 2048, got 2049"),
        ({"k": 0}, r"k: expected 1 <= k <= 2048, got 0"),
        ({"aux_k": 2049}, r"aux_k: expected 0 <= aux_k <= 2048"),
        ({"aux_k": 4, "aux_state": A}, r"dead_mask: null address"),
        ({"aux_k": 4, "dead_mask": A}, r"aux_state: null address"),
        ({"ld": 99}, r"ld: expected 100 <= ld"),
        ({"col0": 2**31 - 100}, r"col0: expected 0 <= col0 <= 2147483547"),
        ({"rows": 0}, r"rows: expected 1 <= rows"),
        ({"score_dtype": F64}, r"scores: unsupported dtype float64 on CUDA"),
        ({"state": 0}, r"state: null address"),
    ],
)
def test_topk_select_checks(cuda, over, message):
    with pytest.raises(ValueError, match=message):
        cuda.topk_select(*select_args(**over))


def test_topk_finish_checks(cuda):
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= 2048, got 3000"):
        cuda.topk_finish(A, 4, 3000, A, A, F32, 0, 0)
    with pytest.raises(ValueError, match=r"values: unsupported dtype float64"):
        cuda.topk_finish(A, 4, 30, A, A, F64, 0, 0)


def test_row_kernel_checks(cuda):
    with pytest.raises(ValueError, match=r"n_latents: expected 1 <= n_latents <= 2147483647, got 2147483648"):
        cuda.gather_rows(A, 0, A, 4, 2, A, 2**31, 8, 0, A, False, A, F32, 0, 0)
    with pytest.raises(ValueError, match=r"indices: null address"):
        cuda.dot_rows(A, True, 0, 4, 2, A, 10, 8, A, A, BF16, 0, 0)
    with pytest.raises(ValueError, match=r"K1: expected 1 <= K1 <= 5, got 6"):
        cuda.segment_rows(A, A, 10, 4, 5, 6, A, 0, A, 0, False, 0, 8, A, 0, F32, 0, 0)
    with pytest.raises(ValueError, match=r"R2: null address"):
        cuda.segment_rows(A, A, 10, 4, 5, 3, A, 0, A, 0, False, 0, 8, A, 0, F32, 0, 0)
    with pytest.raises(ValueError, match=r"d: expected 1 <= d <= 16776960"):
        cuda.segment_rows(A, A, 10, 4, 5, 5, A, 0, A, 0, False, 0, 2**24, A, 0, F32, 0, 0)
    with pytest.raises(ValueError, match=r"aux_sse: null address"):
        cuda.sae_loss_forward(A, A, A, 3, A, A, 2, A, A, 4, 10, 8, A, A, 0, A, F32, 0, 0)
    with pytest.raises(ValueError, match=r"H: null address"):
        cuda.sae_loss_backward_rows(0, A, A, A, A, A, 3, A, A, 2, A, A, 4, 10, 8, A, 0, 0, A, F32, 0, 0)
    with pytest.raises(ValueError, match=r"x: unsupported dtype float64 on CUDA"):
        cuda.sae_loss_forward(A, A, A, 3, 0, 0, 0, A, A, 4, 10, 8, A, A, 0, A, F64, 0, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_errors_surface_as_runtime_errors(cuda):
    # valid arguments on a machine without a GPU: the first CUDA call fails and says so
    with pytest.raises(RuntimeError, match="flashsae CUDA error in cudaGetDevice"):
        cuda.topk_select(*select_args())
