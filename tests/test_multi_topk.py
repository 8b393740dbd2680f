"""Multi-TopK (Gao et al. 2024, 5.3): loss = L(k) + L(4k) / 8 against a float64 reference; outputs
stay those of k; older checkpoints (no multi_topk field) still load."""

import json

import pytest
import torch

import flashsae
from flashsae import TopKConfig, TopKSAE
from helpers import assert_close


def reference_objective(params, x, k, n, auxk_alpha):
    W_enc, b_enc, W_dec, b_dec = (params[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    act = ((x - b_dec) @ W_enc.T + b_enc).relu()
    top = torch.sort(act, dim=1, descending=True, stable=True)
    variance = (x - x.mean(0)).pow(2).sum()

    def fvu(slots):
        f = torch.zeros_like(act).scatter(1, top.indices[:, :slots], top.values[:, :slots])
        return (f @ W_dec + b_dec - x).pow(2).sum() / variance

    return fvu(k), fvu(k) + fvu(min(4 * k, n)) / 8


@pytest.mark.parametrize(("n", "k"), [(150, 7), (20, 7), (12, 12)], ids=["4k<n", "4k>n", "k=n"])
def test_loss_matches_reference_float64(n, k):
    torch.manual_seed(23)
    sae = TopKSAE(17, n, k, multi_topk=True, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)
    x = torch.randn(40, 17, dtype=torch.float64)
    out = sae(x)
    out.loss.backward()
    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    fvu_k, loss = reference_objective(params, x, k, n, 1 / 32)
    loss.backward()
    assert_close(out.fvu, fvu_k, torch.float64, "fvu (of k)")
    assert_close(out.loss, loss, torch.float64, "loss")
    assert out.latents.values.shape == (40, k)
    for name, p in sae.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float64, f"grad {name}")


def test_outputs_are_those_of_k_and_aux_still_works():
    torch.manual_seed(29)
    plain = TopKSAE(16, 96, 5, dtype=torch.float64)
    multi = TopKSAE(16, 96, 5, multi_topk=True, dtype=torch.float64)
    multi.load_state_dict(plain.state_dict())
    x = torch.randn(30, 16, dtype=torch.float64)
    dead = torch.rand(96) < 0.5
    a, b = plain(x, dead_mask=dead), multi(x, dead_mask=dead)
    for field in ("x_hat", "fvu", "mse", "auxk_loss"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.latents.indices, b.latents.indices)
    assert b.loss > a.loss and b.auxk_loss > 0


def test_config_default_bad_value_and_old_checkpoints(tmp_path):
    assert TopKConfig(d_in=4, n_latents=8, k=2).multi_topk is False
    with pytest.raises(ValueError, match="multi_topk: expected True or False"):
        flashsae.create("topk", d_in=4, n_latents=8, k=2, multi_topk=1)
    sae = flashsae.create("topk", d_in=4, n_latents=8, k=2, multi_topk=True)
    sae.save(tmp_path / "multi")
    assert flashsae.load(tmp_path / "multi").config.multi_topk is True
    cfg = tmp_path / "multi" / "cfg.json"
    header = json.loads(cfg.read_text())
    del header["config"]["multi_topk"]  # a checkpoint written before the option existed
    cfg.write_text(json.dumps(header))
    assert flashsae.load(tmp_path / "multi").config.multi_topk is False
