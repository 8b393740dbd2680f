"""The trainer's autocast setting reaches the SAE's own ops: with ``autocast="bf16"`` (``flashsae train
--autocast bf16``) on CPU, and with the default ``"auto"`` on CUDA, every flashsae op of the SAE step
receives bfloat16 operands (recorded through the ops' dispatch, helpers.OpOperands), the run still
trains, and the parameters stay float32. ``"auto"`` on CPU changes nothing."""

import json

import pytest
import torch

from flashsae import _native
from flashsae.cli import main
from flashsae.modules import REGISTRY
from flashsae.train import Trainer
from helpers import OpOperands, assert_received
from test_train_cli import tiny_flags
from test_train_trainer import BATCH, small
from train_helpers import text  # noqa: F401 - a fixture the tests request by name

HOOK = "encoder.layer.1"
ENCODER = ["x", "W_enc", "b_enc", "b_dec"]
LOSS = ["x", "values", "W_dec", "b_dec"]
#: The sites of the multi-site architectures: a CLT pairs each layer's MLP input with its output, a
#: crosscoder reads two layers.
MULTI_SITE_SITES = {
    "clt": {"hookpoints": ["encoder.layer.*.attention.output"], "targets": ["encoder.layer.*.output.dense"]},
    "crosscoder": {"hookpoints": ["encoder.layer.1", "encoder.layer.2"]},
}


def config(tmp_path, text, **overrides):
    """The trainer tests' tiny BERT run (AuxK active), one hookpoint, 40 steps."""
    settings = {"hookpoints": [HOOK], "train_tokens": BATCH * 40, "log_every": 4}
    return small(tmp_path, "run", text, **(settings | overrides))


def fvu_curve(trainer: Trainer) -> list[float]:
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[f"{HOOK}/fvu"] for line in lines]


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_bf16_autocast_step_runs_the_ops_in_bf16_and_trains(tmp_path, text, optimizer):
    trainer = Trainer(config(tmp_path, text, autocast="bf16", optimizer=optimizer))
    with OpOperands() as mode:
        trainer.train()
    assert_received(mode, "topk_encode", torch.bfloat16, ENCODER)
    assert_received(mode, "sae_loss", torch.bfloat16, [*LOSS, "aux_values"])
    assert_received(mode, "topk_encode_backward", torch.bfloat16, ["d_values", "x", "W_enc", "b_dec"])
    assert_received(mode, "sae_loss_backward", torch.bfloat16, LOSS)
    fvu = fvu_curve(trainer)
    assert fvu[-1] < 0.7 * fvu[0], f"the bf16 autocast run did not train: fvu {fvu}"
    for name, p in trainer.saes[HOOK].named_parameters():
        assert p.dtype == torch.float32, f"{name} left float32"
        assert torch.isfinite(p).all(), name


def test_auto_on_cpu_changes_nothing(tmp_path, text):
    trainer = Trainer(config(tmp_path, text, autocast="auto", train_tokens=BATCH * 4))
    with OpOperands() as mode:
        trainer.train()
    assert_received(mode, "topk_encode", torch.float32, ENCODER)
    assert_received(mode, "sae_loss", torch.float32, LOSS)


def test_cli_autocast_bf16_reaches_the_ops(tmp_path, text):
    flags = tiny_flags(text, tmp_path / "cli", "--train-tokens", "256", "--autocast", "bf16")
    with OpOperands() as mode:
        assert main(["train", *flags]) == 0
    assert_received(mode, "topk_encode", torch.bfloat16, ENCODER)
    assert_received(mode, "sae_loss", torch.bfloat16, LOSS)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.cuda_module_available()), reason="needs a CUDA GPU + _C_cuda"
)
def test_auto_on_cuda_runs_the_sae_step_in_bf16(tmp_path, text):
    trainer = Trainer(config(tmp_path, text, device="cuda", autocast="auto"))
    with OpOperands() as mode:
        trainer.train()
    assert_received(mode, "topk_encode", torch.bfloat16, ENCODER)
    assert_received(mode, "sae_loss", torch.bfloat16, [*LOSS, "aux_values"])
    fvu = fvu_curve(trainer)
    assert fvu[-1] < 0.7 * fvu[0], f"the bf16 autocast run did not train: fvu {fvu}"
    assert all(p.dtype == torch.float32 for p in trainer.saes[HOOK].parameters())


@pytest.mark.parametrize("architecture", sorted(REGISTRY))
def test_every_registered_architecture_trains_under_bf16_autocast(tmp_path, text, architecture):
    """Each architecture's step runs under --autocast bf16: every flashsae op it calls receives bfloat16
    operands (besides the gradients of sae_loss's float32 row sums), and the parameters keep float32
    values that stay finite. (JumpReLU, ReLU and Gated SAEs train on dense torch ops, which follow
    torch's own autocast rules; their sparse ops serve inference.)"""
    sites = MULTI_SITE_SITES.get(architecture, {})
    trainer = Trainer(
        config(tmp_path, text, architecture=architecture, autocast="bf16", train_tokens=BATCH * 6, **sites)
    )
    with OpOperands() as mode:
        result = trainer.train()
    assert result.step == 6
    for op, floats in mode.calls:
        wrong = {name: dtype for name, dtype in floats.items() if dtype != torch.bfloat16}
        assert set(wrong) <= {"grad_sse", "grad_aux_sse"}, f"{architecture}: {op} received {floats}"
    (model,) = trainer.saes.values()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), f"{architecture}: {name}"
