"""One interface: create/load by name, config validation, metadata in checkpoints."""

import pytest
import torch

import flashsae
from flashsae.modules import SAE, TopKConfig, register


def test_create_and_load_pick_the_class(tmp_path):
    sae = flashsae.create("topk", d_in=12, n_latents=48, k=4, auxk_alpha=0.1, dtype=torch.bfloat16)
    assert isinstance(sae, flashsae.TopKSAE) and sae.dtype == torch.bfloat16
    assert sae.config == TopKConfig(d_in=12, n_latents=48, k=4, aux_k=6, auxk_alpha=0.1)
    sae.metadata = {"hookpoint": "encoder.layer.3", "model": "all-MiniLM-L6-v2"}
    sae.save(tmp_path / "sae")
    loaded = flashsae.load(tmp_path / "sae")
    assert type(loaded) is flashsae.TopKSAE
    assert loaded.config == sae.config and loaded.metadata == sae.metadata
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


def test_loss_is_the_training_objective():
    sae = flashsae.create("topk", d_in=16, n_latents=64, k=4, auxk_alpha=0.5)
    x = torch.randn(32, 16)
    plain = sae(x)
    assert torch.equal(plain.loss, plain.fvu + 0.5 * plain.auxk_loss)
    dead = torch.ones(64, dtype=torch.bool)
    with_aux = sae(x, dead_mask=dead)
    assert with_aux.auxk_loss > 0
    torch.testing.assert_close(with_aux.loss, with_aux.fvu + 0.5 * with_aux.auxk_loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"name": "topk2", "d_in": 8, "n_latents": 16, "k": 2}, ValueError, r"name: unknown architecture 'topk2'"),
        ({"name": "topk", "d_in": 8, "n_latents": 16, "k": 2, "l1": 0.1}, TypeError, r"unexpected config field"),
        ({"name": "topk", "d_in": 8, "n_latents": 16, "k": 2, "auxk_alpha": -1}, ValueError, r"auxk_alpha: expected"),
        ({"name": "topk", "d_in": 8, "n_latents": 16, "k": 17}, ValueError, r"k: expected 1 <= k <= n_latents"),
        ({"name": "topk", "d_in": -8, "n_latents": 16, "k": 2}, ValueError, r"d_in: expected a positive int"),
    ],
)
def test_create_rejects_bad_configs(kwargs, error, pattern):
    name = kwargs.pop("name")
    with pytest.raises(error, match=pattern):
        flashsae.create(name, **kwargs)


def test_registry_refuses_a_second_class_for_a_name():
    class Impostor(SAE):
        architecture = "topk"

    with pytest.raises(ValueError, match="'topk' is already registered by TopKSAE"):
        register(Impostor)
    assert flashsae.REGISTRY["topk"] is flashsae.TopKSAE


def test_unknown_architecture_on_load(tmp_path):
    flashsae.create("topk", d_in=4, n_latents=8, k=2).save(tmp_path / "sae")
    cfg = tmp_path / "sae" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"architecture": "topk"', '"architecture": "mystery"'))
    with pytest.raises(ValueError, match=r"unknown architecture 'mystery'; known: .*topk"):
        flashsae.load(tmp_path / "sae")
