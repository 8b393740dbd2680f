"""flashsae train for the multi-site architectures: a CLT over every layer of a tiny BERT (inputs
and targets captured in one forward pass), a crosscoder over two layers; per-layer metrics, folding
of the per-site scales into the saved model, resume, SparseAdam updating during backward."""

import json

import pytest
import torch

import flashsae
from flashsae.train import Trainer
from flashsae.train.sites import Unit, plan_units
from train_helpers import text, tiny_train_config  # noqa: F401 - text: a fixture the tests request by name

INPUTS, TARGETS = "encoder.layer.*.attention.output", "encoder.layer.*.output.dense"
BATCH, STEPS = 64, 6


def clt_config(tmp_path, name, text, **overrides):
    settings = {
        "architecture": "clt", "hookpoints": [INPUTS], "targets": [TARGETS], "k": 4, "batch_size": BATCH,
        "train_tokens": BATCH * STEPS, "log_every": 2, "eval_tokens": 128, "optimizer": "sparse_adam",
    }  # fmt: skip
    return tiny_train_config(tmp_path, name, text, **(settings | overrides))


def test_sites_pair_inputs_with_targets_in_model_order():
    captured = [f"encoder.layer.{i}.{site}" for i in range(3) for site in ("attention.output", "output.dense")]
    units = plan_units("clt", captured, [INPUTS], [TARGETS])
    assert units == {
        "clt": Unit(tuple(f"encoder.layer.{i}.attention.output" for i in range(3)),
                    tuple(f"encoder.layer.{i}.output.dense" for i in range(3)))
    }  # fmt: skip
    with pytest.raises(ValueError, match="targets: a clt pairs each input with one target"):
        plan_units("clt", captured, ["encoder.layer.0.attention.output"], [TARGETS])
    assert plan_units("topk", captured[:2], None, None) == {c: Unit((c,)) for c in captured[:2]}


def test_clt_trains_from_one_forward_pass_and_saves_a_folded_clt(tmp_path, text):
    trainer = Trainer(clt_config(tmp_path, "clt", text))
    assert len(trainer.hookpoints) == 6 and list(trainer.saes) == ["clt"]
    clt = trainer.saes["clt"]
    assert (clt.n_layers, clt.d_in, clt.d_out, clt.k) == (3, 32, 32, 4)
    assert trainer.optimizers["clt"].update_in_backward
    result = trainer.train()
    assert result.step == STEPS
    for i in range(3):
        figures = result.metrics[f"clt/layer{i}"]
        assert set(figures) == {"explained_variance", "fvu", "l0", "dead_pct"} and 0 < figures["l0"] <= 4
    mean = sum(result.metrics[f"clt/layer{i}"]["explained_variance"] for i in range(3)) / 3
    assert result.metrics["clt"]["explained_variance"] == pytest.approx(mean)
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"clt/layer2/fvu", "clt/layer2/l0", "clt/layer2/dead_pct", "clt/fvu"} <= set(record)
    # the saved CLT takes raw activations: on raw x it predicts the raw y that the trained one
    # predicts (scaled) on scaled x
    saved = flashsae.load(result.sae_paths["clt"])
    assert isinstance(saved, flashsae.CrossLayerTranscoder) and saved.metadata["activation_scale_folded"]
    batch = trainer.source.next_batch()
    unit, scales = trainer.units["clt"], trainer.scales["clt"]
    x_raw = torch.stack([batch[s] for s in unit.inputs], 1)
    y_raw = torch.stack([batch[s] for s in unit.targets], 1)
    x, y = trainer._inputs("clt", batch, torch.float32)
    with torch.no_grad():
        raw, scaled = saved(x_raw, y_raw), clt(x, y)
    targets = torch.tensor(scales["targets"]).view(1, -1, 1)
    atol = 1e-4 * scaled.x_hat.abs().max().item()
    torch.testing.assert_close(raw.x_hat * targets, scaled.x_hat, rtol=1e-4, atol=atol)
    assert torch.equal(raw.latents.indices, scaled.latents.indices)


def test_clt_resume_is_exact(tmp_path, text):
    straight = Trainer(clt_config(tmp_path, "straight", text))
    straight.train()

    def stop_at_3(trainer):
        if trainer.step == 3:
            import signal

            signal.raise_signal(signal.SIGINT)

    first = Trainer(clt_config(tmp_path, "resumed", text))
    assert first.train(on_step=stop_at_3).interrupted
    resumed = Trainer(clt_config(tmp_path, "resumed", text, resume=True))
    resumed.train()
    for key, value in straight.saes["clt"].state_dict().items():
        assert torch.equal(value, resumed.saes["clt"].state_dict()[key]), key
    assert torch.equal(straight.since_fired["clt"], resumed.since_fired["clt"])


def test_crosscoder_trains_on_two_layers(tmp_path, text):
    config = tiny_train_config(
        tmp_path, "cc", text, architecture="crosscoder", hookpoints=["encoder.layer.1", "encoder.layer.2"], k=4,
        batch_size=BATCH, train_tokens=BATCH * STEPS, eval_tokens=128,
    )  # fmt: skip
    trainer = Trainer(config)
    result = trainer.train()
    assert set(result.metrics) == {"crosscoder", "crosscoder/site0", "crosscoder/site1"}
    saved = flashsae.load(result.sae_paths["crosscoder"])
    batch = trainer.source.next_batch()
    x_raw = torch.stack([batch["encoder.layer.1"], batch["encoder.layer.2"]], 1)
    (x,) = trainer._inputs("crosscoder", batch, torch.float32)
    scales = torch.tensor(trainer.scales["crosscoder"]["inputs"]).view(1, -1, 1)
    with torch.no_grad():
        raw, scaled = saved(x_raw), trainer.saes["crosscoder"](x)
    torch.testing.assert_close(raw.x_hat * scales, scaled.x_hat, rtol=1e-4, atol=1e-4 * scaled.x_hat.abs().max().item())


def test_targets_only_for_clt(tmp_path, text):
    with pytest.raises(ValueError, match="targets: architecture clt needs --targets"):
        clt_config(tmp_path, "x", text, targets=None)
    with pytest.raises(ValueError, match="targets: only architecture clt predicts targets"):
        clt_config(tmp_path, "y", text, architecture="topk")
