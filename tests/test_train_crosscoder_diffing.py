"""Model diffing through the trainer: a crosscoder over the same hookpoint of two models (--model and
--model-b) read on the same tokens in one step; per-site metrics; the tokenizer check."""

import pytest
import torch

import flashsae
from flashsae.train import Trainer, TrainConfig
from flashsae.train.sites import Unit
from train_helpers import text, tiny_bert, tiny_gpt2, tiny_train_config  # noqa: F401 - text: a fixture

BATCH, STEPS = 64, 4


@pytest.fixture(scope="module")
def perturbed_bert(tmp_path_factory):
    """The tiny BERT with every weight moved by 5% noise (the fine-tuned model of a diffing study),
    saved with the same tokenizer."""
    from transformers import AutoTokenizer, BertModel

    directory = tmp_path_factory.mktemp("perturbed")
    model = BertModel.from_pretrained(tiny_bert())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.std().clamp_min(1e-3))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_bert()).save_pretrained(directory)
    return directory


def diff_config(tmp_path, name, text, model_b, **overrides):
    settings = {
        "architecture": "crosscoder", "hookpoints": ["encoder.layer.1"], "model_b": str(model_b), "k": 4,
        "batch_size": BATCH, "train_tokens": BATCH * STEPS, "eval_tokens": 128, "log_every": 2,
    }  # fmt: skip
    return tiny_train_config(tmp_path, name, text, **(settings | overrides))


def test_crosscoder_reads_both_models_on_the_same_tokens(tmp_path, text, perturbed_bert):
    trainer = Trainer(diff_config(tmp_path, "diff", text, perturbed_bert))
    assert trainer.hookpoints == ["encoder.layer.1", "model_b:encoder.layer.1"]
    assert trainer.units == {"crosscoder": Unit(("encoder.layer.1", "model_b:encoder.layer.1"))}
    assert trainer.saes["crosscoder"].config.n_sites == 2
    # one chunk holds both models' outputs on the same tokens (the same model twice: equal, below)
    chunk = trainer.activations.next_chunk()
    first, second = chunk["encoder.layer.1"], chunk["model_b:encoder.layer.1"]
    assert first.shape == second.shape and not torch.equal(first, second)
    result = trainer.train()
    assert set(result.metrics) == {"crosscoder", "crosscoder/site0", "crosscoder/site1"}
    for site in ("site0", "site1"):
        assert 0 < result.metrics[f"crosscoder/{site}"]["explained_variance"] <= 1
    saved = flashsae.load(result.sae_paths["crosscoder"])
    assert saved.metadata.get("model_b") == str(perturbed_bert)


def test_the_same_model_twice_gives_equal_sites(tmp_path, text):
    trainer = Trainer(diff_config(tmp_path, "same", text, tiny_bert()))
    chunk = trainer.activations.next_chunk()
    assert torch.equal(chunk["encoder.layer.1"], chunk["model_b:encoder.layer.1"])


def test_what_model_b_refuses(tmp_path, text):
    with pytest.raises(ValueError, match="model_b: .*tokenizer differs"):
        Trainer(diff_config(tmp_path, "tok", text, tiny_gpt2()))
    with pytest.raises(ValueError, match="model_b: a second model is read by architecture crosscoder"):
        TrainConfig(model=str(tiny_bert()), model_b=str(tiny_bert()), architecture="topk")
    with pytest.raises(ValueError, match="model_b: --activations"):
        TrainConfig(model_b=str(tiny_bert()), architecture="crosscoder", activations=str(tmp_path))


def test_flashsae_train_with_model_b_prints_per_site_metrics(tmp_path, text, perturbed_bert, capsys):
    from flashsae.cli import main
    from test_train_cli import tiny_flags

    flags = tiny_flags(text, tmp_path / "cli", "--architecture", "crosscoder", "--model-b", str(perturbed_bert))
    assert main(["train", *flags, "--train-tokens", "256"]) == 0
    printed = capsys.readouterr().out
    assert f"{tiny_bert()} + {perturbed_bert} -> encoder.layer.1, model_b:encoder.layer.1 (Crosscoder" in printed
    for site in ("crosscoder/site0", "crosscoder/site1"):
        assert f"{site}: explained variance" in printed
    assert "crosscoder: explained variance" in printed and "dead" in printed.split("crosscoder: explained")[1]
