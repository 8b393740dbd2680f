"""Launch wrappers of flashsae._C_cuda, shared by the ops' ``cuda`` branches.

The op modules validate every tensor first (flashsae._checks: device, dtype float32/bfloat16/float16,
contiguity, shapes) and allocate outputs with :func:`flashsae._native.new_output`; these wrappers hand
raw addresses, sizes, dtype codes, the device index and torch's current stream on that device to
_C_cuda, by keyword (its bindings take no positional arguments), so every kernel is ordered with the
surrounding torch work. _C_cuda includes no torch header, so one build serves every torch version;
it checks sizes again at its boundary (ValueError) and turns any CUDA error into a RuntimeError.

Index values are checked where the kernels read them: an index outside [-1, n) is skipped and sets
a device flag, which the caller reads back (:func:`~flashsae.ops._sparse_rows.new_flag`).
"""

from __future__ import annotations

import torch

from .. import _native
from .._native import addr, dtype_code
from ._sparse_rows import latent_segments


def _module():
    return _native.cuda_module()


def _where(t: torch.Tensor) -> dict[str, int]:
    """The ``device`` index and raw ``stream`` handle (torch's current stream on t's device) keywords."""
    return {"device": t.device.index, "stream": _native.cuda_stream(t.device)}


# ----------------------------------------------------------------------------------- sparse rows


