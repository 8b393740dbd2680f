"""flashsae._C_cuda's host boundary, without a GPU: every binding takes keyword arguments only, checks
its sizes and addresses before any CUDA call (ValueError naming the argument), and a CUDA failure
surfaces as a RuntimeError.

Needs the module built (CI builds with FLASHSAE_CUDA=ON); no GPU or driver is used.
"""

import pytest
import torch

from flashsae import _native
from helpers import binding_params

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
    return args


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
        cuda.topk_select(**select_args(**over))


def test_arguments_are_keywords_only(cuda):
    # a positional list of addresses could be swapped silently; the bindings take none
    assert binding_params(cuda.topk_select) == list(select_args())
    with pytest.raises(TypeError, match="incompatible function arguments"):
        cuda.topk_select(*select_args().values())
    with pytest.raises(TypeError, match="incompatible function arguments"):
        cuda.topk_select(**{("values" if name == "scores" else name): a for name, a in select_args().items()})


def test_topk_finish_checks(cuda):
    args = {"state": A, "rows": 4, "k": 30, "values": A, "indices": A, "value_dtype": F32, "device": 0, "stream": 0}
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= 2048, got 3000"):
        cuda.topk_finish(**args | {"k": 3000})
    with pytest.raises(ValueError, match=r"values: unsupported dtype float64"):
        cuda.topk_finish(**args | {"value_dtype": F64})


def row_args(**over):
    """Valid sizes for rows = 4, k = 5, n_latents = 10, d = 8; every address set; overridden by `over`."""
    args = {"indices": A, "rows": 4, "k": 5, "n_latents": 10, "d": 8, "out": A, "error_flag": A, "dtype": F32,
            "device": 0, "stream": 0}  # fmt: skip
    return args | over


def loss_args(**over):
    args = {"x": A, "values": A, "indices": A, "k": 3, "aux_values": A, "aux_indices": A, "aux_k": 2, "W_dec": A,
            "b_dec": A, "rows": 4, "n_latents": 10, "d": 8, "error_flag": A, "dtype": F32, "device": 0,
            "stream": 0}  # fmt: skip
    return args | over


def test_row_kernel_checks(cuda):
    scatter = {"order": A, "seg": A, "main_slots": 5, "coef": A, "gate": 0, "R1": A, "R2": 0, "r_fp32": False,
               "offset": 0, "coef_sum": 0}  # fmt: skip
    scatter_sizes = {k: v for k, v in row_args().items() if k not in ("indices", "error_flag")}
    with pytest.raises(ValueError, match=r"n_latents: expected 1 <= n_latents <= 2147483647, got 2147483648"):
        cuda.gather_rows(**row_args(n_latents=2**31, k=2), coef=A, gate=0, W=A, bias=0, out_fp32=False)
    with pytest.raises(ValueError, match=r"indices: null address"):
        cuda.dot_rows(**row_args(indices=0, k=2, dtype=BF16), R=A, r_fp32=True, W=A)
    with pytest.raises(ValueError, match=r"main_slots: expected 1 <= main_slots <= 5, got 6"):
        cuda.scatter_rows(**scatter_sizes, **scatter | {"main_slots": 6})
    with pytest.raises(ValueError, match=r"R2: null address"):
        cuda.scatter_rows(**scatter_sizes, **scatter | {"main_slots": 3})
    with pytest.raises(ValueError, match=r"d: expected 1 <= d <= 16776960"):
        cuda.scatter_rows(**scatter_sizes | {"d": 2**24}, **scatter)
    with pytest.raises(ValueError, match=r"aux_sse: null address"):
        cuda.sae_loss_forward(**loss_args(), x_hat=A, sse=A, aux_sse=0)
    with pytest.raises(ValueError, match=r"H: null address"):
        cuda.sae_loss_backward_rows(**loss_args(), grad_x_hat=0, grad_sse=A, grad_aux_sse=A, G=A, H=0, dx=0)
    with pytest.raises(ValueError, match=r"x: unsupported dtype float64 on CUDA"):
        cuda.sae_loss_forward(**loss_args(aux_values=0, aux_indices=0, aux_k=0, dtype=F64), x_hat=A, sse=A, aux_sse=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_errors_surface_as_runtime_errors(cuda):
    # valid arguments on a machine without a GPU: the first CUDA call fails and says so
    with pytest.raises(RuntimeError, match="flashsae CUDA error in cudaGetDevice"):
        cuda.topk_select(**select_args())
