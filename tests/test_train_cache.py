"""flashsae cache: shards + manifest with checksums that hold exactly the model's activations, read
back memory-mapped in a deterministic shuffle; truncated or mismatched shards are clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flashsae.train import CacheConfig, CachedActivations, CacheError, read_manifest, write_cache
from flashsae.train.activations import ModelActivations
from flashsae.train.cache import _sha256
from train_helpers import tiny_bert, write_text_files

HOOKS = ["encoder.layer.0", "encoder.layer.2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    files = write_text_files(root / "text")
    config = CacheConfig(
        model=str(tiny_bert()),
        hookpoints=HOOKS,
        dataset=str(files["jsonl"]),
        ctx_len=16,
        model_batch_size=3,
        device="cpu",
        out=str(root / "acts"),
        shard_tokens=50,
    )
    write_cache(config, progress=False)
    return root / "acts", config


def reference_rows(config):
    source = ModelActivations(config, cycle=False)
    chunks = list(source.chunks())
    return {name: torch.cat([c[name] for c in chunks]) for name in HOOKS}


def reader(directory, **kwargs):
    options = {"hookpoints": None, "batch_size": 16, "seed": 0, "device": torch.device("cpu")} | kwargs
    return CachedActivations(directory, **options)


def file_order(cached, name):
    return torch.cat([cached._shard(i, name).gather(np.arange(n)) for i, n in enumerate(cached.shard_rows.tolist())])


def test_manifest_and_shards_hold_the_activations(cache_dir):
    directory, config = cache_dir
    manifest = read_manifest(directory)
    expected = reference_rows(config)
    total = expected[HOOKS[0]].shape[0]
    assert manifest["complete"] and manifest["tokens"] == total
    assert manifest["model"] == config.model and manifest["dtype"] == "float32" and manifest["ctx_len"] == 16
    assert manifest["hookpoints"] == {name: {"d": 32, "folder": name} for name in HOOKS}
    sizes = [shard["tokens"] for shard in manifest["shards"]]
    assert sizes[:-1] == [50] * (len(sizes) - 1) and 0 < sizes[-1] <= 50 and sum(sizes) == total
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            path = directory / entry["path"]
            assert _sha256(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
    # reading every row back in file order gives exactly the model's activations
    cached = reader(directory)
    for name in HOOKS:
        assert torch.equal(file_order(cached, name), expected[name])


def test_reading_is_a_deterministic_shuffle_of_every_row(cache_dir):
    directory, _ = cache_dir
    cached = reader(directory, batch_size=7)
    total = cached.total
    a_rows = torch.cat([cached.next_batch()["encoder.layer.0"] for _ in range(-(-2 * total // 7))])
    first, second = a_rows[:total], a_rows[total : 2 * total]

    def canonical(rows):
        return sorted(map(tuple, rows.tolist()))

    in_file_order = file_order(cached, "encoder.layer.0")
    every = canonical(in_file_order)
    assert canonical(first) == every and canonical(second) == every, "each pass serves every row once"
    assert not torch.equal(first, second), "each pass has its own order"
    assert not torch.equal(first[:7], in_file_order[:7]), "rows are shuffled, not in file order"
    # the two hookpoints stay aligned, the order is a function of (seed, position) only
    again = reader(directory, batch_size=7)
    both = again.next_batch()
    assert torch.equal(both["encoder.layer.0"], a_rows[:7])
    other = reader(directory, batch_size=7, hookpoints=["encoder.layer.2"])
    assert torch.equal(other.next_batch()["encoder.layer.2"], both["encoder.layer.2"])
    resumed = reader(directory, batch_size=7)
    resumed.load_state_dict({"served": 35}, {})
    assert torch.equal(resumed.next_batch()["encoder.layer.0"], a_rows[35:42])
    assert not torch.equal(reader(directory, batch_size=7, seed=1).next_batch()["encoder.layer.0"], a_rows[:7])


def broken_copy(cache_dir, tmp_path):
    directory, _ = cache_dir
    copy = tmp_path / "acts"
    shutil.copytree(directory, copy)
    return copy


def read_all(directory, **kwargs):
    cached = reader(directory, **kwargs)
    for _ in range(-(-cached.total // 16)):
        cached.next_batch()


def test_truncated_shard(cache_dir, tmp_path):
    copy = broken_copy(cache_dir, tmp_path)
    shard = copy / "encoder.layer.2" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"shard-00001.safetensors is truncated or padded"):
        read_all(copy)
    shard.write_bytes(b"\x01")
    with pytest.raises(CacheError, match=r"shard-00001.safetensors is truncated"):
        read_all(copy)


def test_mismatched_shard(cache_dir, tmp_path):
    copy = broken_copy(cache_dir, tmp_path)
    shard = copy / "encoder.layer.0" / "shard-00000.safetensors"
    save_file({"activations": torch.zeros(50, 31)}, str(shard))
    with pytest.raises(CacheError, match=r"holds F32 \[50, 31\], but the manifest says F32 \[50, 32\]"):
        read_all(copy)
    save_file({"activations": torch.zeros(50, 32, dtype=torch.bfloat16)}, str(shard))
    with pytest.raises(CacheError, match=r"holds BF16 \[50, 32\], but the manifest says F32"):
        read_all(copy)
    save_file({"activations": torch.zeros(50, 32)}, str(shard))  # right shape, wrong data
    with pytest.raises(CacheError, match=r"does not match its checksum"):
        read_all(copy)
    read_all(copy, verify_checksums=False)  # only the checksum catches same-shape garbage


def test_missing_pieces(cache_dir, tmp_path):
    copy = broken_copy(cache_dir, tmp_path)
    (copy / "encoder.layer.0" / "shard-00002.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-00002.safetensors is missing"):
        read_all(copy)
    with pytest.raises(ValueError, match=r"hookpoints: encoder.layer.1 not in the cache .* holds encoder.layer.0"):
        reader(copy, hookpoints=["encoder.layer.1"])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokens"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"lists \d+ tokens in shards but \d+ in total"):
        reader(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no manifest.json; make one with flashsae cache"):
        reader(copy)


def test_token_limit_and_no_overwrite(cache_dir, tmp_path):
    _, config = cache_dir
    limited = CacheConfig(**(config.to_dict() | {"out": str(tmp_path / "small"), "cache_tokens": 73}))
    manifest = write_cache(limited, progress=False)
    assert manifest["tokens"] == 73 and [s["tokens"] for s in manifest["shards"]] == [50, 23]
    with pytest.raises(FileExistsError, match=r"already holds an activation cache"):
        write_cache(limited, progress=False)
