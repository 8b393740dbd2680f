"""`flashsae train` and `flashsae cache`: a flag per config field, runs on tiny models, a real
SIGKILL followed by --resume, clear errors, and the real demo model (all-MiniLM-L6-v2) offline."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import flashsae
from flashsae.cli import main
from flashsae.train import CacheConfig, TrainConfig, field_docs
from flashsae.train.checkpoint import load_training_checkpoint
from train_helpers import text, tiny_bert  # noqa: F401 - text: a fixture the tests request by name


def tiny_flags(text, out, *extra):
    return [
        "--model", str(tiny_bert()), "--hookpoints", "encoder.layer.1", "--dataset", str(text),
        "--ctx-len", "16", "--model-batch-size", "4", "--device", "cpu", "--k", "8", "--batch-size", "64",
        "--buffer-tokens", "256", "--eval-tokens", "128", "--no-progress", "--no-tensorboard", "--out", str(out),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("config_class", [TrainConfig, CacheConfig])
def test_every_field_has_a_docstring_and_a_flag(config_class, capsys):
    docs = field_docs(config_class)
    names = [f.name for f in dataclasses.fields(config_class)]
    assert set(docs) == set(names), f"undocumented: {set(names) - set(docs)}"
    assert all(len(doc) > 20 for doc in docs.values())
    command = "train" if config_class is TrainConfig else "cache"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in names:
        flag = "--" + name.replace("_", "-")
        assert (flag.removesuffix("s") if name == "sae_options" else flag) in help_text, f"no flag for {name}"
    assert " ".join(docs["ctx_len"].split()[:6]) in help_text, "the flag help is the field docstring"


def test_train_prints_metrics_and_where_it_saved(tmp_path, text, capsys):
    out = tmp_path / "run"
    flags = tiny_flags(text, out, "--train-tokens", "640", "--sae-option", "aux_k=5", "--sae-option", "auxk_alpha=0.5")
    assert main(["train", *flags]) == 0
    printed = capsys.readouterr().out
    assert "trained 640 tokens in 10 steps" in printed
    assert "encoder.layer.1: explained variance " in printed and "L0 " in printed and "dead " in printed
    assert f"saved encoder.layer.1: {out / 'encoder.layer.1'}" in printed
    sae = flashsae.load(out / "encoder.layer.1")
    assert (sae.d_in, sae.n_latents, sae.k, sae.aux_k, sae.config.auxk_alpha) == (32, 256, 8, 5, 0.5)
    assert json.loads((out / "config.json").read_text())["sae_options"] == {"aux_k": 5, "auxk_alpha": 0.5}

    # --resume takes the run's settings from its checkpoint; --train-tokens may extend it
    assert main(["train", "--out", str(out), "--resume", "--train-tokens", "1280", "--no-progress"]) == 0
    assert "trained 1,280 tokens in 20 steps" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--resume", "--k", "4"]) == 2
    assert "resume: cannot change k=4 (run: 8)" in capsys.readouterr().err


def test_bad_inputs_exit_2_with_a_message(tmp_path, text, capsys):
    assert main(["train", *tiny_flags(text, tmp_path / "a"), "--hookpoints", "encoder.layr.1"]) == 2
    err = capsys.readouterr().err
    assert "flashsae train: error: hookpoints: 'encoder.layr.1' matches no module" in err and "encoder.layer.1" in err
    assert main(["train", *tiny_flags(text, tmp_path / "b"), "--model", str(tmp_path / "missing")]) == 2
    assert "model: cannot load" in capsys.readouterr().err
    assert main(["train", *tiny_flags(text, tmp_path / "c"), "--buffer-tokens", "100"]) == 2
    assert "buffer_tokens: expected at least 2 x batch_size = 128" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "resume: needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--sae-option", "novalue"])
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_cache_then_train_from_it(tmp_path, text, capsys):
    cache = tmp_path / "acts"
    flags = ["--model", str(tiny_bert()), "--hookpoints", "encoder.layer.*", "--dataset", str(text), "--ctx-len", "16"]
    assert main(["cache", *flags, "--device", "cpu", "--out", str(cache), "--shard-tokens", "100"]) == 0
    printed = capsys.readouterr().out
    assert "encoder.layer.0 (d=32), encoder.layer.1 (d=32), encoder.layer.2 (d=32)" in printed
    assert f"manifest: {cache / 'manifest.json'}" in printed
    run = tmp_path / "run"
    assert main(["train", "--activations", str(cache), "--hookpoints", "encoder.layer.2", "--k", "8",
                 "--batch-size", "64", "--buffer-tokens", "128", "--train-tokens", "320", "--eval-tokens", "64",
                 "--no-progress", "--no-tensorboard", "--device", "cpu", "--out", str(run)]) == 0  # fmt: skip
    assert flashsae.load(run / "encoder.layer.2").metadata["activations"] == str(cache.resolve())


CHILD = textwrap.dedent(
    """
    import sys, time
    from flashsae.train import TrainConfig, Trainer
    config = TrainConfig(**__import__("json").loads(sys.argv[1]))
    Trainer(config).train(on_step=lambda trainer: time.sleep(0.1))  # slow enough to be killed mid-run
    """
)


def test_killed_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, text):
    settings = {
        "model": str(tiny_bert()), "hookpoints": ["encoder.layer.1"], "dataset": str(text), "ctx_len": 16,
        "model_batch_size": 4, "device": "cpu", "k": 8, "batch_size": 64, "buffer_tokens": 256,
        "train_tokens": 64 * 40, "dead_tokens": 128, "checkpoint_every": 10, "eval_tokens": 64, "progress": False,
        "tensorboard": False,
    }  # fmt: skip
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings | {"out": str(killed)})])
    state_file = killed / "checkpoint" / "state.json"
    try:
        deadline = time.monotonic() + 120
        while not state_file.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the child was killed mid-run, not finished"
    killed_at = json.loads(state_file.read_text())["step"]
    assert 10 <= killed_at < 40
    assert main(["train", "--out", str(killed), "--resume"]) == 0

    straight = tmp_path / "straight"
    assert main(["train", "--out", str(straight), *_flags(settings)]) == 0
    resumed_state, resumed = load_training_checkpoint(killed / "checkpoint")
    straight_state, expected = load_training_checkpoint(straight / "checkpoint")
    assert resumed_state["step"] == straight_state["step"] == 40
    for key, value in expected.items():
        if key.startswith(("sae/", "optim/", "since_fired/")):
            assert torch.equal(resumed[key], value), key


def _flags(settings):
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *value]
        else:
            flags += [flag, str(value)]
    return flags


def test_console_script_knows_train_and_cache():
    exe = Path(sys.executable).parent / "flashsae"
    out = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--hookpoints" in out and "--resume" in out and "--activations" in out
    out = subprocess.run([str(exe), "cache", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--shard-tokens" in out


def test_demo_model_end_to_end_offline(tmp_path, capsys, monkeypatch):
    """The embedded default (all-MiniLM-L6-v2 layer 3 over pydoc_data.topics), shortened to 32 steps."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    flags = ["--train-tokens", "16384", "--batch-size", "512", "--buffer-tokens", "4096", "--eval-tokens", "2048"]
    assert main(["train", *flags, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sentence-transformers/all-MiniLM-L6-v2 -> encoder.layer.3 (TopKSAE 384x3072)" in printed
    sae = flashsae.load(out / "encoder.layer.3")
    figures = sae.metadata["final_metrics"]
    assert figures["explained_variance"] > 0.5 and figures["l0"] <= 32 and figures["dead_pct"] <= 10
    assert f"explained variance {figures['explained_variance']:.3f}" in printed
    assert sae.metadata["model"] == "sentence-transformers/all-MiniLM-L6-v2" and sae.metadata["dataset"] == "pydoc"
