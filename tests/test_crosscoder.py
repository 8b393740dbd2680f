"""Crosscoders: forward and gradients against a dense float64 reference (cpu, torch; triton under
the interpreter in float32), the [n, S, d] decoder view, AuxK, SparseAdam updating during backward."""

import pytest
import torch

import flashsae
from flashsae.optim import SparseAdam
from helpers import assert_close, backends

S, D, N, K, AUX_K = 3, 11, 41, 5, 6


def make_crosscoder(dtype=torch.float64, backend=None):
    cc = flashsae.create("crosscoder", n_sites=S, d_in=D, n_latents=N, k=K, aux_k=AUX_K, auxk_alpha=0.5,
                         dtype=dtype, backend=backend)  # fmt: skip
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.2)
        cc.b_dec.normal_(0, 0.2)
    return cc


def reference(params, x, dead_mask):
    rows = x.reshape(x.shape[0], S * D)
    act = (rows @ params["W_enc"].T + params["b_enc"]).relu()
    top = torch.sort(act, dim=1, descending=True, stable=True)
    f = torch.zeros_like(act).scatter(1, top.indices[:, :K], top.values[:, :K])
    x_hat = (f @ params["W_dec"] + params["b_dec"]).view(-1, S, D)
    fvu_per_site = (x_hat - x).pow(2).sum(dim=(0, 2)) / (x - x.mean(0)).pow(2).sum(dim=(0, 2))
    auxk = torch.zeros((), dtype=x.dtype)
    if dead_mask is not None:
        residual = (x - x_hat).detach().reshape(-1, S * D)
        dead = torch.sort(act.masked_fill(~dead_mask, float("-inf")), dim=1, descending=True, stable=True)
        aux_f = torch.zeros_like(act).scatter(1, dead.indices[:, :AUX_K], dead.values[:, :AUX_K].clamp_min(0))
        auxk = (aux_f @ params["W_dec"] - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
        auxk = auxk * min(int(dead_mask.sum()) / AUX_K, 1.0)
    return {"x_hat": x_hat, "f": f, "fvu_per_layer": fvu_per_site, "fvu": fvu_per_site.mean(), "auxk_loss": auxk,
            "loss": fvu_per_site.mean() + 0.5 * auxk}  # fmt: skip


def check(cc, x, dtype, dead_mask):
    out = cc(x, dead_mask=dead_mask)
    out.loss.backward()
    params = {n: p.detach().double().clone().requires_grad_(True) for n, p in cc.named_parameters()}
    expected = reference(params, x.reshape(-1, S, D).double(), dead_mask)
    expected["loss"].backward()
    assert_close(out.x_hat.reshape(-1, S, D), expected["x_hat"], dtype, "x_hat")
    for field in ("fvu", "fvu_per_layer", "auxk_loss", "loss"):
        assert_close(getattr(out, field), expected[field], dtype, field)
    assert_close(out.latents.to_dense(N).reshape(-1, N), expected["f"], dtype, "latents")
    for name, p in cc.named_parameters():
        assert_close(p.grad, params[name].grad, dtype, f"grad {name}")
    return out


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_forward_and_gradients_match_dense_reference_float64(backend, with_dead):
    cc = make_crosscoder(backend=backend)
    x = torch.randn(2, 9, S, D, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)[:, None]
    out = check(cc, x, torch.float64, torch.rand(N) < 0.4 if with_dead else None)
    assert out.x_hat.shape == x.shape and out.latents.values.shape == (2, 9, K)
    assert (out.auxk_loss > 0) == with_dead


@pytest.mark.parametrize("backend", backends("triton"))
def test_triton_backend_matches_dense_reference_float32(backend):
    check(make_crosscoder(torch.float32, backend), torch.randn(7, S, D), torch.float32, torch.rand(N) < 0.4)


def test_views_encode_decode_and_arguments():
    cc = make_crosscoder()
    assert cc.decoder().shape == (N, S, D) and cc.decoder().data_ptr() == cc.W_dec.data_ptr()
    x = torch.randn(5, S, D, dtype=torch.float64)
    assert_close(cc.decode(cc.encode(x)), cc(x).x_hat, torch.float64, "decode(encode(x))")
    with pytest.raises(ValueError, match=r"x: expected shape \[..., n_sites=3, d_in=11\]"):
        cc(torch.randn(5, S * D, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_sites"):
        flashsae.create("crosscoder", d_in=4, n_latents=8, k=2)


def test_sparse_adam_updating_during_backward_equals_torch_adam():
    dense, eager = make_crosscoder(), make_crosscoder()
    eager.load_state_dict(dense.state_dict())
    reference_optimizer = torch.optim.Adam(dense.parameters(), lr=1e-2)
    optimizer = SparseAdam(eager.parameters(), lr=1e-2, update_in_backward=True)
    for _ in range(2):
        x, dead = torch.randn(6, S, D, dtype=torch.float64), torch.rand(N) < 0.5
        dense(x, dead_mask=dead).loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        eager(x, dead_mask=dead).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.flush()
    for name, p in eager.named_parameters():
        assert_close(p, dense.get_parameter(name), torch.float64, name)
