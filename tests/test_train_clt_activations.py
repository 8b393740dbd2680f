"""flashsae train with the trainable CLT activations on a tiny BERT: a JumpReLU CLT with a target L0
(per-layer controllers, saved and resumed exactly), a BatchTopK CLT whose per-layer thresholds are
calibrated before saving, and a ReLU CLT."""

import json

import pytest
import torch

import flashsae
from flashsae.train import Trainer
from flashsae.train.trainer import SUMMARY_FILE
from test_train_clt import clt_config
from train_helpers import text  # noqa: F401 - a fixture the tests request by name


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
def test_clt_activation_trains_saves_and_reports_per_layer(tmp_path, text, activation):
    trainer = Trainer(clt_config(tmp_path, activation, text, sae_options={"activation": activation}))
    clt = trainer.saes["clt"]
    assert clt.activation == activation and clt.config.target_l0 == 4
    result = trainer.train()
    for i in range(3):
        figures = result.metrics[f"clt/layer{i}"]
        assert figures["l0"] > 0 and 0 <= figures["dead_pct"] <= 100
    saved = flashsae.load(result.sae_paths["clt"])
    assert saved.activation == activation
    if activation in ("jumprelu", "relu"):
        assert all(c.is_started() for c in saved.l0_controllers)
    if activation == "batchtopk":
        calibration = json.loads((result.run_dir / SUMMARY_FILE).read_text())["threshold_calibration"]["clt"]
        assert len(calibration["threshold"]) == 3 and all(t > 0 for t in calibration["threshold"])
        # the saved thresholds are the calibrated ones (latent values and thresholds keep their scale)
        assert saved.threshold_estimate.tolist() == pytest.approx(calibration["threshold"])


@pytest.mark.parametrize("optimizer", ["sparse_adam", "adam"])
def test_jumprelu_clt_resume_is_exact(tmp_path, text, optimizer):
    options = {"sae_options": {"activation": "jumprelu"}, "optimizer": optimizer}
    straight = Trainer(clt_config(tmp_path, "straight", text, **options))
    straight.train()

    def stop_at_3(trainer):
        if trainer.step == 3:
            import signal

            signal.raise_signal(signal.SIGINT)

    first = Trainer(clt_config(tmp_path, "resumed", text, **options))
    assert first.train(on_step=stop_at_3).interrupted
    resumed = Trainer(clt_config(tmp_path, "resumed", text, resume=True, **options))
    resumed.train()
    state = straight.saes["clt"].state_dict()
    assert any("l0_controllers" in key for key in state)
    for key, value in state.items():
        assert torch.equal(value, resumed.saes["clt"].state_dict()[key]), key


def test_per_layer_transcoders_train_together_and_save_as_a_transcoder_set(tmp_path, text):
    options = {"sae_options": {"activation": "jumprelu", "cross_layer": False}}
    trainer = Trainer(clt_config(tmp_path, "set", text, **options))
    assert trainer.saes["clt"].W_dec_0.shape == (trainer.saes["clt"].n_latents, 32)
    result = trainer.train()
    saved = flashsae.load(result.sae_paths["clt"])
    assert not saved.config.cross_layer
    saved.save(tmp_path / "set_files", format="transcoder_set")
    again = flashsae.load(tmp_path / "set_files")
    batch = trainer.source.next_batch()
    x = torch.stack([batch[s] for s in trainer.units["clt"].inputs], 1)
    with torch.no_grad():
        assert torch.equal(again.encode(x).indices, saved.encode(x).indices)