def gather_rows(
    coef: torch.Tensor,
    indices: torch.Tensor,
    M: torch.Tensor,
    out: torch.Tensor,
    flag: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """out[b] = bias + sum_j coef[b, j] * [gate[b, j] > 0] * M[indices[b, j]]; out in M's dtype or fp32."""
    rows, k = indices.shape
    n, d = M.shape
    _module().gather_rows(
        coef=addr(coef), gate=addr(gate), indices=addr(indices), rows=rows, k=k, W=addr(M), n_latents=n, d=d,
        bias=addr(bias), out=addr(out), out_fp32=out.dtype == torch.float32, error_flag=addr(flag),
        dtype=dtype_code(M), **_where(M),
    )  # fmt: skip


def dot_rows(R: torch.Tensor, indices: torch.Tensor, M: torch.Tensor, out: torch.Tensor, flag: torch.Tensor) -> None:
    """out[b, j] = R[b] . M[indices[b, j]] (0 for an empty slot); R in M's dtype or fp32."""
    rows, k = indices.shape
    n, d = M.shape
    _module().dot_rows(
        R=addr(R), r_fp32=R.dtype == torch.float32, indices=addr(indices), rows=rows, k=k, W=addr(M), n_latents=n,
        d=d, out=addr(out), error_flag=addr(flag), dtype=dtype_code(M), **_where(M),
    )  # fmt: skip


def scatter_rows(
    coef: torch.Tensor,
    indices: torch.Tensor,
    R1: torch.Tensor,
    out: torch.Tensor,
    *,
    R2: torch.Tensor | None = None,
    main_slots: int | None = None,
    gate: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    coef_sum: torch.Tensor | None = None,
) -> None:
    """out[i] = sum over slots (b, j) with indices[b, j] = i of c[b, j] * (R[b] - offset), with
    c = coef * [gate > 0] and R = R1 for j < main_slots, else R2; coef_sum[i] = sum of those c.
    Every row of out [n, d] is written; no atomics (latent-sorted segments, deterministic)."""
    rows, k = indices.shape
    n, d = out.shape
    order, seg = latent_segments(indices, n)
    _module().scatter_rows(
        order=addr(order), seg=addr(seg), n_latents=n, rows=rows, k=k,
        main_slots=k if main_slots is None else main_slots, coef=addr(coef), gate=addr(gate), R1=addr(R1),
        R2=addr(R2), r_fp32=R1.dtype == torch.float32, offset=addr(offset), d=d, out=addr(out),
        coef_sum=addr(coef_sum), dtype=dtype_code(out), **_where(out),
    )  # fmt: skip


# ------------------------------------------------------------------------------------ fused loss


def loss_forward(x, values, indices, aux_values, aux_indices, W_dec, b_dec, x_hat, sse, aux_sse, flags) -> None:
    """x_hat, sse [rows] and (with aux latents) aux_sse [rows]; flags[0] / flags[1] are raised by an
    out-of-range index in indices / aux_indices."""
    rows, k = indices.shape
    n, d = W_dec.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    _module().sae_loss_forward(
        x=addr(x), values=addr(values), indices=addr(indices), k=k, aux_values=addr(aux_values),
        aux_indices=addr(aux_indices), aux_k=aux_k, W_dec=addr(W_dec), b_dec=addr(b_dec), rows=rows, n_latents=n,
        d=d, x_hat=addr(x_hat), sse=addr(sse), aux_sse=addr(aux_sse) if aux_k else 0, error_flag=addr(flags),
        dtype=dtype_code(x), **_where(x),
    )  # fmt: skip


def loss_backward_rows(
    grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, aux_values, aux_indices, W_dec, b_dec, G, H, dx, flags
) -> None:
    """G = 2 grad_sse (x_hat - x) + grad_x_hat, H = 2 grad_aux_sse (e_hat + x_hat - x) (with aux
    latents), dx = -2 grad_sse (x_hat - x) (when dx is given); G, H fp32 [rows, d]."""
    rows, k = indices.shape
    n, d = W_dec.shape
    aux_k = 0 if aux_values is None else aux_values.shape[1]
    _module().sae_loss_backward_rows(
        grad_x_hat=addr(grad_x_hat), grad_sse=addr(grad_sse), grad_aux_sse=addr(grad_aux_sse) if aux_k else 0,
        x=addr(x), values=addr(values), indices=addr(indices), k=k, aux_values=addr(aux_values),
        aux_indices=addr(aux_indices), aux_k=aux_k, W_dec=addr(W_dec), b_dec=addr(b_dec), rows=rows, n_latents=n,
        d=d, G=addr(G), H=addr(H) if aux_k else 0, dx=addr(dx), error_flag=addr(flags), dtype=dtype_code(x),
        **_where(x),
    )  # fmt: skip


# ------------------------------------------------------------------------------------ top-k select


def topk_max_k() -> int:
    """Largest k (and aux_k) the select kernel takes (its final sort holds 8 keys per thread of 256)."""
    return _module().TOPK_MAX_K


def select_state(rows: int, k: int, device: torch.device) -> torch.Tensor:
    """A fresh select state: [rows, k] 64-bit keys, all 0 (= no candidate yet)."""
    return torch.zeros(rows, k, dtype=torch.int64, device=device)


def topk_select(
    scores: torch.Tensor,
    state: torch.Tensor,
    *,
    col0: int = 0,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    dead_mask: torch.Tensor | None = None,
    aux_state: torch.Tensor | None = None,
) -> None:
    """Merges scores [rows, cols] (rows contiguous, any row stride) for latents col0 .. col0 + cols - 1
    into the select state; the key of a score s is s + bias[latent] (fp32 bias over all latents),
    relu'd when asked. Latents with dead_mask[latent] (uint8 view of the bool mask) also enter
    aux_state."""
    rows, cols = scores.shape
    aux_k = 0 if aux_state is None else aux_state.shape[1]
    _module().topk_select(
        scores=addr(scores), score_dtype=dtype_code(scores), ld=scores.stride(0), rows=rows, cols=cols, col0=col0,
        bias=addr(bias), relu=relu, state=addr(state), k=state.shape[1], dead_mask=addr(dead_mask),
        aux_state=addr(aux_state), aux_k=aux_k, **_where(scores),
    )  # fmt: skip


def topk_finish(state: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
    """values / indices [rows, k]: the state sorted best first; empty slots get value 0, index -1."""
    rows, k = state.shape
    _module().topk_finish(
        state=addr(state), rows=rows, k=k, values=addr(values), indices=addr(indices), value_dtype=dtype_code(values),
        **_where(state),
    )  # fmt: skip


def topk_rows(scores: torch.Tensor, k: int, *, relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of a contiguous [rows, n] float32/bfloat16/float16 CUDA tensor in one pass over
    it: (values in scores' dtype, int32 indices), sorted descending, ties to the lower index (what
    torch.topk(scores, k) returns up to its tie order and index dtype). With relu, of relu(scores)."""
    rows, n = scores.shape
    if not 1 <= k <= min(n, topk_max_k()):
        raise ValueError(f"k: expected 1 <= k <= min(n, {topk_max_k()}) = {min(n, topk_max_k())}, got {k}")
    state = select_state(rows, k, scores.device)
    topk_select(scores, state, relu=relu)
    values = _native.new_output((rows, k), scores.dtype, scores.device)
    indices = _native.new_output((rows, k), torch.int32, scores.device)
    topk_finish(state, values, indices)
    return values, indices
