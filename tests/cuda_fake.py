"""A stand-in for flashsae._C_cuda on CPU tensors, so CI runs the ops' cuda branches without a GPU.

Each binding checks that the sizes, strides and dtype codes it is handed match the tensors (catching
glue mistakes: swapped arguments, wrong row stride, wrong dtype flag) and then does what
csrc/cuda/kernels.cuh says the kernel does, in torch (fp32 math like the kernels); the select runs
the kernel's own algorithm through its host mirror (flashsae._C.topk_select_host) with the kernel's
slice and capacity. With ``install(monkeypatch)``, ``_cuda.addr`` passes tensors through instead of
raw addresses and ``backend="cuda"`` accepts CPU tensors.

What this cannot check is the kernels themselves: tests/ops/ runs the same test bodies on a GPU
against the real module (backend ``cuda``; ``cuda_fake`` is this stand-in).
"""

from __future__ import annotations

import inspect

import torch

from flashsae import _C, _backend, _native
from flashsae.ops import _cuda

CODES = {code: dtype for dtype, code in _native.DTYPE_CODES.items()}


def _opt(t):
    """A binding's optional tensor: the wrappers pass 0 for an absent one."""
    return None if t is None or (isinstance(t, int) and t == 0) else t


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"fake _C_cuda: {what}")


def _check_rows(t, shape, dtype, name):
    _expect(isinstance(t, torch.Tensor), f"{name}: expected a tensor, got {t!r}")
    _expect(tuple(t.shape) == tuple(shape), f"{name}: shape {tuple(t.shape)} != {tuple(shape)}")
    _expect(t.dtype == dtype, f"{name}: dtype {t.dtype} != {dtype}")
    _expect(t.is_contiguous(), f"{name}: not contiguous")


def _slots(coef, indices, n, gate=None, flag=None, which=0):
    """(fp32 coefficients with empty / out-of-range / gated-off slots zeroed, clamped int64 indices)."""
    valid = (indices >= 0) & (indices < n)
    bad = ~valid & (indices != -1)
    if flag is not None and bool(bad.any()):
        flag[which] = 1
    c = coef.float() * valid
    if gate is not None:
        c = c * (gate.float() > 0)
    return c, indices.clamp(0, n - 1).long()


