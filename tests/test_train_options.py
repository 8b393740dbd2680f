"""Command-line sizes, the checkpoint interval's default and the tensorboard switch:

- one size parser for every command: `flashsae train --n-latents 16M` as `flashsae plan --n 16M`;
- checkpoint_every defaults to a quarter of the run, so the demo's 256 steps checkpoint;
- --tensorboard: auto by default (on when it imports, else a one-line note), an error when asked
  for explicitly without the package."""

from __future__ import annotations

import argparse
import importlib

import pytest

from flashsae.cli import COMMANDS, main
from flashsae.cli_args import parse_count
from flashsae.distributed.train import build_parser as distributed_parser
from flashsae.train import TrainConfig
from flashsae.train import metrics as metrics_module
from train_helpers import text, tiny_bert  # noqa: F401 - text: a fixture the tests request by name


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashsae")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(subparsers)
    return parser


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (["train", "--n-latents", "16M"], "n_latents", 16 << 20),
        (["train", "--n-latents", "2^24"], "n_latents", 1 << 24),
        (["train", "--n-latents", "none"], "n_latents", None),
        (["train", "--train-tokens", "256k"], "train_tokens", 262_144),
        (["train", "--train-tokens", "50_000_000"], "train_tokens", 50_000_000),
        (["train", "--batch-size", "4k"], "batch_size", 4096),
        (["cache", "--cache-tokens", "1M"], "cache_tokens", 1 << 20),
        (["plan", "--n", "16M"], "n", 16 << 20),
        (["bench", "--n-latents", "24k"], "n_latents", 24 << 10),
        (["eval", "run", "--n-tokens", "16k"], "n_tokens", 16 << 10),
        (["report", "run", "--n-tokens", "16k"], "n_tokens", 16 << 10),
    ],
)
def test_every_command_reads_sizes_with_one_parser(argv, field, expected):
    assert getattr(cli_parser().parse_args(argv), field) == expected


def test_distributed_train_reads_sizes_too():
    args = distributed_parser().parse_args(["--n-latents", "16M", "--dead-tokens", "10M"])
    assert (args.n_latents, args.dead_tokens) == (16 << 20, 10 << 20)


def test_a_bad_size_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_parser().parse_args(["train", "--n-latents", "16Q"])
    assert exit_info.value.code == 2
    assert "argument --n-latents: expected an integer, 2^N or a number with k/M/G" in capsys.readouterr().err
    assert parse_count("1.5M") == 3 << 19


def test_checkpoint_every_defaults_to_a_quarter_of_the_run():
    demo = TrainConfig()
    assert demo.steps == 256 and demo.checkpoint_every is None
    assert demo.resolved_checkpoint_every() == 64  # an interrupted demo has a checkpoint to resume from
    assert TrainConfig(train_tokens=2048, batch_size=1024).resolved_checkpoint_every() == 1
    assert TrainConfig(checkpoint_every=0).resolved_checkpoint_every() == 0
    assert TrainConfig(checkpoint_every=500).resolved_checkpoint_every() == 500
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)


def test_the_default_interval_writes_checkpoints_during_a_run(tmp_path, text, monkeypatch):
    from flashsae.train import trainer as trainer_module

    steps = []
    real = trainer_module.Trainer.save_checkpoint
    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", lambda self: steps.append(self.step) or real(self))
    flags = [
        "--model", str(tiny_bert()), "--hookpoints", "encoder.layer.1", "--dataset", str(text), "--ctx-len", "16",
        "--model-batch-size", "4", "--device", "cpu", "--k", "8", "--batch-size", "64", "--buffer-tokens", "256",
        "--eval-tokens", "128", "--no-progress", "--no-tensorboard", "--train-tokens", "512", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(["train", *flags]) == 0
    assert steps == [2, 4, 6, 8]  # 8 steps: every 2, the last one at the end


@pytest.fixture
def no_tensorboard(monkeypatch):
    """torch.utils.tensorboard fails to import, as without the tensorboard package."""
    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ModuleNotFoundError("No module named 'tensorboard'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(metrics_module.importlib, "import_module", import_module)


def test_tensorboard_auto_without_the_package_is_off_with_a_one_line_note(no_tensorboard, capsys):
    assert metrics_module.resolve_tensorboard(None) is False
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "tensorboard is not installed" in note[0] and "--no-tensorboard" in note[0]
    assert metrics_module.resolve_tensorboard(False) is False
    assert capsys.readouterr().err == ""


def test_tensorboard_asked_for_without_the_package_is_a_clear_error(no_tensorboard, tmp_path, capsys):
    with pytest.raises(ImportError, match=r"--tensorboard needs the tensorboard package.*pip install tensorboard"):
        metrics_module.resolve_tensorboard(True)
    # from the command line: refused before any model loads (the model path does not even exist)
    assert main(["train", "--tensorboard", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "r")]) == 2
    assert "flashsae train: error: tensorboard: --tensorboard needs the tensorboard package" in capsys.readouterr().err


def test_tensorboard_auto_with_the_package_is_on(monkeypatch):
    monkeypatch.setattr(metrics_module.importlib, "import_module", lambda name, *a, **k: object())
    assert metrics_module.resolve_tensorboard(None) is True
    assert metrics_module.resolve_tensorboard(True) is True
