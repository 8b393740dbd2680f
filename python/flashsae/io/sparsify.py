"""sparsify (EleutherAI): one directory per hookpoint with ``cfg.json`` and ``sae.safetensors``; a
training run's directory holds one such folder per hookpoint (``layers.0``, ``layers.1.mlp``, ...)
and a ``config.json`` with the run's settings (``model``, ...).

cfg.json: ``activation`` ("topk"; "groupmax" has no flashsae equivalent), ``k``, ``num_latents``
(0 means ``d_in * expansion_factor``), ``expansion_factor``, ``multi_topk``, ``skip_connection``,
``transcode``, ``normalize_decoder``, ``d_in``.
sae.safetensors: ``encoder.weight`` [n, d_in], ``encoder.bias`` [n], ``W_dec`` [n, d_in], ``b_dec``
[d_in] and, with a skip connection, ``W_skip`` [d_in, d_in].

The forward sparsify defines (``SparseCoder.encode`` / ``decode`` / ``forward``)::

    x_c   = x - b_dec          (an SAE; a transcoder encodes x itself)
    top-k of relu(x_c W^T + b) -> (values, indices)
    y_hat = sum_j values_j W_dec[indices_j] + b_dec  (+ x W_skip^T with a skip connection)

which is flashsae's TopKSAE (SAE, optional multi_topk) and Transcoder (transcode, optional skip)
exactly. An SAE with a skip connection but no transcoding (it subtracts b_dec and adds a skip) has no
flashsae architecture: an error names skip_connection. Saving writes TopK SAEs and transcoders; every
other architecture is an error naming what sparsify cannot hold (a BatchTopK SAE's threshold, a
JumpReLU threshold, ...). A ``flashsae.json`` sidecar (sparsify ignores files it does not know) keeps
the training settings and metadata sparsify has no field for, so a round trip restores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..registry import config_fields
from ..storage import atomic_directory
from . import _common
from ._common import FormatError

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
RUN_CONFIG_NAME = "config.json"
#: Sidecar with flashsae's block (architecture, full config, metadata): sparsify ignores files it does
#: not know, while unknown cfg.json fields make it print a warning on every load.
BLOCK_NAME = "flashsae.json"
CONFIG_KEY = "sparsify_config"
#: sparsify's defaults for fields an older cfg.json may lack (SparseCoderConfig).
DEFAULTS = {
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}


def is_sparsify(path: Path) -> bool:
    """A directory with cfg.json + sae.safetensors that is not a flashsae checkpoint."""
    if not ((path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        return False
    try:
        return _common.read_json(path / CONFIG_NAME).get("format") != "flashsae"
    except (FormatError, OSError):
        return False


def _field(cfg: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = cfg.get(name, DEFAULTS.get(name))
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise FormatError(f"{where}: {name} must be {kind.__name__}, got {value!r}")
    return value


def load(path: Path, placement: _common.Placement):
    """A flashsae TopKSAE or Transcoder from a sparsify hookpoint directory (module docstring)."""
    cfg = _common.read_json(path / CONFIG_NAME)
    where = str(path / CONFIG_NAME)
    weights_where = str(path / WEIGHTS_NAME)
    raw = _common.read_safetensors(path / WEIGHTS_NAME)
    activation = _field(cfg, "activation", str, where)
    if activation != "topk":
        raise FormatError(f"{where}: activation {activation!r} has no flashsae equivalent (expected 'topk')")
    if cfg.get("signed", False):
        raise FormatError(f"{where}: signed=true (top-k by absolute value) has no flashsae equivalent")
    d_in = cfg.get("d_in")
    if d_in is None:
        d_in = _common.shape_of(raw, "encoder.weight", 2, weights_where)[1]
    d_in = _common.int_field("d_in", d_in, where)
    num_latents = _field(cfg, "num_latents", int, where)
    n = num_latents or d_in * _field(cfg, "expansion_factor", int, where)
    if n < 1:
        raise FormatError(f"{where}: num_latents / expansion_factor give {n} latents")
    k = _field(cfg, "k", int, where)
    if not 1 <= k <= n:
        raise FormatError(f"{where}: k={k} must be in [1, num_latents={n}]")
    transcode = _field(cfg, "transcode", bool, where)
    skip = _field(cfg, "skip_connection", bool, where)
    multi_topk = _field(cfg, "multi_topk", bool, where)
    _field(cfg, "normalize_decoder", bool, where)

    tensors = _common.Tensors(raw, weights_where)
    weights = {
        "W_enc": tensors.take("encoder.weight", (n, d_in)),
        "b_enc": tensors.take("encoder.bias", (n,)),
        "W_dec": tensors.take("W_dec", (n, d_in)),
        "b_dec": tensors.take("b_dec", (d_in,)),
    }
    if skip:
        if not transcode:
            raise FormatError(
                f"{where}: skip_connection=true without transcode (an SAE that subtracts b_dec and adds a skip "
                "connection) has no flashsae architecture; flashsae's skip connection is the transcoder's"
            )
        weights["W_skip"] = tensors.take("W_skip", (d_in, d_in))
    tensors.finish()
    if transcode:
        architecture = "transcoder"
        config: dict[str, Any] = {"d_in": d_in, "n_latents": n, "d_out": d_in, "k": k, "skip": skip}
    else:
        architecture = "topk"
        config = {"d_in": d_in, "n_latents": n, "k": k, "multi_topk": multi_topk}
    block = _common.read_json(path / BLOCK_NAME) if (path / BLOCK_NAME).is_file() else None
    if block is not None and block.get("architecture") == architecture and isinstance(block.get("config"), dict):
        known = config_fields(architecture)
        config = {**{key: v for key, v in block["config"].items() if key in known}, **config}
    sae = _common.build_sae(
        architecture, config, weights, placement, file_dtype=weights["W_dec"].dtype, where=weights_where
    )
    metadata = dict(block.get("metadata", {})) if block is not None else {}
    metadata[_common.SOURCE_KEY] = "sparsify"
    metadata[CONFIG_KEY] = cfg
    metadata[_common.HOOKPOINT_KEY] = path.name
    run_config = path.parent / RUN_CONFIG_NAME
    if run_config.is_file():
        try:
            model = _common.read_json(run_config).get("model")
        except FormatError:
            model = None
        if isinstance(model, str):
            metadata[_common.MODEL_KEY] = model
    sae.metadata = _common.json_safe(metadata)
    return sae


def save(sae, path: Path) -> Path:
    """Writes `sae` (a TopKSAE or Transcoder) as a sparsify hookpoint directory, atomically."""
    cfg, tensors = _sparsify_layout(sae)
    carried = sae.metadata.get(CONFIG_KEY) if isinstance(sae.metadata.get(CONFIG_KEY), dict) else {}
    own_metadata = {key: value for key, value in sae.metadata.items() if key not in (CONFIG_KEY, _common.SOURCE_KEY)}
    payload = {**{key: value for key, value in carried.items() if key not in DEFAULTS and key != "d_in"}, **cfg}
    block = {"architecture": sae.architecture, "config": sae.config.to_dict(), "metadata": own_metadata}
    with atomic_directory(path) as staging:
        _common.write_safetensors(staging / WEIGHTS_NAME, tensors)
        _common.write_json(staging / CONFIG_NAME, payload)
        _common.write_json(staging / BLOCK_NAME, _common.json_safe(block))
    return Path(path)


def _sparsify_layout(sae) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = sae.config
    carried = sae.metadata.get(CONFIG_KEY) if isinstance(sae.metadata.get(CONFIG_KEY), dict) else {}
    # a training-loop setting (flashsae's unit_norm_decoder is per architecture): keep the file's
    carried_normalize = carried.get("normalize_decoder") if isinstance(carried.get("normalize_decoder"), bool) else None
    if sae.architecture not in ("topk", "transcoder"):
        what = {
            "batchtopk": "its batch-level selection and inference threshold",
            "matryoshka": "its batch-level selection and inference threshold",
            "jumprelu": "its per-latent thresholds",
            "relu": "its ReLU activation (sparsify keeps the top k)",
            "gated": "its gate and magnitude paths",
        }.get(sae.architecture, "its architecture")
        raise FormatError(
            f"architecture: sparsify stores TopK SAEs and transcoders only; a {sae.architecture!r} SAE needs "
            f"{what}, which no sparsify field holds (save it as native or saelens)"
        )
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    fields = {
        "activation": "topk",
        "k": cfg.k,
        "num_latents": sae.n_latents,
        "expansion_factor": max(1, sae.n_latents // sae.d_in),
        "normalize_decoder": bool(carried_normalize if carried_normalize is not None else sae.unit_norm_decoder),
        "d_in": sae.d_in,
    }
    if sae.architecture == "topk":
        if not cfg.apply_b_dec_to_input:
            raise FormatError("apply_b_dec_to_input: sparsify SAEs always subtract b_dec before encoding")
        if cfg.input_norm != "none":
            raise FormatError(f"input_norm: sparsify has no input normalization (this SAE uses {cfg.input_norm!r})")
        fields.update(multi_topk=cfg.multi_topk, skip_connection=False, transcode=False)
    else:
        if cfg.d_out != sae.d_in:
            raise FormatError(
                f"d_out: sparsify transcoders predict d_in={sae.d_in} features, this one d_out={cfg.d_out}"
            )
        fields.update(multi_topk=False, skip_connection=cfg.skip, transcode=True)
        if cfg.skip:
            tensors["W_skip"] = sae.W_skip
    return fields, {name: t.detach() for name, t in tensors.items()}


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_sparsify", "load", "save"]
