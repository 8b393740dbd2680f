"""Checkpoints carry a sha256 of their weights and loading checks it: overwritten bytes inside the tensor
data (which a safetensors header check cannot see) raise CheckpointCorruptError naming the file, in
Python and on the command line, instead of loading as garbage (NaN metrics); verify=False /
--no-verify opts out; checkpoints written before checksums still load; a truncated cfg.json says so."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import flashsae
from flashsae.cli import main
from flashsae.errors import CheckpointCorruptError
from flashsae.io import FormatError
from flashsae.io.api import detect_format
from flashsae.train.checkpoint import load_training_checkpoint, save_training_checkpoint


def saved(tmp_path, name="sae"):
    sae = flashsae.create("topk", d_in=32, n_latents=128, k=4)
    sae.save(tmp_path / name)
    return sae, tmp_path / name


def overwrite_16_bytes(path):
    """0xff over 16 bytes in the middle of the file: inside the tensor data, past the header."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    assert middle > header
    data[middle : middle + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_save_records_the_weights_sha256(tmp_path):
    _, path = saved(tmp_path)
    config = json.loads((path / "cfg.json").read_text())
    assert config["weights_sha256"] == hashlib.sha256((path / "sae.safetensors").read_bytes()).hexdigest()


def test_overwritten_bytes_raise_a_named_error_not_garbage(tmp_path):
    original, path = saved(tmp_path)
    overwrite_16_bytes(path / "sae.safetensors")
    with pytest.raises(CheckpointCorruptError, match=rf"{path / 'sae.safetensors'} is corrupt: its sha256 is "):
        flashsae.load(path)
    with pytest.raises(CheckpointCorruptError):
        flashsae.SAE.load(path)
    # the opt-out loads it, and shows what verification prevented: weights that are not the saved ones
    damaged = flashsae.load(path, verify=False)
    differs = [n for n, t in damaged.state_dict().items() if not torch.equal(t, original.state_dict()[n])]
    assert differs


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    original, path = saved(tmp_path)
    config = json.loads((path / "cfg.json").read_text())
    del config["weights_sha256"]  # as written before checksums existed
    (path / "cfg.json").write_text(json.dumps(config))
    loaded = flashsae.load(path)
    assert torch.equal(loaded.W_dec, original.W_dec)


def test_a_truncated_cfg_json_says_it_is_not_valid_json(tmp_path):
    _, path = saved(tmp_path)
    config = path / "cfg.json"
    config.write_text(config.read_text()[:50])
    pattern = rf"^cfg.json is not valid JSON: {re.escape(str(config))}: "  # then json's own message
    for attempt in (lambda: flashsae.load(path), lambda: detect_format(path), lambda: flashsae.load(config)):
        with pytest.raises(FormatError, match=pattern):
            attempt()


def test_training_checkpoint_is_verified_on_load(tmp_path):
    tensors = {"a": torch.randn(64, 64), "b": torch.arange(10)}
    save_training_checkpoint(tmp_path / "ckpt", {"step": 3}, tensors)
    state, loaded = load_training_checkpoint(tmp_path / "ckpt")
    assert state["step"] == 3 and torch.equal(loaded["a"], tensors["a"])
    written = (tmp_path / "ckpt" / "state.safetensors").read_bytes()
    assert state["tensors_sha256"] == hashlib.sha256(written).hexdigest()
    overwrite_16_bytes(tmp_path / "ckpt" / "state.safetensors")
    with pytest.raises(CheckpointCorruptError, match=r"state\.safetensors is corrupt"):
        load_training_checkpoint(tmp_path / "ckpt")
    _, damaged = load_training_checkpoint(tmp_path / "ckpt", verify=False)
    assert not torch.equal(damaged["a"], tensors["a"])
    (tmp_path / "ckpt" / "state.json").write_text('{"format": "flashsae-tr')
    with pytest.raises(ValueError, match=r"^state.json is not valid JSON: .*state.json: "):
        load_training_checkpoint(tmp_path / "ckpt")


def test_command_line_refuses_a_corrupt_checkpoint_and_no_verify_opts_out(tmp_path, capsys):
    original, path = saved(tmp_path)
    overwrite_16_bytes(path / "sae.safetensors")
    convert = ["convert", str(path), str(tmp_path / "out"), "--to", "native"]
    for command in (["eval", str(path)], ["report", str(path)], convert):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "sae.safetensors is corrupt" in err and "--no-verify" in err, (command, err)
    assert main([*convert, "--no-verify"]) == 0
    copied = load_file(str(tmp_path / "out" / "sae.safetensors"))
    assert not torch.equal(copied["W_dec"], original.W_dec) or not torch.equal(copied["W_enc"], original.W_enc)
    flashsae.load(tmp_path / "out")  # the copy records the digest of what it wrote


def test_sharded_checkpoints_record_and_verify_each_file(tmp_path):
    from flashsae.distributed import ShardedTopKSAE, consolidate, load_sharded, save_sharded, single_process

    full = flashsae.create("topk", d_in=16, n_latents=64, k=4)
    save_sharded(tmp_path / "sharded", ShardedTopKSAE.from_full(full, single_process()))
    index_file = tmp_path / "sharded" / "index.json"
    index = json.loads(index_file.read_text())
    (entry,) = index["files"]
    shard = tmp_path / "sharded" / entry["path"]
    assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert sorted(p.name for p in shard.parent.iterdir()) == ["index.json", shard.name]  # no sidecars left
    assert torch.equal(consolidate(tmp_path / "sharded").W_dec, full.W_dec)
    overwrite_16_bytes(shard)
    with pytest.raises(CheckpointCorruptError, match=f"{re.escape(shard.name)} is corrupt"):
        load_sharded(tmp_path / "sharded")
    load_sharded(tmp_path / "sharded", verify=False)
    del entry["sha256"]  # an index written before checksums
    index_file.write_text(json.dumps(index))
    load_sharded(tmp_path / "sharded")
