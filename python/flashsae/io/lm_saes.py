"""Llama Scope / lm-saes (OpenMOSS Language-Model-SAEs), in both layouts found in the wild:

* lm-saes: a directory with ``config.json`` and ``sae_weights.safetensors`` (or ``sae_weights.pt``,
  ``{"sae": state_dict}``): ``W_E`` [d_model, d_sae], ``b_E`` [d_sae], ``W_D`` [d_sae, d_model],
  ``b_D`` [d_model] (when use_decoder_bias), ``activation_function.log_jumprelu_threshold`` [d_sae] for
  jumprelu, and ``dataset_average_activation_norm.<hook point>`` scalars;
* Llama Scope releases: ``hyperparams.json`` and ``checkpoints/final.safetensors`` with
  ``encoder.weight`` [d_sae, d_model], ``encoder.bias``, ``decoder.weight`` [d_model, d_sae],
  ``decoder.bias``; a scalar ``jump_relu_threshold`` and ``dataset_average_activation_norm``
  ``{"in": ..., "out": ...}`` in the hyperparameters.

Config fields read: ``sae_type`` ("sae"), ``d_model``, ``d_sae`` (or ``expansion_factor``), ``act_fn``
("relu", "topk", "jumprelu"), ``top_k``, ``norm_activation``, ``sparsity_include_decoder_norm``,
``use_decoder_bias``, ``apply_decoder_bias_to_pre_encoder`` (older configs), ``use_glu_encoder``,
``hook_point_in`` / ``hook_point_out``.

The forward lm-saes defines, on the activations it trains on (x scaled by s_in, the prediction
scaled back by s_out; s = sqrt(d_model) / dataset_average_activation_norm with "dataset-wise"
normalization, 1 with "inference")::

    pre   = (s_in x [- b_D]) W_E + b_E ;  h = pre * |W_D_i| if sparsity_include_decoder_norm else pre
    f     = act(h) (/ |W_D_i| with sparsity_include_decoder_norm)
            relu: h * (h > 0);  topk: h * (h >= k-th largest of relu(h));  jumprelu: h * (h > exp(log_threshold))
    x_hat = (f W_D + b_D) / s_out

-> ReLUSAE / TopKSAE / JumpReLUSAE, b_dec subtracted iff apply_decoder_bias_to_pre_encoder
(Transcoder for a topk SAE whose hook_point_out differs from hook_point_in): W_enc = s_in W_E^T,
W_dec = W_D / s_out, b_dec = b_D / s_out, so the latents are lm-saes' latents for the scaled input,
for any act_fn (lm-saes' own fold_activation_scale leaves jumprelu thresholds unscaled). With
sparsity_include_decoder_norm, topk and jumprelu SAEs are folded: W_enc rows and b_enc times |W_D_i|,
W_dec rows divided by it. The active latents and x_hat are lm-saes'; the latent values are lm-saes'
times |W_D_i| (the unit-decoder-norm convention; relu needs no fold and stays exact).
"token-wise" normalization becomes TopKSAE's input_norm="constant_norm_rescale" (topk only).
Read only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import _common
from ._common import FormatError

CONFIG_NAME = "config.json"
HYPERPARAMS_NAME = "hyperparams.json"
WEIGHT_CANDIDATES = (
    "sae_weights.safetensors",
    "sae_weights.pt",
    "checkpoints/pruned.safetensors",
    "checkpoints/pruned.pt",
    "checkpoints/final.safetensors",
    "checkpoints/final.pt",
)
CONFIG_KEY = "lm_saes_config"
ACT_FNS = ("relu", "topk", "jumprelu")
NORM_MODES = ("dataset-wise", "inference", "token-wise")
THRESHOLD_KEY = "activation_function.log_jumprelu_threshold"
NORM_PREFIX = "dataset_average_activation_norm."


def weights_file(path: Path) -> Path | None:
    return next((path / name for name in WEIGHT_CANDIDATES if (path / name).is_file()), None)


def is_lm_saes(path: Path) -> bool:
    config = path / HYPERPARAMS_NAME if (path / HYPERPARAMS_NAME).is_file() else path / CONFIG_NAME
    if not config.is_file() or weights_file(path) is None:
        return False
    try:
        cfg = _common.read_json(config)
    except (FormatError, OSError):
        return False
    return "d_model" in cfg or "sae_type" in cfg


def load(path: Path, placement: _common.Placement):
    """A flashsae SAE from an lm-saes / Llama Scope directory (module docstring)."""
    config_file = path / HYPERPARAMS_NAME if (path / HYPERPARAMS_NAME).is_file() else path / CONFIG_NAME
    cfg = _common.read_json(config_file)
    where = str(config_file)
    file = weights_file(path)
    if file is None:
        raise FileNotFoundError(f"path: {path} has none of {', '.join(WEIGHT_CANDIDATES)}")
    if file.suffix == ".pt":
        loaded = _common.read_torch_weights(file)
        if not (isinstance(loaded, dict) and isinstance(loaded.get("sae"), dict)):
            raise FormatError(f"{file}: expected {{'sae': state_dict, ...}} as lm-saes saves .pt checkpoints")
        raw = loaded["sae"]
    else:
        raw = _common.read_safetensors(file)
    tensors = _common.Tensors(raw, str(file))

    sae_type = cfg.get("sae_type", "sae")
    if sae_type != "sae":
        raise FormatError(f"{where}: sae_type {sae_type!r} (crosscoders, CLTs, ...) has no flashsae equivalent")
    if cfg.get("use_glu_encoder", False):
        raise FormatError(f"{where}: use_glu_encoder=true has no flashsae equivalent")
    act_fn = str(cfg.get("act_fn", "relu")).lower()
    if act_fn not in ACT_FNS:
        raise FormatError(f"{where}: act_fn {act_fn!r} has no flashsae equivalent (expected one of {ACT_FNS})")
    d = _common.int_field("d_model", cfg.get("d_model"), where)
    n = cfg.get("d_sae")
    if n is None and isinstance(cfg.get("expansion_factor"), (int, float)):
        n = int(d * cfg["expansion_factor"])
    n = _common.int_field("d_sae", n, where)
    hook_in = cfg.get("hook_point_in", cfg.get("hook_point"))
    hook_out = cfg.get("hook_point_out", hook_in)

    # weights (two namings), in float64 for the folds
    decoders = [raw[key] for key in ("W_D", "decoder.weight") if isinstance(raw.get(key), torch.Tensor)]
    file_dtype = decoders[0].dtype if decoders else torch.float32
    if "W_E" in tensors:
        W_enc = tensors.take("W_E", (d, n)).T.double()
        b_enc = tensors.take("b_E", (n,)).double()
        W_dec = tensors.take("W_D", (n, d)).double()
        bias_name = "b_D"
    else:
        W_enc = tensors.take("encoder.weight", (n, d)).double()
        b_enc = tensors.take("encoder.bias", (n,)).double()
        W_dec = tensors.take("decoder.weight", (d, n)).T.double()
        bias_name = "decoder.bias"
    use_decoder_bias = cfg.get("use_decoder_bias", bias_name in tensors)
    b_dec = tensors.take(bias_name, (d,)).double() if use_decoder_bias else torch.zeros(d, dtype=torch.float64)
    dataset_norms = {
        key.removeprefix(NORM_PREFIX): float(tensors.take_value(key))
        for key in list(raw)
        if key.startswith(NORM_PREFIX)
    }
    if isinstance(cfg.get("dataset_average_activation_norm"), dict):
        for key, value in cfg["dataset_average_activation_norm"].items():
            dataset_norms.setdefault({"in": hook_in, "out": hook_out}.get(key, key), float(value))

    norm_mode = cfg.get("norm_activation", "inference")
    if norm_mode not in NORM_MODES:
        raise FormatError(f"{where}: norm_activation {norm_mode!r} has no flashsae equivalent (expected {NORM_MODES})")
    s_in = s_out = 1.0
    if norm_mode == "dataset-wise":
        s_in = _scale(dataset_norms, hook_in, d, where)
        s_out = _scale(dataset_norms, hook_out, d, where)
    # |W_D_i| of the file's decoder (lm-saes measures it before any scaling)
    norms = None
    if _folds_norm(cfg, act_fn):
        norms = _common.decoder_norms(W_dec, f"{where}: sparsity_include_decoder_norm")
    W_enc, W_dec, b_dec = W_enc * s_in, W_dec / s_out, b_dec / s_out

    threshold = None
    if act_fn == "jumprelu":
        if THRESHOLD_KEY in tensors:
            threshold = ("log", tensors.take(THRESHOLD_KEY, (n,)))
        elif "log_jumprelu_threshold" in tensors:
            threshold = ("log", tensors.take("log_jumprelu_threshold", (n,)))
        elif isinstance(cfg.get("jump_relu_threshold"), (int, float)):
            threshold = ("direct", torch.full((n,), float(cfg["jump_relu_threshold"]), dtype=torch.float64))
        else:
            raise FormatError(
                f"{where}: act_fn is jumprelu but neither {THRESHOLD_KEY} nor jump_relu_threshold is given"
            )
    tensors.finish()
    if norms is not None:
        W_enc, b_enc, W_dec = W_enc * norms.unsqueeze(1), b_enc * norms, W_dec / norms.unsqueeze(1)

    # (s_in x - b_D) W = (x - b_dec) s_in W with b_dec = b_D / s_out only when s_in == s_out
    pre_bias = bool(cfg.get("apply_decoder_bias_to_pre_encoder", False))
    if pre_bias and (s_in != s_out or not use_decoder_bias or hook_out != hook_in):
        raise FormatError(
            f"{where}: apply_decoder_bias_to_pre_encoder=true needs one hook point, a decoder bias and equal "
            "input / output scales (flashsae subtracts the decoder bias in the input's own space)"
        )
    config: dict[str, Any] = {"d_in": d, "n_latents": n}
    if hook_out != hook_in:
        if act_fn != "topk" or norm_mode == "token-wise":
            raise FormatError(
                f"{where}: hook_point_out differs from hook_point_in (a transcoder); flashsae's transcoder is "
                f"TopK without per-token normalization (act_fn={act_fn!r}, norm_activation={norm_mode!r})"
            )
        architecture = "transcoder"
        config.update(k=_top_k(cfg, n, where), d_out=d)
    elif act_fn == "topk":
        architecture = "topk"
        input_norm = "constant_norm_rescale" if norm_mode == "token-wise" else "none"
        config.update(k=_top_k(cfg, n, where), apply_b_dec_to_input=pre_bias, input_norm=input_norm)
    else:
        if norm_mode == "token-wise":
            raise FormatError(f"{where}: norm_activation='token-wise' is supported for topk SAEs only, not {act_fn!r}")
        architecture = "relu" if act_fn == "relu" else "jumprelu"
        config["apply_b_dec_to_input"] = pre_bias
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        kind, value = threshold
        config["threshold_parametrization"] = kind
        weights["log_threshold" if kind == "log" else "direct_threshold"] = value
    target_dtype = placement.dtype_or(file_dtype)
    weights = {key: value.to(target_dtype) for key, value in weights.items()}
    sae = _common.build_sae(architecture, config, weights, placement, file_dtype=target_dtype, where=str(file))
    metadata: dict[str, Any] = {_common.SOURCE_KEY: "lm_saes", CONFIG_KEY: cfg}
    if isinstance(hook_in, str):
        metadata[_common.HOOKPOINT_KEY] = hook_in
    if isinstance(hook_out, str) and hook_out != hook_in:
        metadata["hookpoint_out"] = hook_out
    model = cfg.get("model_name")
    if isinstance(model, str):
        metadata[_common.MODEL_KEY] = model
    if dataset_norms:
        metadata["dataset_average_activation_norm"] = dataset_norms
    sae.metadata = _common.json_safe(metadata)
    return sae


def _folds_norm(cfg: dict[str, Any], act_fn: str) -> bool:
    """relu(h |W_D_i|) / |W_D_i| = relu(h): only topk and jumprelu selections depend on the norms."""
    return bool(cfg.get("sparsity_include_decoder_norm", True)) and act_fn != "relu"


def _top_k(cfg: dict[str, Any], n: int, where: str) -> int:
    k = _common.int_field("top_k", cfg.get("top_k"), where)
    if k > n:
        raise FormatError(f"{where}: top_k={k} exceeds d_sae={n}")
    return k


def _scale(norms: dict[str, float], hook: object, d: int, where: str) -> float:
    if hook not in norms:
        raise FormatError(
            f"{where}: norm_activation is 'dataset-wise' but there is no dataset_average_activation_norm for "
            f"{hook!r} (found: {sorted(norms)})"
        )
    norm = norms[hook]
    if not (math.isfinite(norm) and norm > 0):
        raise FormatError(f"{where}: dataset_average_activation_norm of {hook!r} must be > 0, got {norm}")
    return math.sqrt(d) / norm


__all__ = ["CONFIG_NAME", "HYPERPARAMS_NAME", "is_lm_saes", "load"]
