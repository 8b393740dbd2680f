"""Run by tests/test_io_circuit_tracer.py in an interpreter that has circuit-tracer (a separate venv:
circuit-tracer is never a flashsae dependency). Reads the inputs, then

1. loads flashsae's files with circuit-tracer's own ``load_clt`` (lazy and eager decoders) and writes
   its features and reconstructions of the inputs;
2. builds a random JumpReLU CLT with circuit-tracer's class, saves it with its ``to_safetensors``, and
   writes its features and reconstructions, for flashsae's loader to match.

    python circuit_tracer_peer.py WORK_DIR
WORK_DIR holds inputs.safetensors (x [L, rows, d]) and flashsae/ (our CLT); results go to
WORK_DIR/peer_outputs.safetensors and WORK_DIR/peer/.
"""

import sys
from pathlib import Path

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from safetensors.torch import load_file, save_file

work = Path(sys.argv[1])
x = load_file(str(work / "inputs.safetensors"))["x"]
outputs = {}
for lazy in (False, True):
    clt = load_clt(str(work / "flashsae"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=lazy)
    features = clt.encode(x)
    outputs[f"features_lazy{int(lazy)}"] = features
    input_acts = {"input_acts": x} if clt.W_skip is not None else {}
    outputs[f"reconstruction_lazy{int(lazy)}"] = clt.decode(features.to_sparse(), **input_acts)
    outputs[f"forward_lazy{int(lazy)}"] = clt(x)
    # circuit-tracer 0.5.0 (PyPI) reads no W_skip_{i}; its GitHub main does
    outputs["loads_skip"] = torch.tensor(int(clt.W_skip is not None))

n_layers, _, d = x.shape
torch.manual_seed(0)
peer = CrossLayerTranscoder(
    n_layers, 29, d, activation_function="jump_relu", lazy_decoder=False, device=torch.device("cpu"),
    dtype=torch.float32,
)
with torch.no_grad():
    for p in peer.parameters():
        p.normal_(0, d**-0.5)
    peer.activation_function.threshold.uniform_(0.0, 0.3)
peer.to_safetensors(str(work / "peer"))
peer_features = peer.encode(x)
outputs["peer_features"] = peer_features
outputs["peer_forward"] = peer(x)
save_file({k: v.detach().contiguous() for k, v in outputs.items()}, str(work / "peer_outputs.safetensors"))
