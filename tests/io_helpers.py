"""Float64 reference forwards of the foreign SAE libraries (written from their public code: SAELens
sae_lens/saes/*.py v6, sparsify sparse_coder.py, dictionary_learning dictionary.py and trainers,
OpenAI sparse_autoencoder model.py, lm-saes models/sae.py), plus helpers that write files to each
library's documented layout and compare a loaded flashsae SAE against a reference.

Every reference returns ``Ref(latents [B, n], x_hat [B, d], margin [B])``: the dense latent
activations and reconstruction the library computes, and per row the distance of its decision
values from the nearest selection boundary (top-k gap, threshold, gate), so tests can keep rows
whose selection float32 rounding cannot flip.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from helpers import assert_close


class Ref(NamedTuple):
    latents: torch.Tensor
    x_hat: torch.Tensor
    margin: torch.Tensor


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def layer_norm_stats(x: torch.Tensor, eps: float = 1e-5):
    """OpenAI's LN (= SAELens layer_norm): mean, unbiased std, eps added to the std."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    return (x - mu) / (std + eps), mu, std


def topk_dense(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """relu of the k largest entries of h per row, zeros elsewhere; margin = k-th minus (k+1)-th."""
    top = h.topk(min(k + 1, h.shape[1]), dim=1)
    dense = torch.zeros_like(h).scatter(1, top.indices[:, :k], top.values[:, :k].relu())
    if k < h.shape[1]:
        # a gap that rounding cannot close, unless both are <= 0 (then neither is active)
        gap = top.values[:, k - 1] - top.values[:, k]
        gap = torch.where(top.values[:, k - 1] <= 0, torch.full_like(gap, math.inf), gap)
    else:
        gap = torch.full((h.shape[0],), math.inf, dtype=h.dtype)
    return dense, gap


def threshold_margin(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return (pre - threshold).abs().min(dim=1).values


# --------------------------------------------------------------------------------------- SAELens


def saelens_reference(cfg: dict, weights: dict[str, torch.Tensor], x: torch.Tensor) -> Ref:
    """SAELens v6 inference SAE forward (encode then decode) for a v6 cfg and its weight file."""
    w = {k: f64(v) for k, v in weights.items()}
    x = f64(x)
    norm = cfg.get("normalize_activations", "none")
    if norm == "layer_norm":
        x_n, mu, std = layer_norm_stats(x)
    elif norm == "constant_norm_rescale":
        coeff = math.sqrt(cfg["d_in"]) / x.norm(dim=-1, keepdim=True)
        x_n = x * coeff
    else:
        x_n = x
    x_c = x_n - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    arch = cfg["architecture"]
    margin = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    W_dec = w["W_dec"]
    if arch == "standard":
        f = (x_c @ w["W_enc"] + w["b_enc"]).relu()
    elif arch == "topk":
        pre = x_c @ w["W_enc"] + w["b_enc"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * W_dec.norm(dim=-1)
        f, margin = topk_dense(pre, cfg["k"])
        if cfg.get("rescale_acts_by_decoder_norm"):
            W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)  # act_times_W_dec: f / |W_dec_i| @ W_dec
    elif arch == "jumprelu":
        pre = x_c @ w["W_enc"] + w["b_enc"]
        f = pre.relu() * (pre > w["threshold"])
        margin = threshold_margin(pre, w["threshold"])
    elif arch == "gated":
        gate = x_c @ w["W_enc"] + w["b_gate"]
        mag = x_c @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
        f = (gate > 0) * mag.relu()
        margin = gate.abs().min(dim=1).values
    else:
        raise AssertionError(arch)
    scaled = f * w["scaling_factor"] if "scaling_factor" in w else f  # pre-6 finetuning scaling
    x_hat = scaled @ W_dec + w["b_dec"]
    if norm == "layer_norm":
        x_hat = x_hat * std + mu
    elif norm == "constant_norm_rescale":
        x_hat = x_hat / coeff
    return Ref(f, x_hat, margin)


def saelens_weights(arch: str, d: int, n: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in SAELens' layout, scaled like a trained SAE (pre-activations ~ N(0, 1))."""
    weights = {
        "W_enc": torch.randn(d, n) * d**-0.5,
        "W_dec": torch.randn(n, d) * (0.5 + torch.rand(n, 1)) * d**-0.5,
        "b_dec": torch.randn(d) * 0.1,
    }
    if arch == "gated":
        weights.update(b_gate=torch.randn(n) * 0.3, r_mag=torch.randn(n) * 0.2, b_mag=torch.randn(n) * 0.3)
    else:
        weights["b_enc"] = torch.randn(n) * 0.3
    if arch == "jumprelu":
        weights["threshold"] = torch.rand(n) * 0.6
    return {k: v.to(dtype) for k, v in weights.items()}


def write_saelens(path: Path, cfg: dict, weights: dict[str, torch.Tensor], sparsity: torch.Tensor | None = None):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    if sparsity is not None:
        save_file({"sparsity": sparsity}, str(path / "sparsity.safetensors"))


def saelens_v6_cfg(arch: str, d: int, n: int, **fields) -> dict:
    cfg = {
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1",
            "sae_lens_training_version": "6.5.1",
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_pre",
            "context_size": 128,
        },
        "architecture": arch,
    }
    cfg.update(fields)
    return cfg


# -------------------------------------------------------------------------------------- sparsify


def sparsify_reference(cfg: dict, weights: dict[str, torch.Tensor], x: torch.Tensor) -> Ref:
    """SparseCoder.forward: top-k of relu(encoder(x [- b_dec])), decode + b_dec (+ x W_skip^T)."""
    w = {k: f64(v) for k, v in weights.items()}
    x = f64(x)
    sae_in = x if cfg.get("transcode") else x - w["b_dec"]
    pre = (sae_in @ w["encoder.weight"].T + w["encoder.bias"]).relu()
    f, margin = topk_dense(pre, cfg["k"])
    y = f @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        y = y + x @ w["W_skip"].T
    return Ref(f, y, margin)


def write_sparsify(path: Path, cfg: dict, weights: dict[str, torch.Tensor]):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------- dictionary_learning


def dictionary_learning_reference(dict_class: str, state: dict, x: torch.Tensor) -> Ref:
    """encode / decode of each dictionary_learning class with default arguments."""
    w = {k: f64(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}
    x = f64(x)
    inf = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    if dict_class == "AutoEncoder":
        f = ((x - w["bias"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
        return Ref(f, f @ w["decoder.weight"].T + w["bias"], inf)
    if dict_class == "AutoEncoderNew":
        f = (x @ w["encoder.weight"].T + w["encoder.bias"]).relu()
        return Ref(f, f @ w["decoder.weight"].T + w["decoder.bias"], inf)
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - w["decoder_bias"]) @ w["encoder.weight"].T
        gate = x_enc + w["gate_bias"]
        f = (gate > 0) * (w["r_mag"].exp() * x_enc + w["mag_bias"]).relu()
        return Ref(f, f @ w["decoder.weight"].T + w["decoder_bias"], gate.abs().min(1).values)
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ w["W_enc"] + w["b_enc"]
        f = (pre * (pre > w["threshold"])).relu()
        return Ref(f, f @ w["W_dec"] + w["b_dec"], threshold_margin(pre, w["threshold"]))
    if dict_class == "AutoEncoderTopK":
        acts = ((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
        f, margin = topk_dense(acts, int(state["k"]))
        return Ref(f, f @ w["decoder.weight"].T + w["b_dec"], margin)
    if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        if dict_class == "BatchTopKSAE":
            acts = ((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
            W_dec = w["decoder.weight"].T
        else:
            acts = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
            W_dec = w["W_dec"]
        threshold = f64(state["threshold"])
        f = acts * (acts > threshold)  # encode(use_threshold=True), the default
        return Ref(f, f @ W_dec + w["b_dec"], threshold_margin(acts, threshold.expand(acts.shape[1])))
    raise AssertionError(dict_class)


# ----------------------------------------------------------------------------------------- OpenAI


def openai_reference(state: dict, x: torch.Tensor) -> Ref:
    """Autoencoder.from_state_dict(state): encode(x) then decode(latents, info)."""
    w = {k: f64(v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    x = f64(x)
    topk = state.get("activation") == "TopK"
    if topk:
        x, mu, std = layer_norm_stats(x)
    pre = (x - w["pre_bias"]) @ w["encoder.weight"].T + w["latent_bias"]
    if topk:
        f, margin = topk_dense(pre, state["activation_state_dict"]["k"])
    else:
        f, margin = pre.relu(), torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    x_hat = f @ w["decoder.weight"].T + w["pre_bias"]
    if topk:
        x_hat = x_hat * std + mu
    return Ref(f, x_hat, margin)


# ---------------------------------------------------------------------------------------- lm-saes


def lm_saes_reference(cfg: dict, state: dict, x: torch.Tensor) -> Ref:
    """lm-saes SparseAutoEncoder on normalized activations: normalize_activations, encode, decode,
    then the prediction scaled back to the input's space. Takes the W_E / W_D layout."""
    w = {k: f64(v) for k, v in state.items()}
    x = f64(x)
    d = cfg["d_model"]
    mode = cfg.get("norm_activation", "dataset-wise")
    if mode == "dataset-wise":
        s_in = math.sqrt(d) / float(state[f"dataset_average_activation_norm.{cfg['hook_point_in']}"])
        s_out = math.sqrt(d) / float(state[f"dataset_average_activation_norm.{cfg['hook_point_out']}"])
    elif mode == "token-wise":
        s_in = s_out = math.sqrt(d) / x.norm(dim=-1, keepdim=True)
    else:
        s_in = s_out = 1.0
    x_n = x * s_in
    if cfg.get("apply_decoder_bias_to_pre_encoder"):
        x_n = x_n - w["b_D"]
    hidden_pre = x_n @ w["W_E"] + w["b_E"]
    norm = w["W_D"].norm(dim=1)
    if cfg.get("sparsity_include_decoder_norm", True):
        hidden_pre = hidden_pre * norm
    act = cfg["act_fn"]
    inf = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    if act == "relu":
        f, margin = hidden_pre * (hidden_pre > 0), inf
    elif act == "topk":
        h = hidden_pre.clamp(min=0)
        kth = h.kthvalue(h.shape[-1] - cfg["top_k"] + 1, dim=-1).values.unsqueeze(-1)
        f = h * h.ge(kth)
        _, margin = topk_dense(hidden_pre, cfg["top_k"])
    elif act == "jumprelu":
        theta = w["activation_function.log_jumprelu_threshold"].exp()
        f = hidden_pre * hidden_pre.gt(theta)
        margin = threshold_margin(hidden_pre, theta)
    else:
        raise AssertionError(act)
    if cfg.get("sparsity_include_decoder_norm", True):
        f = f / norm
    x_hat_n = f @ w["W_D"] + (w["b_D"] if cfg.get("use_decoder_bias", True) else 0)
    return Ref(f, x_hat_n / s_out, margin)


# ------------------------------------------------------------------------------------- comparison


def separated_rows(reference, make_x, rows: int, min_gap: float = 1e-3) -> torch.Tensor:
    """`rows` inputs from make_x(count) whose selections sit at least min_gap from any boundary
    (so float32 rounding in flashsae cannot flip a latent the float64 reference keeps)."""
    kept = []
    for _ in range(20):
        x = make_x(4 * rows)
        kept.append(x[reference(x).margin > min_gap])
        if sum(len(k) for k in kept) >= rows:
            return torch.cat(kept)[:rows]
    raise AssertionError("could not draw inputs away from the selection boundaries")


def assert_matches(sae, ref: Ref, x: torch.Tensor, dtype=torch.float32, what: str = "") -> None:
    """forward (eval mode) and encode + decode of a flashsae SAE against a float64 reference."""
    sae.eval()
    n = sae.n_latents
    with torch.no_grad():
        out = sae(x)
        latents = sae.encode(x)
        # TopK (input_norm) and transcoders (skip) take the input too
        takes_x = "x" in inspect.signature(sae.decode).parameters
        decoded = sae.decode(latents, x) if takes_x else sae.decode(latents)
    assert_close(out.latents.to_dense(n), ref.latents, dtype, f"{what} forward latents")
    assert_close(out.x_hat, ref.x_hat, dtype, f"{what} forward x_hat")
    assert_close(latents.to_dense(n), ref.latents, dtype, f"{what} encode latents")
    assert_close(decoded, ref.x_hat, dtype, f"{what} decode")
