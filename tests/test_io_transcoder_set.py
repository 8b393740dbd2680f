"""circuit-tracer's per-layer transcoder set (config.yaml + layer_{i}.safetensors) for a CLT with
cross_layer=False: its math against a dense reference, the files (names, shapes, config), round
trips, what the layout refuses, a trained TopK / BatchTopK set's JumpReLU export, and (when
circuit-tracer is installed, in this interpreter or the one CIRCUIT_TRACER_PYTHON names) its own
load_transcoder_set on our files and our loader on its files, float32, within 1e-5 relative."""

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flashsae
from flashsae.io import FormatError
from flashsae.io.transcoder_set import read_config
from helpers import assert_close
from test_io_circuit_tracer import _peer_python

L, D, N = 3, 16, 29


def make_set(activation="jumprelu", skip=False, dtype=torch.float32, **options):
    clt = flashsae.create(
        "clt", n_layers=L, d_in=D, n_latents=N, k=4, activation=activation, skip=skip, cross_layer=False,
        dtype=dtype, **options,
    )  # fmt: skip
    with torch.no_grad():
        for name, p in clt.named_parameters():
            if not name.startswith("W_enc"):
                p.normal_(0, 0.3)
        if activation == "jumprelu":
            for i in range(L):
                clt.threshold(i).uniform_(0.05, 0.5)
    return clt


def test_per_layer_clt_is_independent_transcoders_float64():
    """y_hat_j = b_dec_j + f_j W_dec_j (+ x_j W_skip_j^T): layer j's latents only, gradients included."""
    clt = make_set("topk", skip=True, dtype=torch.float64)
    assert clt.decoder(0).shape == (N, 1, D) and clt.W_dec_2.shape == (N, D)
    x, y = torch.randn(20, L, D, dtype=torch.float64), torch.randn(20, L, D, dtype=torch.float64)
    out = clt(x, y)
    out.loss.backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in clt.named_parameters()}
    fvu = []
    for j in range(L):
        pre = (x[:, j] @ params[f"W_enc_{j}"].T + params[f"b_enc_{j}"]).relu()
        top = torch.topk(pre, 4, dim=1)
        f = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        y_hat = f @ params[f"W_dec_{j}"] + params[f"b_dec_{j}"] + x[:, j] @ params[f"W_skip_{j}"].T
        assert_close(out.x_hat[:, j], y_hat, torch.float64, f"y_hat of layer {j}")
        fvu.append((y_hat - y[:, j]).pow(2).sum() / (y[:, j] - y[:, j].mean(0)).pow(2).sum())
    fvu = torch.stack(fvu).mean()
    assert_close(out.loss, fvu, torch.float64, "loss")
    fvu.backward()
    for name, p in clt.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float64, f"grad {name}")
    # AuxK: each layer's dead latents reconstruct that layer's residual only
    assert 0 < float(clt(x, y, dead_mask=torch.rand(L, N) < 0.5).auxk_loss.detach()) < float("inf")


def test_files_names_shapes_and_config(tmp_path):
    clt = make_set("jumprelu", skip=True)
    clt.metadata["feature_input_hook"] = "blocks.0.ln2.hook_normalized"
    clt.save(tmp_path / "set", format="transcoder_set")
    files = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert files == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]
    layer = load_file(str(tmp_path / "set" / "layer_1.safetensors"))
    assert {k: list(v.shape) for k, v in layer.items()} == {
        "W_enc": [N, D], "W_dec": [N, D], "b_enc": [N], "b_dec": [D], "activation_function.threshold": [N],
        "W_skip": [D, D],
    }  # fmt: skip
    assert torch.equal(layer["W_skip"], clt.W_skip_1) and torch.equal(layer["W_dec"], clt.W_dec_1)
    config = read_config(tmp_path / "set" / "config.yaml")
    assert config == {
        "model_kind": "transcoder_set", "feature_input_hook": "blocks.0.ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "scan": "flashsae",
    }  # fmt: skip


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
@pytest.mark.parametrize("skip", [False, True])
def test_round_trip(tmp_path, activation, skip):
    clt = make_set(activation, skip)
    clt.save(tmp_path / "set", format="transcoder_set")
    assert flashsae.io.detect_format(tmp_path / "set") == "transcoder_set"
    loaded = flashsae.load(tmp_path / "set")
    assert (loaded.activation, loaded.config.skip, loaded.config.cross_layer) == (activation, skip, False)
    assert loaded.metadata["feature_output_hook"] == "hook_mlp_out"
    for name, t in clt.state_dict().items():
        if name != "encode_slots":  # the encoders' slot hint, not a weight
            assert torch.equal(loaded.state_dict()[name], t), name
    x, y = torch.randn(10, L, D), torch.randn(10, L, D)
    clt.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, y).x_hat, clt(x, y).x_hat)


