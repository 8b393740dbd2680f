"""Run by tests/test_io_transcoder_set.py in an interpreter that has circuit-tracer (a separate venv:
circuit-tracer is never a flashsae dependency). Reads the inputs, then

1. loads flashsae's transcoder set with circuit-tracer's ``load_transcoder_set`` (lazy and eager
   weights) and writes its features and per-layer reconstructions of the inputs;
2. builds a random JumpReLU transcoder set with circuit-tracer's classes, saves it with its
   ``to_safetensors`` and a config.yaml written by PyYAML (as its cache does), and writes its
   features and reconstructions, for flashsae's loader to match.

    python transcoder_set_peer.py WORK_DIR
WORK_DIR holds inputs.safetensors (x [L, rows, d]) and flashsae/ (our set); results go to
WORK_DIR/peer_outputs.safetensors and WORK_DIR/peer/.
"""

import sys
from pathlib import Path

import torch
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.single_layer_transcoder import (
    SingleLayerTranscoder,
    TranscoderSet,
    load_transcoder_set,
)
from safetensors.torch import load_file, save_file

work = Path(sys.argv[1])
x = load_file(str(work / "inputs.safetensors"))["x"]
n_layers, _, d = x.shape
config = yaml.safe_load((work / "flashsae" / "config.yaml").read_text())
outputs = {}
for lazy in (False, True):
    paths = {i: str(work / "flashsae" / f"layer_{i}.safetensors") for i in range(n_layers)}
    tset = load_transcoder_set(
        paths, scan=config["scan"], feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"), dtype=torch.float32,
        lazy_encoder=lazy, lazy_decoder=lazy,
    )  # fmt: skip
    features = tset.encode(x)
    outputs[f"features_lazy{int(lazy)}"] = features
    outputs[f"reconstruction_lazy{int(lazy)}"] = torch.stack(
        [tset[i].decode(features[i], x[i]) for i in range(n_layers)]
    )
outputs["hooks"] = torch.tensor([int(tset.feature_input_hook == config["feature_input_hook"])])

torch.manual_seed(0)
transcoders = {}
for i in range(n_layers):
    layer = SingleLayerTranscoder(
        d, 29, JumpReLU(torch.zeros(29), 0.1), i, skip_connection=True, device=torch.device("cpu"), dtype=torch.float32
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, d**-0.5)
        layer.activation_function.threshold.uniform_(0.0, 0.3)
    transcoders[i] = layer
peer = TranscoderSet(transcoders, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out", scan="peer")
(work / "peer").mkdir()
peer.to_safetensors(str(work / "peer"))
(work / "peer" / "config.yaml").write_text(
    yaml.dump({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
               "feature_output_hook": "hook_mlp_out", "scan": "peer", "model_name": "tiny"})
)  # fmt: skip
peer_features = peer.encode(x)
outputs["peer_features"] = peer_features
outputs["peer_reconstruction"] = torch.stack([peer[i].decode(peer_features[i], x[i]) for i in range(n_layers)])
save_file({k: v.detach().contiguous() for k, v in outputs.items()}, str(work / "peer_outputs.safetensors"))
