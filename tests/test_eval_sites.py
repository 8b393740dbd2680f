"""flashsae.eval on a cross-layer transcoder and a crosscoder: per-layer (per-site) metrics against
the float64 definitions on the clean activations, downstream metrics with the whole replacement
model spliced (against the model's own loss with a dense reference CLT hooked in by hand and every
target zeroed by plain hooks), JSON output, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flashsae.eval import evaluate
from flashsae.hooks import capture
from test_eval import _kl
from test_hooks_replacement import GPT2_IN, GPT2_OUT, DenseCLTSplice, dense_latents, random_clt, random_crosscoder
from test_hooks_replacement import tiny_gpt2


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(seed=1)


@pytest.fixture
def ids():
    return torch.randint(1, 64, (6, 10))


def _sites(model, ids, paths):
    with torch.no_grad(), capture(model, paths) as acts:
        model(ids)
    return [acts[p].reshape(-1, acts[p].shape[-1]) for p in paths]


def _reference(y: torch.Tensor, y_hat: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    y, y_hat = y.double(), y_hat.double()
    sse = (y - y_hat).pow(2).sum()
    density = (dense > 0).double().mean(0)
    return {
        "explained_variance": float(1 - sse / (y - y.mean(0)).pow(2).sum()),
        "mse": float(sse / y.numel()),
        "cossim": float(F.cosine_similarity(y, y_hat, dim=-1).mean()),
        "l0": float((dense > 0).sum(-1).double().mean()),
        "dead_fraction": float((density == 0).double().mean()),
    }


def test_clt_per_layer_and_downstream_metrics(gpt2, ids):
    clt = random_clt(3, 24)
    result = evaluate(clt, gpt2, GPT2_IN, ids, ids.numel(), target_hookpoint=GPT2_OUT, batch_size=4)
    inputs = [f"transformer.h.{i}.ln_2" for i in range(3)]
    targets = [f"transformer.h.{i}.mlp" for i in range(3)]
    xs, ys = _sites(gpt2, ids, inputs), _sites(gpt2, ids, targets)
    with torch.no_grad():
        dense = [dense_latents(clt, x, i) for i, x in enumerate(xs)]
        for j, site in enumerate(result.sites):
            y_hat = getattr(clt, f"b_dec_{j}").double() + sum(
                dense[i] @ clt.decoder(i)[:, j - i].double() for i in range(j + 1)
            )
            expected = _reference(ys[j], y_hat, dense[j])
            assert (site.hookpoint, site.target_hookpoint) == (inputs[j], targets[j])
            for name, value in expected.items():
                assert site.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-7), (j, name)
            assert site.density.shape == (clt.n_latents,)
    assert result.site_labels == ["layer0", "layer1", "layer2"] and result.tokens == ids.numel()
    mean_ev = sum(site.metrics["explained_variance"] for site in result.sites) / 3
    assert result.metrics["explained_variance"] == pytest.approx(mean_ev)
    assert result.density.shape == (3 * clt.n_latents,)
    # downstream: the replacement model (every MLP output predicted), against the dense reference
    with torch.no_grad():
        clean = gpt2(ids, labels=ids)
        with DenseCLTSplice(gpt2, clt, GPT2_IN, GPT2_OUT):
            spliced = gpt2(ids, labels=ids)
        handles = [gpt2.transformer.h[i].mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
                   for i in range(3)]  # fmt: skip
        try:
            ablated = gpt2(ids, labels=ids)
        finally:
            for handle in handles:
                handle.remove()
    metrics = result.metrics
    assert metrics["ce_clean"] == pytest.approx(float(clean.loss), rel=1e-5)
    assert metrics["ce_spliced"] == pytest.approx(float(spliced.loss), rel=1e-4)
    assert metrics["ce_ablation"] == pytest.approx(float(ablated.loss), rel=1e-5)
    assert abs(float(spliced.loss) - float(clean.loss)) > 1e-3
    assert metrics["kl_spliced"] == pytest.approx(_kl(clean.logits, spliced.logits), rel=1e-3, abs=1e-6)
    record = json.loads(json.dumps(result.to_dict()))
    assert [s["site"] for s in record["sites"]] == ["layer0", "layer1", "layer2"]
    assert record["sites"][1]["target_hookpoint"] == "transformer.h.1.mlp"


def test_crosscoder_per_site_metrics(gpt2, ids):
    cc = random_crosscoder(2, 24)
    sites = ["transformer.h.0", "transformer.h.2"]
    result = evaluate(cc, gpt2, sites, ids, 50, batch_size=4, downstream="none", top_latents=4)
    xs = [x[:50] for x in _sites(gpt2, ids, sites)]
    with torch.no_grad():
        x = torch.cat(xs, dim=-1).double()
        pre = x @ cc.W_enc.double().T + cc.b_enc.double()
        values, indices = pre.relu().topk(cc.k, dim=-1)
        dense = torch.zeros_like(pre).scatter(-1, indices, values)
        recon = (dense @ cc.W_dec.double() + cc.b_dec.double()).view(50, 2, 24)
    for s, site in enumerate(result.sites):
        expected = _reference(xs[s], recon[:, s], dense)
        for name, value in expected.items():
            assert site.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-7), (s, name)
    assert result.site_labels == ["site0", "site1"] and result.downstream == "none" and result.tokens == 50
    assert len(result.sites[0].latents) == 4 and result.sites[1].latents == []  # one dictionary: cards once


def test_crosscoder_downstream_splices_every_site(gpt2, ids):
    cc = random_crosscoder(2, 24)
    result = evaluate(cc, gpt2, ["transformer.h.0", "transformer.h.2"], ids, ids.numel(), batch_size=6)
    assert result.downstream == "causal_lm" and result.metrics["ce_spliced"] != result.metrics["ce_clean"]


def test_bad_site_arguments(gpt2, ids):
    clt = random_clt(3, 24)
    with pytest.raises(ValueError, match="target_hookpoint: a clt needs its target sites"):
        evaluate(clt, gpt2, GPT2_IN, ids, 10)
    with pytest.raises(ValueError, match="hookpoint: names 1 modules"):
        evaluate(clt, gpt2, "transformer.h.0.ln_2", ids, 10, target_hookpoint=GPT2_OUT)
    with pytest.raises(ValueError, match="target_hookpoint: names 2 modules"):
        evaluate(clt, gpt2, GPT2_IN, ids, 10, target_hookpoint=["transformer.h.0.mlp", "transformer.h.1.mlp"])
    with pytest.raises(ValueError, match="target_hookpoint: a crosscoder reconstructs its own sites"):
        evaluate(random_crosscoder(3, 24), gpt2, "transformer.h.*", ids, 10, target_hookpoint=GPT2_OUT)
    with pytest.raises(ValueError, match="target_hookpoint: expected module paths"):
        evaluate(clt, gpt2, GPT2_IN, ids, 10, target_hookpoint=[""])
