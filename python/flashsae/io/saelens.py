"""SAELens: a directory with ``cfg.json``, ``sae_weights.safetensors`` and optionally
``sparsity.safetensors`` (one tensor ``sparsity`` [d_sae], log10 feature densities).

Weights: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]; jumprelu
adds ``threshold`` [d_sae]; gated has ``b_gate``, ``r_mag``, ``b_mag`` instead of ``b_enc``. Pre-6 files
may add ``scaling_factor`` [d_sae] (finetuning scaling of the activations before decoding).

The forward SAELens defines (``SAE.encode`` / ``decode``, v6; pre-6 is the same math)::

    x_n  = norm_in(x)                                 normalize_activations (below)
    x_c  = x_n - b_dec * apply_b_dec_to_input
    pre  = x_c W_enc + b_enc
    standard: f = relu(pre)
    topk:     h = pre * |W_dec_i| if rescale_acts_by_decoder_norm else pre; f = relu(top-k of h)
    jumprelu: f = relu(pre) * (pre > threshold)
    gated:    f = (x_c W_enc + b_gate > 0) * relu(x_c (W_enc * exp(r_mag)) + b_mag)
    x_hat = norm_out(f' W_dec + b_dec)                f' = f / |W_dec_i| for topk with the rescaling

How flashsae expresses it (exactly; "folded" means an equivalent reparametrization of the weights):
    standard -> ReLUSAE(apply_b_dec_to_input); topk -> TopKSAE(k, apply_b_dec_to_input, input_norm),
    with rescale_acts_by_decoder_norm folded as SAELens itself does when it saves a trained TopK SAE
    (W_enc columns and b_enc times |W_dec_i|, W_dec rows divided by it: the same latents and x_hat);
    jumprelu -> JumpReLUSAE(threshold_parametrization="direct"), thresholds clamped at 0 (a negative
    threshold gates like 0 after the relu); gated -> GatedSAE(apply_b_dec_to_input); a pre-6
    ``scaling_factor`` is folded into the decoder rows.
    normalize_activations: "none"; "layer_norm" and "constant_norm_rescale" become TopKSAE's input_norm
    (an error for other architectures); "expected_average_only_in" and "covariance_whitening" do
    nothing in SAELens' own forward once saved (the scale is folded or applied by the caller), so they
    are kept in metadata and written back unchanged.
    reshape_activations="hook_z": flashsae takes the flattened [..., n_heads * d_head] input.

Saving writes v6 files: topk, standard (ReLUSAE), jumprelu (JumpReLUSAE; BatchTopK and Matryoshka SAEs
as SAELens stores them, a jumprelu with every threshold equal to the estimated one) and gated. A
``flashsae`` block in the config's metadata keeps what SAELens has no field for (training settings,
the architecture a jumprelu came from) and a ``flashsae_state.safetensors`` sidecar the schedule state
(``num_steps``) and a JumpReLU's ``log_threshold``, so loading the directory back restores the same
flashsae SAE (SAELens ignores both; the sidecar is used only while its thresholds still match the file's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..registry import config_fields
from ..storage import atomic_directory
from . import _common
from ._common import FormatError

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SPARSITY_NAME = "sparsity.safetensors"
#: flashsae's sidecar: state tensors SAELens has no key for (num_steps, a JumpReLU's log_threshold).
STATE_NAME = "flashsae_state.safetensors"
#: sae.metadata key of the feature log-sparsities read from sparsity.safetensors (a list of floats).
SPARSITY_KEY = "log_sparsity"
CONFIG_KEY = "saelens_config"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
#: Normalizations SAELens' own forward does not apply once an SAE is saved (see the module docstring).
PASSIVE_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")
ACTIVE_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")
#: Pre-6 config keys and their v6 names.
PRE6_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
#: The format version written into saved configs (SAELens reads a missing or older one as pre-6).
WRITTEN_VERSION = "6.0.0"


def is_saelens(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


# ------------------------------------------------------------------------------------------- config


def _major_version(version: object) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def canonical_config(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A v6-style view of a SAELens config (pre-6 configs are converted the way SAELens does):
    top-level architecture fields plus a ``metadata`` dict holding model_name, hook_name, ..."""
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = raw.get("sae_lens_version") or metadata.get("sae_lens_version")
    major = _major_version(version) if version else None
    if major is not None and major >= 6:
        cfg = dict(raw)
        cfg["metadata"] = dict(metadata)
        cfg.setdefault("architecture", "standard")
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("normalize_activations", "none")
        cfg.setdefault("reshape_activations", "none")
        return cfg
    cfg = {PRE6_RENAMES.get(key, key): value for key, value in raw.items()}
    if "d_sae" not in cfg and isinstance(cfg.get("expansion_factor"), int) and isinstance(cfg.get("d_in"), int):
        cfg["d_sae"] = cfg["d_in"] * cfg["expansion_factor"]  # SAELens <= 2 configs
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("activation_fn", "relu")
    cfg.setdefault("finetuning_scaling_factor", False)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg["activation_fn"] == "topk":
        if "k" not in kwargs:
            raise FormatError(f"{where}: activation_fn is 'topk' but activation_fn_kwargs has no 'k'")
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs["k"]
    elif cfg["architecture"] == "standard" and cfg["activation_fn"] != "relu":
        raise FormatError(
            f"{where}: activation_fn {cfg['activation_fn']!r} has no flashsae equivalent (expected 'relu' or 'topk')"
        )
    normalize = cfg.get("normalize_activations")
    if isinstance(normalize, bool):  # SAELens 2-3 wrote a bool: True meant the April-update scaling
        normalize = "expected_average_only_in" if normalize else "none"
    cfg["normalize_activations"] = normalize or "none"
    cfg.setdefault("reshape_activations", "hook_z" if "hook_z" in str(cfg.get("hook_name") or "") else "none")
    cfg["metadata"] = {
        key: cfg[key]
        for key in ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path")
        if key in cfg
    }
    return cfg


