"""dictionary_learning (Marks, Karvonen, Mueller et al.): a directory with ``ae.pt`` (a torch state
dict, read with ``torch.load(weights_only=True)``) and ``config.json`` (``{"trainer": {"dict_class":
..., "activation_dim": ..., "dict_size": ..., "k": ..., "lm_name": ..., ...}, "buffer": {...}}``).

Dictionary classes and the forward dictionary_learning defines for each (``Dictionary.encode`` /
``decode``, default arguments), with the flashsae SAE that computes it exactly:

    AutoEncoder             keys bias, encoder.weight [n, d], encoder.bias, decoder.weight [d, n]
                            f = relu(W_e (x - bias) + b_e); x_hat = W_d f + bias       -> ReLUSAE(b_dec subtracted)
    AutoEncoderNew          encoder.weight/bias, decoder.weight/bias (Anthropic April 2024 update)
                            f = relu(W_e x + b_e); x_hat = W_d f + b_d                 -> ReLUSAE(not subtracted)
    GatedAutoEncoder        decoder_bias, encoder.weight, r_mag, gate_bias, mag_bias, decoder.weight
                            f = [W_e x_c + b_gate > 0] relu(exp(r_mag) W_e x_c + b_mag), x_c = x - decoder_bias
                                                                                      -> GatedSAE
    JumpReluAutoEncoder     W_enc [d, n], b_enc, W_dec [n, d], b_dec, threshold (apply_b_dec_to_input is an
                            attribute, False, not saved)
                            f = relu(pre * (pre > threshold)), pre = x W_enc + b_enc  -> JumpReLUSAE("direct")
    AutoEncoderTopK         encoder.weight/bias, decoder.weight, b_dec, k, threshold
                            f = top-k of relu(W_e (x - b_dec) + b_e)                  -> TopKSAE (threshold,
                            used only with use_threshold=True, goes to metadata)
    BatchTopKSAE            as AutoEncoderTopK; encode(use_threshold=True) by default:
                            f = a * (a > threshold), a = relu(W_e (x - b_dec) + b_e)  -> BatchTopKSAE (eval mode;
                            training mode selects the batch top-k, as use_threshold=False does)
    MatryoshkaBatchTopKSAE  W_enc [d, n], b_enc, W_dec [n, d], b_dec, k, threshold, group_sizes
                                                                                      -> MatryoshkaSAE(widths =
                                                                                         cumsum(group_sizes))

A negative JumpReLU threshold gates like 0 after the relu, so thresholds are clamped at 0. The
trainer settings flashsae has fields for (auxk_alpha, threshold_beta, threshold_start_step) are
taken over; the whole config.json is kept in ``metadata["dictionary_learning_config"]``. Decoders
are taken as saved (``AutoEncoder.from_pretrained`` may rescale an unnormalized decoder into the
encoder: same reconstructions, latents scaled by decoder norms). dictionary_learning is read only.
"""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from . import _common
from ._common import FormatError

WEIGHTS_NAME = "ae.pt"
CONFIG_NAME = "config.json"
CONFIG_KEY = "dictionary_learning_config"
DICT_CLASSES = (
    "AutoEncoder",
    "AutoEncoderNew",
    "GatedAutoEncoder",
    "JumpReluAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
)
#: Trainer settings with a flashsae config field of the same meaning, per flashsae architecture.
TRAINER_FIELDS = {
    "topk": ("auxk_alpha",),
    "batchtopk": ("auxk_alpha", "threshold_beta", "threshold_start_step"),
    "matryoshka": ("auxk_alpha", "threshold_beta", "threshold_start_step"),
}


