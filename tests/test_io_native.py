"""Native checkpoints: round trip, atomic replacement, no unpickling, clear errors."""

import json
import struct

import pytest
import torch

from flashsae import TopKSAE
from flashsae.io import native


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_round_trip(tmp_path, dtype):
    sae = TopKSAE(12, 40, 3, aux_k=7, dtype=dtype)
    with torch.no_grad():
        sae.b_dec.normal_()
    sae.save(tmp_path / "ckpt")
    loaded = TopKSAE.load(tmp_path / "ckpt")
    assert loaded.config == sae.config and loaded.metadata == sae.metadata == {}
    for (name, p), q in zip(sae.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert TopKSAE.load(tmp_path / "ckpt", dtype=torch.float64).dtype == torch.float64


def test_files_are_json_and_safetensors(tmp_path):
    TopKSAE(4, 8, 2).save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert config["format"] == "flashsae" and config["architecture"] == "topk"
    raw = (tmp_path / "ckpt" / "sae.safetensors").read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    assert set(json.loads(raw[8 : 8 + header_size])) >= {"W_enc", "b_enc", "W_dec", "b_dec"}


def test_replacement_is_atomic(tmp_path, monkeypatch):
    first, second = TopKSAE(4, 8, 2), TopKSAE(4, 8, 2)
    first.save(tmp_path / "ckpt")
    second.save(tmp_path / "ckpt")
    assert torch.equal(TopKSAE.load(tmp_path / "ckpt").W_dec, second.W_dec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temporary directories left behind"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        TopKSAE(4, 8, 2).save(tmp_path / "ckpt")
    assert torch.equal(TopKSAE.load(tmp_path / "ckpt").W_dec, second.W_dec), "old checkpoint damaged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        TopKSAE.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no cfg\.json"):
        TopKSAE.load(tmp_path / "empty")
    TopKSAE(4, 8, 2).save(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "cfg.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        TopKSAE.load(tmp_path / "ckpt")
    config_file.write_text(json.dumps({**config, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match="holds a 'jumprelu' SAE"):
        TopKSAE.load(tmp_path / "ckpt")
    config_file.write_text(json.dumps({**config, "format": "saelens"}))
    with pytest.raises(ValueError, match="is not a flashsae config"):
        TopKSAE.load(tmp_path / "ckpt", format="native")
    # detected instead: cfg.json + sae.safetensors without the flashsae marker is sparsify's layout
    with pytest.raises(ValueError, match=r"missing tensor 'encoder\.weight'"):
        TopKSAE.load(tmp_path / "ckpt")
    config_file.write_text(json.dumps({**config, "config": {**config["config"], "n_latents": 9}}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        TopKSAE.load(tmp_path / "ckpt")
