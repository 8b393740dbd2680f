"""circuit-tracer's per-layer transcoder set (what its ``load_transcoder_set`` and its transcoder
cache read): one single-layer transcoder per layer i of an L-layer model, in a directory

    config.yaml              model_kind: transcoder_set, feature_input_hook, feature_output_hook
                             (the model hooks the features read and write), scan (an identifier)
    layer_{i}.safetensors    W_enc [n, d]   W_dec [n, d]   b_enc [n]   b_dec [d]
                             activation_function.threshold [n]   (JumpReLU only: ReLU has none)
                             W_skip [d, d]                        (skip only; applied as x @ W_skip^T)

circuit-tracer's forward per layer: features = act(x W_enc^T + b_enc), with act = relu or JumpReLU
``pre * (pre > threshold)``; output = features W_dec + b_dec (+ x W_skip^T). That is
:class:`~flashsae.CrossLayerTranscoder` with ``cross_layer=False`` (layer i's latents write to layer
i only; W_dec_i [n, d_out]) and activation "jumprelu" or "relu": the tensors are stored as they are.
A TopK set saves after :meth:`~flashsae.CrossLayerTranscoder.to_jumprelu` (calibrated thresholds),
a BatchTopK one as the JumpReLU of its per-layer thresholds. Inputs and targets share one width.

config.yaml is written as flat ``key: "value"`` lines (JSON strings are YAML) and read the same way:
flashsae needs only its flat scalar keys (circuit-tracer's own writes are flat too), so no YAML
package is needed. The hooks are taken from ``clt.metadata`` ("feature_input_hook",
"feature_output_hook") and default to circuit-tracer's transcoder hooks of TransformerLens models
("hook_resid_mid" and "hook_mlp_out"); loading puts the file's values back into the metadata.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..storage import atomic_directory
from ._common import FormatError, Placement, build_sae, read_safetensors, write_safetensors

CONFIG_FILE = "config.yaml"
LAYER_FILE = "layer_{}.safetensors"
THRESHOLD = "activation_function.threshold"
#: circuit-tracer's hooks for MLP transcoders of TransformerLens models (its README's examples).
DEFAULT_HOOKS = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
_LAYER_NAME = re.compile(r"^layer_(\d+)\.safetensors$")


def is_transcoder_set(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding config.yaml and layer_0.safetensors."""
    source = Path(path)
    return (source / CONFIG_FILE).is_file() and (source / LAYER_FILE.format(0)).is_file()


def read_config(path: Path) -> dict[str, Any]:
    """The flat scalar ``key: value`` entries of a config.yaml (quoted or plain values; nested
    entries, lists and comments are skipped)."""
    entries: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z_][\w-]*):\s*(.*?)\s*$", line)
        if not match or not match.group(2) or match.group(2).startswith(("#", "[", "{", "|", ">")):
            continue
        raw = match.group(2)
        if raw[0] in "\"'":
            try:
                entries[match.group(1)] = json.loads(raw) if raw[0] == '"' else raw[1:-1].replace("''", "'")
            except json.JSONDecodeError:
                entries[match.group(1)] = raw[1:-1]
        else:
            entries[match.group(1)] = raw
    return entries


