"""flashsae.train.calibration: the BatchTopK inference threshold that gives L0 = k on a sample."""

import json

import pytest
import torch

import flashsae
from flashsae.train import Trainer, calibrate_threshold
from flashsae.train.calibration import threshold_for_l0
from train_helpers import text, tiny_train_config  # noqa: F401 - text: a fixture the tests request by name


def dense_count(sae, x, threshold):
    """Active (row, latent) pairs of the eval-mode rule, in float64 (the reference)."""
    p = {name: t.detach().double() for name, t in sae.named_parameters()}
    act = ((x.double() - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]).relu()
    return int((act > threshold).sum())


@pytest.mark.parametrize(
    ("rows", "d", "n", "k", "architecture"), [(37, 13, 71, 3, "batchtopk"), (200, 20, 64, 5, "matryoshka")]
)
def test_threshold_gives_exactly_k_per_row(rows, d, n, k, architecture):
    torch.manual_seed(rows)
    sae = flashsae.create(architecture, d_in=d, n_latents=n, k=k, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(rows, d, dtype=torch.float64)
    threshold = calibrate_threshold(sae, x)
    assert float(sae.threshold) == threshold > 0
    assert dense_count(sae, x, threshold) == rows * k
    sae.eval()
    assert int((sae.encode(x).indices >= 0).sum()) == rows * k


def test_rows_holding_more_than_the_kept_values_are_counted():
    """One row carries most of the sample's largest activations: the first pass (4k per row) cannot
    see them all, the retry must."""
    torch.manual_seed(1)
    sae = flashsae.create("batchtopk", d_in=8, n_latents=96, k=2, dtype=torch.float64)
    x = torch.randn(30, 8, dtype=torch.float64) * 0.01
    with torch.no_grad():
        x[0] = 50 * sae.W_enc[:40].sum(0)  # row 0 excites ~40 latents strongly
    threshold = threshold_for_l0(sae, x)
    assert dense_count(sae, x, threshold) == 30 * 2
    assert dense_count(sae, x[:1], threshold) > 4 * 2, "row 0 must hold more than the first pass keeps"


def test_fewer_positive_activations_than_wanted_give_zero():
    sae = flashsae.create("batchtopk", d_in=8, n_latents=16, k=16, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[0] = 100.0
    assert threshold_for_l0(sae, torch.randn(10, 8, dtype=torch.float64)) == 0.0


def test_bad_arguments():
    with pytest.raises(TypeError, match="sae: expected a BatchTopKSAE"):
        calibrate_threshold(flashsae.create("topk", d_in=8, n_latents=16, k=2), torch.randn(4, 8))
    sae = flashsae.create("batchtopk", d_in=8, n_latents=16, k=2)
    with pytest.raises(ValueError, match=r"x: expected a non-empty \[rows, d_in\] tensor"):
        calibrate_threshold(sae, torch.randn(0, 8))
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., d_in=8\]"):
        calibrate_threshold(sae, torch.randn(4, 9))


def test_trainer_calibrates_before_saving(tmp_path, text):
    config = tiny_train_config(
        tmp_path, "run", text, hookpoints=["encoder.layer.1"], architecture="batchtopk", k=6, batch_size=64,
        train_tokens=64 * 6, calibration_tokens=200,
    )  # fmt: skip
    trainer = Trainer(config)
    result = trainer.train()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    record = summary["threshold_calibration"]["encoder.layer.1"]
    sae = trainer.saes["encoder.layer.1"]
    assert record["tokens"] == 200 and record["part"] == "train" and record["threshold"] == float(sae.threshold)
    assert record["running_estimate"] != record["threshold"]
    sample = trainer.source.peek(200)["encoder.layer.1"] * trainer.scales["encoder.layer.1"]
    sae.eval()
    # the sparse float32 encoder sums in another order than the calibration's GEMM, so activations
    # within ~1e-7 of the threshold may land on either side of it; and the sample repeats rows (the
    # first position of every context), whose tied activations all fall on one side: allow the
    # activations within 1e-6 of the threshold (at least one) to flip
    p = {name: t.detach().double() for name, t in sae.named_parameters()}
    act = ((sample.double() - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]).relu()
    threshold = record["threshold"]
    ambiguous = int(((act - threshold).abs() <= 1e-6 * threshold).sum())
    assert abs(int((sae.encode(sample).indices >= 0).sum()) - 200 * 6) <= max(1, ambiguous)
    saved = flashsae.load(result.sae_paths["encoder.layer.1"])
    assert float(saved.threshold) == pytest.approx(record["threshold"], rel=1e-6)


def test_no_calibration_keeps_the_running_estimate(tmp_path, text):
    config = tiny_train_config(
        tmp_path, "run", text, hookpoints=["encoder.layer.1"], architecture="batchtopk", k=6, batch_size=64,
        train_tokens=64 * 3, calibration_tokens=0,
    )  # fmt: skip
    result = Trainer(config).train()
    assert json.loads((result.run_dir / "summary.json").read_text())["threshold_calibration"] == {}


def test_trainer_calibrates_on_held_out_tokens_after_the_measured_ones(tmp_path, text, monkeypatch):
    from flashsae.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "MIN_CALIBRATION_TOKENS", 8)
    config = tiny_train_config(
        tmp_path, "run", text, hookpoints=["encoder.layer.1"], architecture="batchtopk", k=6, batch_size=64,
        train_tokens=64 * 4, eval_tokens=16, calibration_tokens=40,
    )  # fmt: skip
    trainer = Trainer(config)
    result = trainer.train()
    record = json.loads((result.run_dir / "summary.json").read_text())["threshold_calibration"]["encoder.layer.1"]
    held_out = torch.cat([chunk["encoder.layer.1"] for chunk in trainer.eval_chunks()])
    assert held_out.shape[0] >= 16 + 8, "the tiny corpus's eval part must hold more than the measured tokens"
    expected = held_out[16 : 16 + 40]
    assert record["part"] == "eval" and record["tokens"] == expected.shape[0]
    sae = trainer.saes["encoder.layer.1"]
    sae.eval()
    scaled = expected * trainer.scales["encoder.layer.1"]
    assert abs(int((sae.encode(scaled).indices >= 0).sum()) - expected.shape[0] * 6) <= 1  # as above