class FakeCudaModule:
    TOPK_MAX_K = 2048
    TOPK_SLICE = 2048
    TOPK_CAPACITY = 2048

    def __init__(self) -> None:
        self.calls: list[str] = []

    def gather_rows(self, *, coef, gate, indices, rows, k, W, n_latents, d, bias, out, out_fp32, error_flag, dtype,
                    device, stream):  # fmt: skip
        self.calls.append("gather_rows")
        T = CODES[dtype]
        gate, bias = _opt(gate), _opt(bias)
        _check_rows(W, (n_latents, d), T, "W")
        _check_rows(coef, (rows, k), T, "coef")
        _check_rows(indices, (rows, k), torch.int32, "indices")
        _check_rows(out, (rows, d), torch.float32 if out_fp32 else T, "out")
        if gate is not None:
            _check_rows(gate, (rows, k), T, "gate")
        if bias is not None:
            _check_rows(bias, (d,), T, "bias")
        c, idx = _slots(coef, indices, n_latents, gate, error_flag)
        res = (c.unsqueeze(-1) * W.float()[idx]).sum(1)
        out.copy_(res if bias is None else res + bias.float())

    def dot_rows(self, *, R, r_fp32, indices, rows, k, W, n_latents, d, out, error_flag, dtype, device, stream):
        self.calls.append("dot_rows")
        T = CODES[dtype]
        _check_rows(W, (n_latents, d), T, "W")
        _check_rows(R, (rows, d), torch.float32 if r_fp32 else T, "R")
        _check_rows(indices, (rows, k), torch.int32, "indices")
        _check_rows(out, (rows, k), T, "out")
        c, idx = _slots(torch.ones(rows, k), indices, n_latents, None, error_flag)
        out.copy_(torch.einsum("bkd,bd->bk", W.float()[idx], R.float()) * c)

    def scatter_rows(self, *, order, seg, n_latents, rows, k, main_slots, coef, gate, R1, R2, r_fp32, offset, d, out,
                     coef_sum, dtype, device, stream):  # fmt: skip
        self.calls.append("scatter_rows")
        T = CODES[dtype]
        R_dtype = torch.float32 if r_fp32 else T
        gate, R2, offset, coef_sum = _opt(gate), _opt(R2), _opt(offset), _opt(coef_sum)
        _check_rows(order, (rows * k,), torch.int64, "order")
        _check_rows(seg, (n_latents + 1,), torch.int64, "seg")
        _check_rows(coef, (rows, k), T, "coef")
        _check_rows(R1, (rows, d), R_dtype, "R1")
        _check_rows(out, (n_latents, d), T, "out")
        _expect(
            1 <= main_slots <= k and (main_slots == k or R2 is not None),
            f"main_slots = {main_slots} with k = {k}, R2 {R2 is not None}",
        )
        if R2 is not None:
            _check_rows(R2, (rows, d), R_dtype, "R2")
        if gate is not None:
            _check_rows(gate, (rows, k), T, "gate")
        if offset is not None:
            _check_rows(offset, (d,), T, "offset")
        if coef_sum is not None:
            _check_rows(coef_sum, (n_latents,), T, "coef_sum")
        _expect(torch.equal(order.sort().values, torch.arange(rows * k)), "order is not a permutation of the slots")
        _expect(bool((seg[1:] >= seg[:-1]).all()) and int(seg[0]) == 0, "seg is not a list of segment starts")
        used = int(seg[-1])
        # the latent of each sorted position p < used
        latent = torch.repeat_interleave(torch.arange(n_latents), seg[1:] - seg[:-1])
        s = order[:used]
        b, j = s // k, s % k
        flat_coef = coef.reshape(-1)[s].float()
        if gate is not None:
            flat_coef = flat_coef * (gate.reshape(-1)[s].float() > 0)
        R = R1.float()[b] if R2 is None else torch.where((j < main_slots).unsqueeze(1), R1.float()[b], R2.float()[b])
        if offset is not None:
            R = R - offset.float()
        out.copy_(torch.zeros(n_latents, d).index_add_(0, latent, flat_coef.unsqueeze(1) * R))
        if coef_sum is not None:
            coef_sum.copy_(torch.zeros(n_latents).index_add_(0, latent, flat_coef))

    def _reconstruct(self, x, values, indices, k, aux_values, aux_indices, aux_k, W, b_dec, rows, n, d, flags, T):
        _check_rows(W, (n, d), T, "W_dec")
        _check_rows(x, (rows, d), T, "x")
        _check_rows(values, (rows, k), T, "values")
        _check_rows(indices, (rows, k), torch.int32, "indices")
        _check_rows(b_dec, (d,), T, "b_dec")
        _check_rows(flags, (2,), torch.int32, "flags")
        c, idx = _slots(values, indices, n, None, flags, 0)
        x_hat = (c.unsqueeze(-1) * W.float()[idx]).sum(1) + b_dec.float()
        e_hat = None
        if aux_k:
            _check_rows(aux_values, (rows, aux_k), T, "aux_values")
            _check_rows(aux_indices, (rows, aux_k), torch.int32, "aux_indices")
            ca, ia = _slots(aux_values, aux_indices, n, None, flags, 1)
            e_hat = (ca.unsqueeze(-1) * W.float()[ia]).sum(1)
        return x_hat, e_hat

    def sae_loss_forward(self, *, x, values, indices, k, aux_values, aux_indices, aux_k, W_dec, b_dec, rows, n_latents,
                         d, x_hat, sse, aux_sse, error_flag, dtype, device, stream):  # fmt: skip
        self.calls.append("sae_loss_forward")
        T = CODES[dtype]
        xh, e = self._reconstruct(
            x, values, indices, k, aux_values, aux_indices, aux_k, W_dec, b_dec, rows, n_latents, d, error_flag, T
        )
        _check_rows(x_hat, (rows, d), T, "x_hat")
        _check_rows(sse, (rows,), torch.float32, "sse")
        r = xh - x.float()
        x_hat.copy_(xh)
        sse.copy_(r.pow(2).sum(1))
        if aux_k:
            _check_rows(aux_sse, (rows,), torch.float32, "aux_sse")
            aux_sse.copy_((e + r).pow(2).sum(1))
        else:
            _expect(_opt(aux_sse) is None, "aux_sse without aux slots")

    def sae_loss_backward_rows(self, *, grad_x_hat, grad_sse, grad_aux_sse, x, values, indices, k, aux_values,
                               aux_indices, aux_k, W_dec, b_dec, rows, n_latents, d, G, H, dx, error_flag, dtype,
                               device, stream):  # fmt: skip
        self.calls.append("sae_loss_backward_rows")
        T = CODES[dtype]
        grad_x_hat, dx = _opt(grad_x_hat), _opt(dx)
        xh, e = self._reconstruct(
            x, values, indices, k, aux_values, aux_indices, aux_k, W_dec, b_dec, rows, n_latents, d, error_flag, T
        )
        _check_rows(grad_sse, (rows,), torch.float32, "grad_sse")
        _check_rows(G, (rows, d), torch.float32, "G")
        r = xh - x.float()
        G.copy_(2 * grad_sse.unsqueeze(1) * r + (0 if grad_x_hat is None else grad_x_hat.float()))
        if grad_x_hat is not None:
            _check_rows(grad_x_hat, (rows, d), T, "grad_x_hat")
        if aux_k:
            _check_rows(grad_aux_sse, (rows,), torch.float32, "grad_aux_sse")
            _check_rows(H, (rows, d), torch.float32, "H")
            H.copy_(2 * grad_aux_sse.unsqueeze(1) * (e + r))
        if dx is not None:
            _check_rows(dx, (rows, d), T, "dx")
            dx.copy_(-2 * grad_sse.unsqueeze(1) * r)

    def topk_select(self, *, scores, score_dtype, ld, rows, cols, col0, bias, relu, state, k, dead_mask, aux_state,
                    aux_k, device, stream):  # fmt: skip
        self.calls.append("topk_select")
        bias, dead_mask, aux_state = _opt(bias), _opt(dead_mask), _opt(aux_state)
        _expect(tuple(scores.shape) == (rows, cols), f"scores shape {tuple(scores.shape)} != {(rows, cols)}")
        _expect(scores.stride() == (ld, 1), f"scores strides {scores.stride()} != ({ld}, 1)")
        _expect(scores.dtype == CODES[score_dtype], "score dtype code")
        _check_rows(state, (rows, k), torch.int64, "state")
        _expect(1 <= k <= self.TOPK_MAX_K and 0 <= aux_k <= self.TOPK_MAX_K, f"k = {k}, aux_k = {aux_k}")
        if bias is not None:
            _expect(bias.dtype == torch.float32 and bias.is_contiguous() and bias.numel() >= col0 + cols, "bias")
        if aux_k:
            _check_rows(aux_state, (rows, aux_k), torch.int64, "aux_state")
            _expect(dead_mask.dtype == torch.uint8 and dead_mask.numel() >= col0 + cols, "dead_mask")
        scores32 = scores.float().contiguous()

        def ptr(t):
            return 0 if t is None else t.data_ptr()

        _C.topk_select_host(
            scores=scores32.data_ptr(), ld=cols, rows=rows, cols=cols, col0=col0, bias=ptr(bias), relu=relu,
            state=state.data_ptr(), k=k, dead_mask=ptr(dead_mask), aux_state=ptr(aux_state), aux_k=aux_k,
            slice=self.TOPK_SLICE, capacity=self.TOPK_CAPACITY,
        )  # fmt: skip

    def topk_finish(self, *, state, rows, k, values, indices, value_dtype, device, stream):
        self.calls.append("topk_finish")
        _check_rows(state, (rows, k), torch.int64, "state")
        _check_rows(values, (rows, k), CODES[value_dtype], "values")
        _check_rows(indices, (rows, k), torch.int32, "indices")
        values32 = torch.empty(rows, k)
        _C.topk_finish_host(
            state=state.data_ptr(), rows=rows, k=k, values=values32.data_ptr(), indices=indices.data_ptr()
        )
        values.copy_(values32)


BINDINGS = [name for name, fn in inspect.getmembers(FakeCudaModule, inspect.isfunction) if not name.startswith("_")]


def _mm(original):
    """torch.mm with out_dtype on CPU (torch has it for CUDA only): fp32 products of the upcast inputs."""

    def mm(a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return original(a, b, *args, **kwargs)
        return original(a.to(out_dtype), b.to(out_dtype), *args, **kwargs)

    return mm


def install(monkeypatch) -> FakeCudaModule:
    """Routes the ops' cuda branches to a FakeCudaModule on CPU tensors for the test's duration."""
    fake = FakeCudaModule()
    monkeypatch.setattr(_cuda, "_module", lambda: fake)
    monkeypatch.setattr(_cuda, "addr", lambda t: t)
    monkeypatch.setattr(_cuda, "_where", lambda t: {"device": 0, "stream": 0})
    monkeypatch.setattr(_native, "cuda_module_available", lambda: True)
    monkeypatch.setitem(_backend._DEVICE_OF, "cuda", "cpu")
    monkeypatch.setattr(torch, "mm", _mm(torch.mm))
    return fake
