"""OpenAI sparse_autoencoder (Gao et al. 2024, github.com/openai/sparse_autoencoder): one ``.pt``
file holding ``Autoencoder.state_dict()``, read with ``torch.load(weights_only=True)``.

Keys: ``pre_bias`` [d], ``encoder.weight`` [n, d], ``latent_bias`` [n], ``decoder.weight`` [d, n],
the statistics buffers ``stats_last_nonzero``, ``latents_activation_frequency``, ``latents_mean_square``
[n], ``activation`` (the class name: "TopK" or "ReLU") and ``activation_state_dict`` (TopK: ``{"k":
int, "postact_fn": "ReLU"}``). A tied model stores ``decoder.linear.weight`` (the encoder's) instead.

The forward ``Autoencoder.from_state_dict(...)`` defines (its ``normalize`` is on exactly for TopK)::

    x_n, mu, std = LN(x)            TopK only: mu = mean, std = unbiased std over features,
                                    x_n = (x - mu) / (std + 1e-5)
    latents = act((x_n - pre_bias) W_enc^T + latent_bias)     TopK: relu of the top-k values; or relu
    x_hat   = (latents W_dec^T + pre_bias) * std + mu          (just + pre_bias without LN)

-> TopKSAE(k, input_norm="layer_norm") for TopK, ReLUSAE(apply_b_dec_to_input=True) for ReLU; the
statistics buffers go to ``metadata["openai_stats"]``. Read only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import _common
from ._common import FormatError

STAT_BUFFERS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")


def looks_like_openai(state: Any) -> bool:
    return isinstance(state, dict) and {"pre_bias", "latent_bias", "encoder.weight"} <= set(state)


def load(path: Path, placement: _common.Placement, state: dict[str, Any] | None = None):
    """A flashsae SAE from an OpenAI sparse_autoencoder state dict file (module docstring)."""
    where = str(path)
    if state is None:
        state = _common.read_torch_weights(path)
    if not looks_like_openai(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise FormatError(f"{where}: not an OpenAI sparse_autoencoder state dict (found {found})")
    tensors = _common.Tensors(state, where)
    n, d = _common.shape_of(state, "encoder.weight", 2, where)
    activation = tensors.take_value("activation") if "activation" in tensors else "ReLU"
    activation_state = tensors.take_value("activation_state_dict") if "activation_state_dict" in tensors else {}
    W_enc = tensors.take("encoder.weight", (n, d))
    if "decoder.weight" in tensors:
        W_dec = tensors.take("decoder.weight", (d, n)).T
    else:
        tied = tensors.take("decoder.linear.weight", (n, d))  # TiedTranspose: the decoder is W_enc^T
        W_dec = tied
    weights = {
        "W_enc": W_enc,
        "b_enc": tensors.take("latent_bias", (n,)),
        "W_dec": W_dec,
        "b_dec": tensors.take("pre_bias", (d,)),
    }
    stats = {name: tensors.take(name, (n,), floating=False) for name in STAT_BUFFERS if name in tensors}
    tensors.finish()
    if activation == "TopK":
        if not isinstance(activation_state, dict):
            raise FormatError(f"{where}: activation_state_dict must be a dict, got {type(activation_state).__name__}")
        k = activation_state.get("k")
        postact = activation_state.get("postact_fn", "ReLU")
        k = _common.int_field("activation_state_dict.k", k, where, at_most=("n_latents", n))
        if postact != "ReLU":
            raise FormatError(
                f"{where}: activation_state_dict.postact_fn {postact!r} has no flashsae equivalent (expected 'ReLU')"
            )
        architecture = "topk"
        config: dict[str, Any] = {"d_in": d, "n_latents": n, "k": k, "input_norm": "layer_norm"}
    elif activation == "ReLU":
        architecture = "relu"
        config = {"d_in": d, "n_latents": n, "apply_b_dec_to_input": True}
    else:
        raise FormatError(f"{where}: activation {activation!r} has no flashsae equivalent (expected 'TopK' or 'ReLU')")
    sae = _common.build_sae(architecture, config, weights, placement, file_dtype=W_dec.dtype, where=where)
    metadata: dict[str, Any] = {_common.SOURCE_KEY: "openai", "openai_file": path.name}
    if stats:
        metadata["openai_stats"] = {name: value.tolist() for name, value in stats.items()}
    sae.metadata = _common.json_safe(metadata)
    return sae


__all__ = ["STAT_BUFFERS", "load", "looks_like_openai"]