def test_what_the_layout_refuses(tmp_path):
    with pytest.raises(FormatError, match="cross_layer: this CLT writes across layers"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, k=2, activation="relu").save(
            tmp_path / "a", format="transcoder_set"
        )
    with pytest.raises(FormatError, match="cross_layer: a per-layer CLT is circuit-tracer's transcoder set"):
        make_set("relu").save(tmp_path / "b", format="circuit_tracer")
    with pytest.raises(FormatError, match="activation: circuit-tracer's transcoders are JumpReLU or ReLU"):
        make_set("topk").save(tmp_path / "c", format="transcoder_set")
    with pytest.raises(FormatError, match="d_out"):
        make_set("relu", d_out=D + 1).save(tmp_path / "d", format="transcoder_set")
    make_set("relu").save(tmp_path / "e", format="transcoder_set")
    (tmp_path / "e" / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    with pytest.raises(FormatError, match="model_kind 'cross_layer_transcoder'"):
        flashsae.load(tmp_path / "e")


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_topk_and_batchtopk_sets_export_as_jumprelu_with_calibrated_thresholds(tmp_path, activation):
    clt = make_set(activation)
    x = torch.randn(200, L, D)
    if activation == "batchtopk":
        clt(x, torch.randn(200, L, D))  # a training step estimates the thresholds
        clt.calibrate_thresholds_(x)
        clt.save(tmp_path / "set", format="transcoder_set")
    else:
        clt.to_jumprelu(x).save(tmp_path / "set", format="transcoder_set")
    loaded = flashsae.load(tmp_path / "set")
    latents = loaded.encode(x)
    per_layer = ((latents.indices >= 0).sum(-1).float().mean(0))
    assert per_layer.tolist() == pytest.approx([4.0] * L)  # k per row and layer on the calibration sample


@pytest.mark.skipif(_peer_python() is None, reason="circuit-tracer not installed (set CIRCUIT_TRACER_PYTHON)")
@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_reads_our_set_and_we_read_its(tmp_path, skip):
    """circuit-tracer's load_transcoder_set on our files gives our features and reconstructions
    (float32, <= 1e-5 relative); our loader on its to_safetensors files (and a PyYAML config.yaml)
    gives its own."""
    clt = make_set("topk", skip=skip)
    x = torch.randn(40, L, D)
    exported = clt.to_jumprelu(x)
    exported.metadata.update(feature_input_hook="mlp.hook_in", scan="ours")
    exported.save(tmp_path / "flashsae", format="transcoder_set")
    save_file({"x": x.transpose(0, 1).contiguous()}, str(tmp_path / "inputs.safetensors"))  # [L, rows, d]
    script = Path(__file__).with_name("transcoder_set_peer.py")
    done = subprocess.run([_peer_python(), str(script), str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    peer = load_file(str(tmp_path / "peer_outputs.safetensors"))
    assert int(peer["hooks"][0]) == 1
    ours = exported.encode(x)
    features = torch.stack(
        [flashsae.SparseLatents(ours.values[:, i], ours.indices[:, i]).to_dense(N) for i in range(L)]
    )
    expected = exported.decode(ours, x).transpose(0, 1)
    for lazy in (0, 1):
        assert_close(peer[f"features_lazy{lazy}"], features, torch.float32, "features")
        assert_close(peer[f"reconstruction_lazy{lazy}"], expected, torch.float32, "reconstruction")
    theirs = flashsae.load(tmp_path / "peer")
    assert (theirs.activation, theirs.config.skip, theirs.n_latents) == ("jumprelu", True, 29)
    assert theirs.metadata["feature_input_hook"] == "mlp.hook_in" and theirs.metadata["scan"] == "peer"
    latents = theirs.encode(x)
    dense = torch.stack(
        [flashsae.SparseLatents(latents.values[:, i], latents.indices[:, i]).to_dense(29) for i in range(L)]
    )
    assert_close(dense, peer["peer_features"], torch.float32, "their features, our encode")
    assert_close(theirs.decode(latents, x).transpose(0, 1), peer["peer_reconstruction"], torch.float32, "theirs")