def save(clt: Any, path: str | os.PathLike) -> Path:
    """Writes a per-layer :class:`~flashsae.CrossLayerTranscoder` (cross_layer=False; JumpReLU, ReLU,
    or BatchTopK as its JumpReLU) as circuit-tracer's transcoder set (module docstring), atomically.
    FormatError naming the field for what the layout cannot hold."""
    if getattr(clt, "architecture", None) != "clt":
        raise FormatError(f"format: transcoder_set holds per-layer transcoders (a clt), not {clt.architecture!r} SAEs")
    if clt.config.cross_layer:
        raise FormatError(
            "cross_layer: this CLT writes across layers; save it with format='circuit_tracer' (a transcoder set "
            "holds per-layer transcoders: create the CLT with cross_layer=False)"
        )
    if clt.activation == "topk":
        raise FormatError(
            "activation: circuit-tracer's transcoders are JumpReLU or ReLU; convert a TopK set with "
            "clt.to_jumprelu(x_sample) (thresholds calibrated on a sample of inputs) and save that"
        )
    if clt.activation == "batchtopk":
        clt = clt.to_jumprelu()
    if clt.d_out != clt.d_in:
        raise FormatError(
            f"d_out: circuit-tracer's transcoders read and write one width (d_in {clt.d_in}, d_out {clt.d_out})"
        )
    hooks = {key: str(clt.metadata.get(key, default)) for key, default in DEFAULT_HOOKS.items()}
    config = {"model_kind": "transcoder_set", **hooks, "scan": str(clt.metadata.get("scan", "flashsae"))}
    with atomic_directory(path) as staging:
        for i in range(clt.n_layers):
            W_enc, b_enc = clt.encoder(i)
            tensors = {"W_enc": W_enc, "W_dec": getattr(clt, f"W_dec_{i}"), "b_enc": b_enc}
            tensors["b_dec"] = getattr(clt, f"b_dec_{i}")
            if clt.activation == "jumprelu":
                tensors[THRESHOLD] = clt.threshold(i)
            if clt.config.skip:
                tensors["W_skip"] = getattr(clt, f"W_skip_{i}")
            write_safetensors(staging / LAYER_FILE.format(i), tensors)
        (staging / CONFIG_FILE).write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    return Path(path)


def load(path: str | os.PathLike, placement: Placement) -> Any:
    """The per-layer :class:`~flashsae.CrossLayerTranscoder` (cross_layer=False) of a transcoder set:
    JumpReLU when the files hold thresholds, else ReLU; config.yaml's hooks and scan go to its
    metadata. dtype: the files' unless given."""
    source = Path(path)
    config = read_config(source / CONFIG_FILE)
    kind = config.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise FormatError(f"path: {source / CONFIG_FILE} has model_kind {kind!r}, expected 'transcoder_set'")
    layers = sorted(int(m.group(1)) for m in map(_LAYER_NAME.match, os.listdir(source)) if m)
    n_layers = len(layers)
    if layers != list(range(n_layers)):
        raise FormatError(f"path: {source} has transcoder files for layers {layers}, expected 0..{n_layers - 1}")
    tensors: dict[str, Any] = {}
    kinds = set()
    for i in range(n_layers):
        file = source / LAYER_FILE.format(i)
        layer = read_safetensors(file)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            if name not in layer:
                raise FormatError(f"path: {file} has no tensor {name}")
        kinds.add((THRESHOLD in layer, "W_skip" in layer))
        if len(kinds) > 1:
            raise FormatError(f"path: {file}: every layer must hold thresholds and skips, or none")
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            tensors[f"{name}_{i}"] = layer[name]
        if THRESHOLD in layer:
            tensors[f"threshold_{i}"] = layer[THRESHOLD]
        if "W_skip" in layer:
            tensors[f"W_skip_{i}"] = layer["W_skip"]
    if tensors["W_enc_0"].dim() != 2:
        raise FormatError(f"path: W_enc of layer 0 must be [n, d], got {list(tensors['W_enc_0'].shape)}")
    n, d = tensors["W_enc_0"].shape
    has_threshold, has_skip = kinds.pop()
    settings = {
        "n_layers": n_layers, "d_in": d, "d_out": int(tensors["b_dec_0"].shape[0]), "n_latents": n,
        "activation": "jumprelu" if has_threshold else "relu", "k": 1, "skip": has_skip, "cross_layer": False,
    }  # fmt: skip
    clt = build_sae("clt", settings, tensors, placement, file_dtype=tensors["W_enc_0"].dtype, where=f"path {source}")
    clt.metadata.update({key: config[key] for key in (*DEFAULT_HOOKS, "scan") if key in config})
    return clt
