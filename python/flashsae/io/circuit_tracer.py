"""circuit-tracer's cross-layer transcoder layout (the files its ``load_clt`` reads).

A directory with two safetensors files per layer i of an L-layer CLT (n features per layer, width d):

    W_enc_{i}.safetensors   W_enc_{i} [n, d]   b_enc_{i} [n]   b_dec_{i} [d]
                            threshold_{i} [n]   (JumpReLU only: a ReLU CLT has none)
                            W_skip_{i} [d, d]   (skip CLTs only; applied as x @ W_skip_{i})
    W_dec_{i}.safetensors   W_dec_{i} [n, L - i, d]   (feature f of layer i writes W_dec_{i}[f, j - i] to layer j)

circuit-tracer's forward: features_i = act(x_i W_enc_i^T + b_enc_i) with act = relu, or JumpReLU
``pre * (pre > threshold_i)``; output_j = b_dec_j + sum_{i <= j} features_i W_dec_i[:, j - i]
(+ x_j W_skip_j). That is :class:`~flashsae.CrossLayerTranscoder` with activation "relu" or
"jumprelu": flashsae's ``W_enc_i`` / ``b_enc_i`` / ``b_dec_i`` / ``threshold_i`` are stored as they
are, ``W_dec_i`` [n, (L - i) * d] is written as its [n, L - i, d] view (same memory) and ``W_skip_i``
[d_out, d_in] transposed. L is the number of W_enc files; inputs and targets share one width d.

A TopK CLT is not a function this layout can express (its k largest per row): convert it first with
:meth:`~flashsae.CrossLayerTranscoder.to_jumprelu` (thresholds calibrated on a sample of inputs),
whose JumpReLU CLT saves here. A BatchTopK CLT's inference rule is a JumpReLU with one threshold per
layer: it saves as that JumpReLU directly. Nothing else is written (no config: circuit-tracer infers every size
from the tensors); writes are atomic (a fresh directory renamed into place).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..storage import atomic_directory
from ._common import FormatError, Placement, build_sae, read_safetensors, write_safetensors

ENCODER_FILE = "W_enc_{}.safetensors"
DECODER_FILE = "W_dec_{}.safetensors"
_ENCODER_NAME = re.compile(r"^W_enc_(\d+)\.safetensors$")


def is_circuit_tracer(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding W_enc_0.safetensors and W_dec_0.safetensors."""
    source = Path(path)
    return (source / ENCODER_FILE.format(0)).is_file() and (source / DECODER_FILE.format(0)).is_file()


def save(clt: Any, path: str | os.PathLike) -> Path:
    """Writes a JumpReLU or ReLU :class:`~flashsae.CrossLayerTranscoder` in circuit-tracer's layout
    (module docstring), atomically; a BatchTopK CLT as the JumpReLU of its inference thresholds.
    FormatError naming the field for what the layout cannot hold: a
    TopK CLT (convert with ``clt.to_jumprelu(x)``), another architecture, or d_out != d_in."""
    if getattr(clt, "architecture", None) != "clt":
        raise FormatError(f"format: circuit_tracer holds cross-layer transcoders, not {clt.architecture!r} SAEs")
    if clt.activation == "topk":
        raise FormatError(
            "activation: circuit-tracer's CLTs are JumpReLU or ReLU; convert a TopK CLT with "
            "clt.to_jumprelu(x_sample) (thresholds calibrated on a sample of inputs) and save that"
        )
    if not clt.config.cross_layer:
        raise FormatError(
            "cross_layer: a per-layer CLT is circuit-tracer's transcoder set: save with format='transcoder_set'"
        )
    if clt.activation == "batchtopk":  # its inference rule is a JumpReLU with its per-layer thresholds
        clt = clt.to_jumprelu()
    if clt.d_out != clt.d_in:
        raise FormatError(f"d_out: circuit-tracer's CLTs read and write one width (d_in {clt.d_in}, d_out {clt.d_out})")
    with atomic_directory(path) as staging:
        for i in range(clt.n_layers):
            W_enc, b_enc = clt.encoder(i)
            encoder = {f"W_enc_{i}": W_enc, f"b_enc_{i}": b_enc, f"b_dec_{i}": getattr(clt, f"b_dec_{i}")}
            if clt.activation == "jumprelu":
                encoder[f"threshold_{i}"] = clt.threshold(i)
            if clt.config.skip:
                encoder[f"W_skip_{i}"] = getattr(clt, f"W_skip_{i}").T
            write_safetensors(staging / ENCODER_FILE.format(i), encoder)
            write_safetensors(staging / DECODER_FILE.format(i), {f"W_dec_{i}": clt.decoder(i)})
    return Path(path)


