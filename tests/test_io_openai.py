"""OpenAI sparse_autoencoder state dict files: TopK with the LayerNorm input preprocessing and ReLU
autoencoders match Autoencoder.from_state_dict's forward (float64 reference)."""

from collections import OrderedDict

import pytest
import torch

import flashsae
from flashsae import FormatError, ReLUSAE, TopKSAE
from io_helpers import assert_matches, openai_reference, separated_rows

D, N, K = 37, 300, 7


def state_dict(activation="TopK", k=K, postact="ReLU"):
    """What ``torch.save(Autoencoder(...).state_dict())`` writes (its state_dict adds the activation)."""
    state = OrderedDict(
        pre_bias=torch.randn(D) * 0.1,
        latent_bias=torch.randn(N) * 0.3,
        stats_last_nonzero=torch.randint(0, 100, (N,)),
        latents_activation_frequency=torch.rand(N),
        latents_mean_square=torch.rand(N),
    )
    state["encoder.weight"] = torch.randn(N, D) * D**-0.5
    state["decoder.weight"] = torch.randn(D, N) * D**-0.5
    state["activation"] = activation
    if activation == "TopK":
        state["activation_state_dict"] = {"k": k, "postact_fn": postact}
    else:
        state["activation_state_dict"] = {}
    return state


def make_x(rows):
    # residual-stream-like rows: a large shared offset and varied scales (the LN removes both)
    return (torch.randn(rows, D) + 3.0) * (0.5 + 4 * torch.rand(rows, 1))


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_matches_openai_forward(tmp_path, activation):
    state = state_dict(activation)
    torch.save(state, tmp_path / "v5_32k_layer_8.pt")
    sae = flashsae.load(tmp_path / "v5_32k_layer_8.pt")
    if activation == "TopK":
        assert isinstance(sae, TopKSAE) and sae.k == K and sae.config.input_norm == "layer_norm"
        assert sae.config.apply_b_dec_to_input  # pre_bias is subtracted after the LN
    else:
        assert isinstance(sae, ReLUSAE) and sae.config.apply_b_dec_to_input
    assert sae.metadata["source_format"] == "openai"
    frequencies = sae.metadata["openai_stats"]["latents_activation_frequency"]
    assert frequencies == state["latents_activation_frequency"].tolist()
    x = separated_rows(lambda x: openai_reference(state, x), make_x, 40)
    assert_matches(sae, openai_reference(state, x), x, what=activation)


def test_layer_norm_sae_round_trips_natively_and_through_saelens(tmp_path):
    state = state_dict()
    torch.save(state, tmp_path / "sae.pt")
    sae = flashsae.load(tmp_path / "sae.pt", format="openai")
    x = separated_rows(lambda x: openai_reference(state, x), make_x, 20)
    ref = openai_reference(state, x)
    sae.save(tmp_path / "native")
    assert_matches(flashsae.load(tmp_path / "native"), ref, x, what="native")
    sae.save(tmp_path / "saelens", format="saelens")  # SAELens' normalize_activations="layer_norm"
    assert_matches(flashsae.load(tmp_path / "saelens"), ref, x, what="saelens")


def test_tied_decoder(tmp_path):
    state = state_dict()
    del state["decoder.weight"]
    state["decoder.linear.weight"] = state["encoder.weight"]
    torch.save(state, tmp_path / "tied.pt")
    sae = flashsae.load(tmp_path / "tied.pt")
    assert torch.equal(sae.W_dec, sae.W_enc)
    untied = {**state, "decoder.weight": state["encoder.weight"].T}
    x = make_x(10)
    assert_matches(sae, openai_reference(untied, x), x, what="tied")


def test_errors(tmp_path):
    torch.save(state_dict(postact="Identity"), tmp_path / "a.pt")
    with pytest.raises(FormatError, match="postact_fn 'Identity' has no flashsae equivalent"):
        flashsae.load(tmp_path / "a.pt")
    torch.save(state_dict(activation="Identity"), tmp_path / "a.pt")
    with pytest.raises(FormatError, match="activation 'Identity' has no flashsae equivalent"):
        flashsae.load(tmp_path / "a.pt")
    torch.save(state_dict(k=N + 1), tmp_path / "a.pt")
    with pytest.raises(FormatError, match=r"k must be an int in \[1, n_latents=300\], got 301"):
        flashsae.load(tmp_path / "a.pt")
    state = state_dict()
    state["latent_bias"] = torch.zeros(N + 1)
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(FormatError, match=r"'latent_bias' has shape \[301\], expected \[300\]"):
        flashsae.load(tmp_path / "a.pt")
    torch.save({"weights": torch.ones(3)}, tmp_path / "a.pt")
    with pytest.raises(FormatError, match="cannot tell which SAE format"):
        flashsae.load(tmp_path / "a.pt")
    with pytest.raises(FormatError, match="not an OpenAI sparse_autoencoder state dict"):
        flashsae.load(tmp_path / "a.pt", format="openai")