# --------------------------------------------------------------------------------------------- load


def load(path: Path, placement: _common.Placement):
    """A flashsae SAE from a SAELens directory (v6 or pre-6 cfg.json); see the module docstring."""
    raw = _common.read_json(path / CONFIG_NAME)
    block = _flashsae_block(raw)
    state = _common.read_safetensors(path / STATE_NAME) if block is not None and (path / STATE_NAME).is_file() else {}
    sparsity_file = path / SPARSITY_NAME
    sparsity = None
    if sparsity_file.is_file():
        sparsity = _common.Tensors(_common.read_safetensors(sparsity_file), str(sparsity_file))
    sae = from_parts(
        raw,
        _common.read_safetensors(path / WEIGHTS_NAME),
        placement=placement,
        state=state,
        where=str(path / CONFIG_NAME),
        weights_where=str(path / WEIGHTS_NAME),
    )
    if sparsity is not None:
        sae.metadata[SPARSITY_KEY] = sparsity.take("sparsity", (sae.n_latents,)).double().tolist()
        sparsity.finish()
    return sae


def _flashsae_block(raw: dict[str, Any]) -> dict[str, Any] | None:
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    block = metadata.get(_common.FLASHSAE_BLOCK)
    return block if isinstance(block, dict) else None


def from_parts(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    placement: _common.Placement | None = None,
    state: dict[str, torch.Tensor] | None = None,
    where: str = "config",
    weights_where: str = "tensors",
):
    """A flashsae SAE from a SAELens config dict (what cfg.json holds, or ``SAE.cfg.to_dict()`` of a
    loaded SAELens SAE) and its weights (``sae_weights.safetensors``' names and layouts, or the SAELens
    SAE's ``state_dict()``). `state`: flashsae's sidecar tensors, when there are any. What
    :func:`load` does once the files are read; the module docstring says how each field maps."""
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict (a SAELens config), got {type(config).__name__}")
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors: expected a dict of tensors (a SAELens state_dict), got {type(tensors).__name__}")
    placement = placement or _common.Placement()
    state = state or {}
    raw = config
    cfg = canonical_config(raw, where)
    tensors = _common.Tensors(tensors, weights_where)
    architecture = cfg["architecture"]
    if architecture not in ARCHITECTURES:
        raise FormatError(
            f"{where}: unknown architecture {architecture!r}; flashsae reads SAELens {', '.join(ARCHITECTURES)}"
        )
    d_in, d_sae = _common.int_field("d_in", cfg.get("d_in"), where), _common.int_field("d_sae", cfg.get("d_sae"), where)
    apply_b_dec = _common.bool_field("apply_b_dec_to_input", cfg.get("apply_b_dec_to_input"), where)
    normalize = cfg["normalize_activations"]
    if normalize not in PASSIVE_NORMALIZATIONS + ACTIVE_NORMALIZATIONS:
        raise FormatError(f"{where}: unknown normalize_activations {normalize!r}")
    if normalize in ACTIVE_NORMALIZATIONS and architecture != "topk":
        raise FormatError(
            f"{where}: normalize_activations={normalize!r} is supported for topk SAEs only (flashsae's "
            f"input_norm), not for {architecture!r}"
        )
    if cfg["reshape_activations"] not in ("none", "hook_z"):
        raise FormatError(f"{where}: unknown reshape_activations {cfg['reshape_activations']!r}")
    file_dtype = tensors.tensors.get("W_dec", torch.empty(0)).dtype
    saved_dtype = _common.parse_dtype(cfg["dtype"], f"{where}: dtype") if "dtype" in cfg else file_dtype
    target_dtype = placement.dtype_or(saved_dtype)

    W_enc = tensors.take("W_enc", (d_in, d_sae)).T.double()
    W_dec = tensors.take("W_dec", (d_sae, d_in)).double()
    b_dec = tensors.take("b_dec", (d_in,))
    if "scaling_factor" in tensors:  # pre-6 finetuning scaling: f * s before the decoder
        scale = tensors.take("scaling_factor", (d_sae,)).double()
        if not torch.all(scale == 1):
            if not cfg.get("finetuning_scaling_factor"):
                raise FormatError(f"{weights_where}: scaling_factor is present but finetuning_scaling_factor is false")
            W_dec = W_dec * scale.unsqueeze(1)
    config: dict[str, Any] = {"d_in": d_in, "n_latents": d_sae}
    weights: dict[str, torch.Tensor] = {}
    if architecture == "gated":
        b_enc = tensors.take("b_gate", (d_sae,)).double()
        weights["r_mag"] = tensors.take("r_mag", (d_sae,))
        weights["b_mag"] = tensors.take("b_mag", (d_sae,))
    else:
        b_enc = tensors.take("b_enc", (d_sae,)).double()
    if architecture == "standard":
        name = "relu"
        config["apply_b_dec_to_input"] = apply_b_dec
    elif architecture == "gated":
        name = "gated"
        config["apply_b_dec_to_input"] = apply_b_dec
    elif architecture == "topk":
        name = "topk"
        k = _common.int_field("k", cfg.get("k"), where)
        if k > d_sae:
            raise FormatError(f"{where}: k={k} exceeds d_sae={d_sae}")
        config.update(
            k=k,
            apply_b_dec_to_input=apply_b_dec,
            input_norm=normalize if normalize in ACTIVE_NORMALIZATIONS else "none",
        )
        if cfg.get("rescale_acts_by_decoder_norm", False):
            norms = _common.decoder_norms(W_dec, f"{where}: rescale_acts_by_decoder_norm")
            W_enc, b_enc, W_dec = W_enc * norms.unsqueeze(1), b_enc * norms, W_dec / norms.unsqueeze(1)
    else:  # jumprelu
        name = "jumprelu"
        threshold = tensors.take("threshold", (d_sae,)).double().clamp_min(0)
        config.update(apply_b_dec_to_input=apply_b_dec, threshold_parametrization="direct")
        weights["direct_threshold"] = threshold
    tensors.finish()
    weights.update(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    # rounding to the target dtype happens once, from float64 (folds above are exact in float64)
    weights = {key: value.to(target_dtype) for key, value in weights.items()}

    block = cfg["metadata"].get(_common.FLASHSAE_BLOCK)
    block = block if isinstance(block, dict) else None
    if block is None:
        state = {}
    if name == "jumprelu" and block is not None and block.get("architecture") == name:
        _restore_log_threshold(block, state, config, weights)
    sae = _restore_from_block(block, name, config, weights, placement, target_dtype, where)
    if sae is None:
        if block is not None and block.get("architecture") == name:
            config = {**_training_fields(block, name), **config}
        sae = _common.build_sae(name, config, weights, placement, file_dtype=target_dtype, where=weights_where)
    if "num_steps" in state and hasattr(sae, "num_steps") and block.get("architecture") == sae.architecture:
        with torch.no_grad():
            sae.num_steps.fill_(int(state["num_steps"]))
    metadata = dict(block.get("metadata", {})) if block is not None else {}
    saelens_config = dict(raw)
    if isinstance(saelens_config.get("metadata"), dict):
        saelens_config["metadata"] = {
            k: v for k, v in saelens_config["metadata"].items() if k != _common.FLASHSAE_BLOCK
        }
    metadata[_common.SOURCE_KEY] = "saelens"
    metadata[CONFIG_KEY] = _common.json_safe(saelens_config)
    if cfg["metadata"].get("model_name") is not None:
        metadata[_common.MODEL_KEY] = cfg["metadata"]["model_name"]
    if cfg["metadata"].get("hook_name") is not None:
        metadata[_common.HOOKPOINT_KEY] = cfg["metadata"]["hook_name"]
    sae.metadata = metadata
    return sae


def _training_fields(block: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The saved flashsae config of `architecture`, minus the fields the SAELens file determines."""
    known = config_fields(architecture)
    saved = block.get("config") if isinstance(block.get("config"), dict) else {}
    return {key: value for key, value in saved.items() if key in known}


def _restore_log_threshold(block, state, config, weights) -> None:
    """Switches a jumprelu read from SAELens back to the log parametrization it was saved with, when
    the sidecar's log_threshold still gives exactly the file's thresholds (else: direct, exact)."""
    saved = block.get("config") if isinstance(block.get("config"), dict) else {}
    log = state.get("log_threshold")
    threshold = weights["direct_threshold"]
    if saved.get("threshold_parametrization") != "log" or log is None or tuple(log.shape) != tuple(threshold.shape):
        return
    log = log.to(threshold.dtype)
    if torch.equal(log.exp(), threshold):
        del weights["direct_threshold"]
        weights["log_threshold"] = log
        config["threshold_parametrization"] = "log"


def _restore_from_block(block, name, config, weights, placement, dtype, where):
    """A BatchTopK / Matryoshka SAE saved as a SAELens jumprelu, rebuilt from its flashsae block when
    the file still says what the block says (one shared threshold, b_dec subtracted); else None."""
    if block is None or name != "jumprelu" or block.get("architecture") not in ("batchtopk", "matryoshka"):
        return None
    threshold = weights["direct_threshold"]
    if not (config["apply_b_dec_to_input"] and torch.all(threshold == threshold[0])):
        return None
    estimate = block.get("threshold")
    if not (isinstance(estimate, (int, float)) and torch.tensor(estimate, dtype=dtype) == threshold[0]):
        estimate = float(threshold[0])  # the file was edited: its threshold wins
    architecture = block["architecture"]
    fields = _training_fields(block, architecture)
    fields.update(d_in=config["d_in"], n_latents=config["n_latents"])
    core = {key: weights[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae = _common.build_sae(architecture, fields, core, placement, file_dtype=dtype, where=where)
    with torch.no_grad():
        sae.threshold.fill_(estimate)
    return sae


# --------------------------------------------------------------------------------------------- save


def save(sae, path: Path) -> Path:
    """Writes `sae` as a SAELens v6 directory, atomically; FormatError naming the field for what
    SAELens cannot express."""
    config, tensors, state = to_parts(sae)
    sparsity = sae.metadata.get(SPARSITY_KEY)
    with atomic_directory(path) as staging:
        _common.write_safetensors(staging / WEIGHTS_NAME, tensors)
        _common.write_json(staging / CONFIG_NAME, config)
        if state:
            _common.write_safetensors(staging / STATE_NAME, state)
        if sparsity is not None:
            sparsity_tensor = torch.tensor(sparsity, dtype=torch.float32)
            _common.write_safetensors(staging / SPARSITY_NAME, {"sparsity": sparsity_tensor})
    return Path(path)


def to_parts(sae) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`sae` in SAELens' terms: (v6 config dict, weights in SAELens' names and layouts, flashsae's
    sidecar state). The config and weights are what ``cfg.json`` / ``sae_weights.safetensors`` hold
    and what a SAELens ``SAE.from_dict(config)`` + ``load_state_dict(weights)`` takes. The weights
    are detached tensors (views of the SAE's parameters where the layout allows: W_enc is the
    transpose). FormatError naming the field for what SAELens cannot express."""
    architecture, fields, tensors = _saelens_layout(sae)
    carried = sae.metadata.get(CONFIG_KEY) if isinstance(sae.metadata.get(CONFIG_KEY), dict) else {}
    carried_meta = carried.get("metadata") if isinstance(carried.get("metadata"), dict) else {}
    metadata = {key: value for key, value in carried_meta.items() if key != _common.FLASHSAE_BLOCK}
    metadata.setdefault("sae_lens_version", WRITTEN_VERSION)
    if _major_version(metadata["sae_lens_version"]) is None or _major_version(metadata["sae_lens_version"]) < 6:
        metadata["sae_lens_version"] = WRITTEN_VERSION
    if sae.metadata.get(_common.MODEL_KEY) is not None:
        metadata["model_name"] = sae.metadata[_common.MODEL_KEY]
    if sae.metadata.get(_common.HOOKPOINT_KEY) is not None:
        metadata["hook_name"] = sae.metadata[_common.HOOKPOINT_KEY]
    sparsity = sae.metadata.get(SPARSITY_KEY)
    if sparsity is not None and len(sparsity) != sae.n_latents:
        raise FormatError(f"metadata: {SPARSITY_KEY} has {len(sparsity)} entries, expected n_latents={sae.n_latents}")
    own_metadata = {
        key: value for key, value in sae.metadata.items() if key not in (CONFIG_KEY, SPARSITY_KEY, _common.SOURCE_KEY)
    }
    block: dict[str, Any] = {"architecture": sae.architecture, "config": sae.config.to_dict(), "metadata": own_metadata}
    if sae.architecture in ("batchtopk", "matryoshka"):
        block["threshold"] = float(sae.threshold)
    metadata[_common.FLASHSAE_BLOCK] = _common.json_safe(block)
    normalization = fields.pop("normalize_activations")
    if normalization == "none" and carried.get("normalize_activations") in PASSIVE_NORMALIZATIONS:
        normalization = carried["normalize_activations"]
    reshape = carried.get("reshape_activations", "none")
    config = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "normalize_activations": normalization,
        "reshape_activations": reshape if reshape in ("none", "hook_z") else "none",
        **fields,
        "metadata": metadata,
    }
    state = {"num_steps": sae.num_steps.detach()} if hasattr(sae, "num_steps") else {}
    if sae.architecture == "jumprelu" and sae.config.threshold_parametrization == "log":
        state["log_threshold"] = sae.log_threshold.detach()
    return config, {name: tensor.detach() for name, tensor in tensors.items()}, state


def _saelens_layout(sae) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, architecture config fields, tensors) of `sae` in SAELens' layout."""
    cfg = sae.config
    with torch.no_grad():
        core = {"W_enc": sae.W_enc.T, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        if sae.architecture == "topk":
            fields = {
                "k": cfg.k,
                "rescale_acts_by_decoder_norm": False,
                "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
                "normalize_activations": cfg.input_norm,
            }
            return "topk", fields, {**core, "b_enc": sae.b_enc}
        if sae.architecture == "relu":
            fields = {"apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none"}
            return "standard", fields, {**core, "b_enc": sae.b_enc}
        if sae.architecture == "gated":
            fields = {"apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none"}
            return "gated", fields, {**core, "b_gate": sae.b_enc, "r_mag": sae.r_mag, "b_mag": sae.b_mag}
        if sae.architecture == "jumprelu":
            threshold = sae.threshold.detach()
            if (threshold < 0).any():
                raise FormatError("threshold: SAELens gates relu(pre) by the threshold, so negative thresholds differ")
            fields = {"apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none"}
            return "jumprelu", fields, {**core, "b_enc": sae.b_enc, "threshold": threshold}
        if sae.architecture in ("batchtopk", "matryoshka"):
            estimate = float(sae.threshold)
            if not (math.isfinite(estimate) and estimate >= 0):
                raise FormatError(
                    f"threshold: this {sae.architecture} SAE has no inference threshold yet (value {estimate}); "
                    "SAELens stores BatchTopK SAEs as jumprelu with that threshold, so train it past "
                    f"threshold_start_step={cfg.threshold_start_step} first"
                )
            threshold = sae.inference_threshold()
            fields = {"apply_b_dec_to_input": True, "normalize_activations": "none"}
            return "jumprelu", fields, {**core, "b_enc": sae.b_enc, "threshold": threshold}
    raise FormatError(
        f"architecture: SAELens has no {sae.architecture!r} SAE (flashsae writes topk, relu, jumprelu, gated, "
        "batchtopk and matryoshka to SAELens); save it as native, or sparsify for a transcoder"
    )


__all__ = [
    "CONFIG_NAME",
    "SPARSITY_NAME",
    "WEIGHTS_NAME",
    "canonical_config",
    "from_parts",
    "is_saelens",
    "load",
    "save",
    "to_parts",
]