def load(path: str | os.PathLike, placement: Placement) -> Any:
    """The :class:`~flashsae.CrossLayerTranscoder` in circuit-tracer's layout at `path`: JumpReLU
    when the files hold thresholds, else ReLU. dtype: the files' unless given."""
    source = Path(path)
    layers = sorted(int(m.group(1)) for m in map(_ENCODER_NAME.match, os.listdir(source)) if m)
    if not layers:
        raise FileNotFoundError(f"path: {source} has no {ENCODER_FILE.format(0)}")
    n_layers = len(layers)
    if layers != list(range(n_layers)):
        raise FormatError(f"path: {source} has encoder files for layers {layers}, expected 0..{n_layers - 1}")
    tensors: dict[str, torch.Tensor] = {}
    has_threshold = has_skip = None
    for i in range(n_layers):
        encoder_file = source / ENCODER_FILE.format(i)
        encoder = read_safetensors(encoder_file)
        for name in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if name not in encoder:
                raise FormatError(f"path: {encoder_file} has no tensor {name}")
        threshold, skip = f"threshold_{i}" in encoder, f"W_skip_{i}" in encoder
        if has_threshold is None:
            has_threshold, has_skip = threshold, skip
        if (threshold, skip) != (has_threshold, has_skip):
            raise FormatError(f"path: {encoder_file}: every layer must hold thresholds and skips, or none")
        tensors.update({f"W_enc_{i}": encoder[f"W_enc_{i}"], f"b_enc_{i}": encoder[f"b_enc_{i}"]})
        tensors[f"b_dec_{i}"] = encoder[f"b_dec_{i}"]
        if threshold:
            tensors[f"threshold_{i}"] = encoder[f"threshold_{i}"]
        if skip:
            tensors[f"W_skip_{i}"] = encoder[f"W_skip_{i}"].T
        decoder_file = source / DECODER_FILE.format(i)
        decoder = read_safetensors(decoder_file)
        if f"W_dec_{i}" not in decoder:
            raise FormatError(f"path: {decoder_file} has no tensor W_dec_{i}")
        W_dec = decoder[f"W_dec_{i}"]
        if W_dec.dim() != 3 or W_dec.shape[1] != n_layers - i:
            shape = list(W_dec.shape)
            raise FormatError(f"path: {decoder_file}: W_dec_{i} must be [n, {n_layers - i}, d], got {shape}")
        tensors[f"W_dec_{i}"] = W_dec.reshape(W_dec.shape[0], -1)
    if tensors["W_enc_0"].dim() != 2:
        raise FormatError(f"path: W_enc_0 must be [n, d], got {list(tensors['W_enc_0'].shape)}")
    n, d = tensors["W_enc_0"].shape
    config = {
        "n_layers": n_layers,
        "d_in": d,
        "n_latents": n,
        "activation": "jumprelu" if has_threshold else "relu",
        "k": 1,  # not used by JumpReLU / ReLU
        "skip": bool(has_skip),
    }
    return build_sae("clt", config, tensors, placement, file_dtype=tensors["W_enc_0"].dtype, where=f"path {source}")
