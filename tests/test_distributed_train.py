"""python -m flashsae.distributed.train under torchrun (CPU, gloo): a latent-sharded run from a disk cache,
then --resume on another layout (2 data-parallel replicas of 1 shard: the checkpoint is resharded)."""

import json
import subprocess
import sys

import pytest
import torch

from flashsae.distributed import consolidate, read_index
from flashsae.train import CacheConfig, write_cache
from train_helpers import tiny_bert, write_text_files

HOOK = "encoder.layer.1"
BATCH = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    text = write_text_files(root / "text")["jsonl"]
    config = CacheConfig(
        model=str(tiny_bert()), hookpoints=[HOOK], dataset=str(text), ctx_len=16, model_batch_size=4, device="cpu",
        out=str(root / "cache"), cache_tokens=2048, shard_tokens=512,
    )  # fmt: skip
    write_cache(config, progress=False)
    return root / "cache"


def torchrun(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "flashsae.distributed.train", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def test_sharded_run_then_resume_on_another_layout(cache, tmp_path):
    out = tmp_path / "run"
    common = [
        "--activations", str(cache), "--n-latents", "256", "--k", "4", "--batch-size", str(BATCH),
        "--dead-tokens", "128", "--log-every", "1", "--checkpoint-every", "2", "--optimizer", "sparse_adam",
        "--out", str(out),
    ]  # fmt: skip
    done = torchrun(*common, "--train-tokens", str(4 * BATCH), "--tensor-parallel", "2")
    assert "1 replica(s) x 2 shard(s)" in done.stdout
    index = read_index(out / "checkpoint")
    assert [(f["start"], f["end"]) for f in index["files"]] == [(0, 128), (128, 256)]
    assert index["extra"]["step"] == 4 and index["optimizer"]["class"] == "SparseAdam"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["fvu"] < records[0]["fvu"], "the loss goes down"

    # continue to 6 steps as 2 data-parallel replicas holding all 256 latents each
    done = torchrun(*common, "--train-tokens", str(6 * BATCH), "--tensor-parallel", "1", "--resume")
    assert "2 replica(s) x 1 shard(s)" in done.stdout and "steps 4 -> 6" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    sae = consolidate(out / "sae")
    assert sae.n_latents == 256 and sae.d_in == 32 and sae.metadata["steps"] == 6
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms * sae.metadata["activation_scale"], torch.ones(256), atol=1e-4), "unit rows, folded"
    assert [(f["start"], f["end"]) for f in read_index(out / "sae")["files"]] == [(0, 256)]


def test_refuses_without_a_cache(tmp_path):
    from flashsae.distributed.train import main

    assert main(["--out", str(tmp_path / "x"), "--train-tokens", "64"]) == 2