def is_dictionary_learning(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file()


def guess_dict_class(state: dict[str, Any]) -> str | None:
    """The dictionary class whose state-dict keys `state` has (for an ae.pt without config.json)."""
    keys = set(state)
    if {"W_enc", "W_dec", "group_sizes"} <= keys:
        return "MatryoshkaBatchTopKSAE"
    if {"W_enc", "W_dec", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if {"decoder_bias", "r_mag", "gate_bias", "mag_bias"} <= keys:
        return "GatedAutoEncoder"
    if {"encoder.weight", "decoder.weight", "b_dec", "k"} <= keys:
        return None  # AutoEncoderTopK or BatchTopKSAE: same keys, only config.json tells
    if {"encoder.weight", "decoder.weight", "decoder.bias"} <= keys:
        return "AutoEncoderNew"
    if {"encoder.weight", "decoder.weight", "bias"} <= keys:
        return "AutoEncoder"
    return None


def load(path: Path, placement: _common.Placement):
    """A flashsae SAE from a dictionary_learning directory (or its ae.pt); see the module docstring."""
    weights_file = path / WEIGHTS_NAME if path.is_dir() else path
    directory = weights_file.parent
    where = str(weights_file)
    state = _common.read_torch_weights(weights_file)
    if not isinstance(state, dict):
        raise FormatError(f"{where}: expected a state dict, got a {type(state).__name__}")
    # a state dict saved from a torch.compile'd module prefixes every key
    state = {key.removeprefix("_orig_mod."): value for key, value in state.items()}
    config_file = directory / CONFIG_NAME
    config = _common.read_json(config_file) if config_file.is_file() else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    dict_class = trainer.get("dict_class") or guess_dict_class(state)
    if dict_class is None:
        raise FormatError(
            f"{where}: cannot tell the dictionary class from the keys {sorted(state)}; "
            f"add {CONFIG_NAME} with trainer.dict_class"
        )
    if dict_class not in DICT_CLASSES:
        raise FormatError(f"{config_file}: unknown dict_class {dict_class!r}; flashsae reads {', '.join(DICT_CLASSES)}")
    tensors = _common.Tensors(state, where)
    architecture, sae_config, weights, extra = _read(dict_class, tensors, where)
    tensors.finish()
    for name in TRAINER_FIELDS.get(architecture, ()):
        if name in trainer:
            sae_config[name] = trainer[name]
    buffers = {key: value for key, value in weights.items() if key == "threshold"}
    params = {key: value for key, value in weights.items() if key != "threshold"}
    sae = _common.build_sae(architecture, sae_config, params, placement, file_dtype=weights["W_dec"].dtype, where=where)
    if buffers:
        with torch.no_grad():
            sae.threshold.fill_(float(buffers["threshold"]))
    metadata: dict[str, Any] = {_common.SOURCE_KEY: "dictionary_learning", **extra}
    if config:
        metadata[CONFIG_KEY] = config
    if isinstance(trainer.get("lm_name"), str):
        metadata[_common.MODEL_KEY] = trainer["lm_name"]
    if isinstance(trainer.get("submodule_name"), str):
        metadata[_common.HOOKPOINT_KEY] = trainer["submodule_name"]
    elif isinstance(trainer.get("layer"), int):
        metadata["layer"] = trainer["layer"]
    sae.metadata = _common.json_safe(metadata)
    return sae


def _k(tensors: _common.Tensors, n: int) -> int:
    return _common.int_field("k", tensors.take_value("k"), tensors.where, at_most=("dict_size", n))


def _scalar_threshold(tensors: _common.Tensors) -> float:
    value = tensors.take_value("threshold")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FormatError(f"{tensors.where}: threshold must be a scalar, got {value!r}")
    return float(value)


def _read(dict_class: str, tensors: _common.Tensors, where: str):
    """(flashsae architecture, config, flashsae-named weights, extra metadata) of one dict class."""
    state = tensors.tensors
    if dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        d, n = _common.shape_of(state, "W_enc", 2, where)
        weights = {
            "W_enc": tensors.take("W_enc", (d, n)).T,
            "b_enc": tensors.take("b_enc", (n,)),
            "W_dec": tensors.take("W_dec", (n, d)),
            "b_dec": tensors.take("b_dec", (d,)),
        }
        if dict_class == "JumpReluAutoEncoder":
            weights["direct_threshold"] = tensors.take("threshold", (n,)).clamp_min(0)
            config = {"d_in": d, "n_latents": n, "threshold_parametrization": "direct", "apply_b_dec_to_input": False}
            return "jumprelu", config, weights, {}
        sizes = tensors.take("group_sizes", floating=False)
        if sizes.dim() != 1 or int(sizes.sum()) != n or bool((sizes <= 0).any()):
            raise FormatError(f"{where}: group_sizes {sizes.tolist()} must be positive and sum to dict_size={n}")
        widths = list(accumulate(int(s) for s in sizes.tolist()))
        config = {"d_in": d, "n_latents": n, "k": _k(tensors, n), "matryoshka_widths": widths}
        weights["threshold"] = torch.tensor(_scalar_threshold(tensors))
        return "matryoshka", config, weights, {}
    if dict_class == "GatedAutoEncoder":
        n, d = _common.shape_of(state, "encoder.weight", 2, where)
        weights = {
            "W_enc": tensors.take("encoder.weight", (n, d)),
            "b_enc": tensors.take("gate_bias", (n,)),
            "r_mag": tensors.take("r_mag", (n,)),
            "b_mag": tensors.take("mag_bias", (n,)),
            "W_dec": tensors.take("decoder.weight", (d, n)).T,
            "b_dec": tensors.take("decoder_bias", (d,)),
        }
        return "gated", {"d_in": d, "n_latents": n, "apply_b_dec_to_input": True}, weights, {}
    n, d = _common.shape_of(state, "encoder.weight", 2, where)
    weights = {
        "W_enc": tensors.take("encoder.weight", (n, d)),
        "b_enc": tensors.take("encoder.bias", (n,)),
        "W_dec": tensors.take("decoder.weight", (d, n)).T,
    }
    if dict_class == "AutoEncoder":
        weights["b_dec"] = tensors.take("bias", (d,))
        return "relu", {"d_in": d, "n_latents": n, "apply_b_dec_to_input": True}, weights, {}
    if dict_class == "AutoEncoderNew":
        weights["b_dec"] = tensors.take("decoder.bias", (d,))
        return "relu", {"d_in": d, "n_latents": n, "apply_b_dec_to_input": False}, weights, {}
    weights["b_dec"] = tensors.take("b_dec", (d,))
    k = _k(tensors, n)
    threshold = _scalar_threshold(tensors)
    if dict_class == "AutoEncoderTopK":
        return "topk", {"d_in": d, "n_latents": n, "k": k}, weights, {"threshold": threshold}
    weights["threshold"] = torch.tensor(threshold)
    return "batchtopk", {"d_in": d, "n_latents": n, "k": k}, weights, {}


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_dictionary_learning", "load"]
