"""circuit-tracer's CLT layout: the files flashsae writes (names, shapes, transposes), round trips,
what the layout refuses, TopK -> JumpReLU calibration, and (when circuit-tracer is installed, in
this interpreter or in the one CIRCUIT_TRACER_PYTHON names) circuit-tracer's own load_clt on our
files and our loader on its files, float32, within 1e-5 relative."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flashsae
from flashsae.io import FormatError
from helpers import assert_close

L, D, N = 3, 16, 29


def make_clt(activation="jumprelu", skip=False, dtype=torch.float32, d_out=None):
    clt = flashsae.create(
        "clt", n_layers=L, d_in=D, n_latents=N, k=4, activation=activation, skip=skip, d_out=d_out, dtype=dtype
    )
    with torch.no_grad():
        for name, p in clt.named_parameters():
            if not name.startswith("W_enc"):
                p.normal_(0, 0.3)
        if activation == "jumprelu":
            for i in range(L):
                clt.threshold(i).uniform_(0, 0.5)
    return clt


def test_layout_names_shapes_and_transposes(tmp_path):
    clt = make_clt(skip=True)
    clt.save(tmp_path / "ct", format="circuit_tracer")
    assert sorted(os.listdir(tmp_path / "ct")) == sorted(
        [f"W_enc_{i}.safetensors" for i in range(L)] + [f"W_dec_{i}.safetensors" for i in range(L)]
    )
    for i in range(L):
        encoder = load_file(str(tmp_path / "ct" / f"W_enc_{i}.safetensors"))
        assert sorted(encoder) == sorted([f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}", f"W_skip_{i}"])
        assert torch.equal(encoder[f"W_enc_{i}"], clt.encoder(i)[0].detach())
        assert torch.equal(encoder[f"threshold_{i}"], clt.threshold(i))
        assert torch.equal(encoder[f"W_skip_{i}"], getattr(clt, f"W_skip_{i}").detach().T)  # x @ W_skip
        decoder = load_file(str(tmp_path / "ct" / f"W_dec_{i}.safetensors"))
        assert decoder[f"W_dec_{i}"].shape == (N, L - i, D)
        assert torch.equal(decoder[f"W_dec_{i}"], clt.decoder(i).detach())
    assert flashsae.io.detect_format(tmp_path / "ct") == "circuit_tracer"


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
@pytest.mark.parametrize("skip", [False, True])
def test_round_trip_keeps_every_tensor_and_the_outputs(tmp_path, activation, skip):
    clt = make_clt(activation, skip)
    clt.save(tmp_path / "ct", format="circuit_tracer")
    loaded = flashsae.load(tmp_path / "ct")
    assert loaded.activation == activation and loaded.config.skip == skip and loaded.n_layers == L
    for name, t in clt.state_dict().items():
        if name != "encode_slots":  # the encoders' slot hint, not a weight: the layout does not hold it
            assert torch.equal(loaded.state_dict()[name], t), name
    x, y = torch.randn(10, L, D), torch.randn(10, L, D)
    assert torch.equal(loaded(x, y).x_hat, clt(x, y).x_hat)


def test_what_the_layout_refuses(tmp_path):
    with pytest.raises(FormatError, match=r"activation: circuit-tracer's CLTs are JumpReLU or ReLU; .*to_jumprelu"):
        make_clt("topk").save(tmp_path / "a", format="circuit_tracer")
    with pytest.raises(FormatError, match="d_out: circuit-tracer's CLTs read and write one width"):
        make_clt(d_out=D + 1).save(tmp_path / "b", format="circuit_tracer")
    with pytest.raises(FormatError, match="circuit_tracer holds cross-layer transcoders"):
        flashsae.create("topk", d_in=8, n_latents=16, k=2).save(tmp_path / "c", format="circuit_tracer")
    assert not (tmp_path / "a").exists()
    clt = make_clt()
    clt.save(tmp_path / "d", format="circuit_tracer")
    save_file({"W_dec_1": torch.zeros(N, L, D)}, str(tmp_path / "d" / "W_dec_1.safetensors"))
    with pytest.raises(FormatError, match=r"W_dec_1 must be \[n, 2, d\]"):
        flashsae.load(tmp_path / "d")


def test_topk_converts_to_jumprelu_with_k_per_row_on_the_calibration_sample():
    clt = make_clt("topk")
    x = torch.randn(200, L, D)
    converted = clt.to_jumprelu(x)
    assert converted.activation == "jumprelu"
    for name, t in clt.state_dict().items():
        assert torch.equal(converted.state_dict()[name], t), name
    counts = (converted.encode(x).indices >= 0).sum(dim=(0, 2)).double() / x.shape[0]
    assert_close(counts, torch.full((L,), 4.0, dtype=torch.float64), torch.float32, "mean L0 per layer")
    # a JumpReLU activation is the pre-activation (up to one rounding), TopK's where both keep a latent
    topk, jump = clt.encode(x), converted.encode(x)
    dense_topk = flashsae.SparseLatents(topk.values, topk.indices).to_dense(N)
    dense_jump = flashsae.SparseLatents(jump.values, jump.indices).to_dense(N)
    both = (dense_topk > 0) & (dense_jump > 0)
    assert both.any()
    assert_close(dense_jump[both], dense_topk[both], torch.float32, "shared activations")
    with pytest.raises(ValueError, match="activation: to_jumprelu converts a TopK or BatchTopK CLT"):
        converted.to_jumprelu(x)


def _peer_python() -> str | None:
    named = os.environ.get("CIRCUIT_TRACER_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("circuit_tracer") is not None else None


@pytest.mark.skipif(_peer_python() is None, reason="circuit-tracer not installed (set CIRCUIT_TRACER_PYTHON)")
@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_reads_our_files_and_we_read_its(tmp_path, skip):
    """circuit-tracer's load_clt on a TopK CLT exported as JumpReLU reproduces our features and
    reconstructions (float32, <= 1e-5 relative), and flashsae's loader on circuit-tracer's
    to_safetensors output reproduces its own."""
    clt = make_clt("topk", skip=skip)
    x = torch.randn(40, L, D)
    exported = clt.to_jumprelu(x)
    exported.save(tmp_path / "flashsae", format="circuit_tracer")
    save_file({"x": x.transpose(0, 1).contiguous()}, str(tmp_path / "inputs.safetensors"))  # [L, rows, d]
    script = Path(__file__).with_name("circuit_tracer_peer.py")
    done = subprocess.run([_peer_python(), str(script), str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    peer = load_file(str(tmp_path / "peer_outputs.safetensors"))
    ours = exported.encode(x)
    features = torch.stack(
        [flashsae.SparseLatents(ours.values[:, i], ours.indices[:, i]).to_dense(N) for i in range(L)]
    )  # [L, rows, n], circuit-tracer's order
    expected = exported.decode(ours, x).transpose(0, 1)
    if skip and not int(peer["loads_skip"]):  # circuit-tracer 0.5.0 (PyPI) reads no W_skip_{i}
        skips = torch.stack([x[:, i] @ getattr(exported, f"W_skip_{i}").T for i in range(L)])
        expected = expected - skips
    for lazy in (0, 1):
        assert_close(peer[f"features_lazy{lazy}"], features, torch.float32, "features")
        assert_close(peer[f"reconstruction_lazy{lazy}"], expected, torch.float32, "reconstruction")
        assert_close(peer[f"forward_lazy{lazy}"], expected, torch.float32, "forward")
    theirs = flashsae.load(tmp_path / "peer")
    assert theirs.activation == "jumprelu" and theirs.n_layers == L and theirs.n_latents == 29
    latents = theirs.encode(x)
    layers = [flashsae.SparseLatents(latents.values[:, i], latents.indices[:, i]) for i in range(L)]
    dense = torch.stack([layer.to_dense(29) for layer in layers])
    assert_close(dense, peer["peer_features"], torch.float32, "their features, our encode")
    assert_close(theirs.decode(latents).transpose(0, 1), peer["peer_forward"], torch.float32, "their forward")
