"""flashsae train with --optimizer sparse_adam: exact resume, and the dense trainer's result when every
latent fires (so the row-sparse plumbing — parallel-gradient removal, row renormalization, the final
flush — is the dense loop's math)."""

import signal

import pytest
import torch

from flashsae.optim import SparseAdam
from flashsae.train import TrainConfig, Trainer, resume_config
from flashsae.train.trainer import SUMMARY_FILE
from train_helpers import text, tiny_train_config  # noqa: F401 - text: a fixture the tests request by name

HOOK = "encoder.layer.1"
BATCH, STEPS = 64, 10


def config(tmp_path, name, text, **overrides):
    settings = {"hookpoints": [HOOK], "k": 4, "optimizer": "sparse_adam", "batch_size": BATCH}
    settings |= {"train_tokens": BATCH * STEPS, "log_every": 5, "eval_tokens": 64}
    return tiny_train_config(tmp_path, name, text, **(settings | overrides))


def same_state(a: Trainer, b: Trainer):
    for key, value in a.saes[HOOK].state_dict().items():
        assert torch.equal(value, b.saes[HOOK].state_dict()[key]), key
    state_a, state_b = a.optimizers[HOOK].state_dict()["state"], b.optimizers[HOOK].state_dict()["state"]
    for index in state_a:
        for key in state_a[index]:
            assert torch.equal(state_a[index][key], state_b[index][key]), f"optimizer {key} differs"
    assert torch.equal(a.since_fired[HOOK], b.since_fired[HOOK])


@pytest.mark.parametrize(
    ("state_dtype", "moments"), [("float32", "elementwise"), ("bfloat16", "elementwise"), ("float32", "row-int8")]
)
def test_resume_is_exact_with_sparse_adam(tmp_path, text, state_dtype, moments):
    settings = {"optimizer_state_dtype": state_dtype, "optimizer_moments": moments}
    straight = Trainer(config(tmp_path, "straight", text, **settings))
    assert isinstance(straight.optimizers[HOOK], SparseAdam)
    straight.train()
    first_moment = straight.optimizers[HOOK].state[straight.saes[HOOK].W_enc]["exp_avg"]
    assert first_moment.dtype == (torch.int8 if moments == "row-int8" else getattr(torch, state_dtype))

    def interrupt(trainer):
        if trainer.step == STEPS // 2:
            signal.raise_signal(signal.SIGINT)

    half = Trainer(config(tmp_path, "halves", text, **settings))
    assert half.train(on_step=interrupt).interrupted
    resumed = Trainer(resume_config(str(tmp_path / "halves")))
    resumed.train()
    same_state(straight, resumed)
    assert (tmp_path / "halves" / SUMMARY_FILE).is_file()


def test_every_latent_firing_gives_the_dense_trainers_result(tmp_path, text):
    # k = n: every row of W_enc / W_dec is touched at every step, so SparseAdam is Adam and the row
    # helpers act on every row; the two runs differ only by rounding (torch's fused Adam vs ours)
    runs = {}
    for optimizer in ("adam", "sparse_adam"):
        trainer = Trainer(config(tmp_path, optimizer, text, optimizer=optimizer, n_latents=48, k=48, eval_tokens=0))
        trainer.train()
        runs[optimizer] = trainer.saes[HOOK]
    for name, value in runs["adam"].state_dict().items():
        other = runs["sparse_adam"].state_dict()[name]
        assert torch.allclose(value, other, rtol=0, atol=2e-5 * value.abs().max().item()), name


def test_sparse_adam_trains_a_wide_sae_and_saves_it_flushed(tmp_path, text):
    trainer = Trainer(config(tmp_path, "wide", text, n_latents=2048, k=4, eval_tokens=128))
    result = trainer.train()
    optimizer = trainer.optimizers[HOOK]
    sae = trainer.saes[HOOK]
    assert (optimizer.state[sae.W_enc]["last_step"] == STEPS).all(), "flushed before evaluation and saving"
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), "decoder rows at unit norm after the flush"
    assert result.metrics[HOOK]["explained_variance"] > 0.1


def test_runs_saved_before_the_optimizer_setting_resume(tmp_path, text):
    import json

    Trainer(config(tmp_path, "old", text, optimizer="adam", train_tokens=2 * BATCH, eval_tokens=0)).train()
    state_file = tmp_path / "old" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    for name in ("optimizer", "optimizer_state_dtype", "optimizer_moments"):  # before these settings existed
        del state["config"][name]
    state_file.write_text(json.dumps(state))
    resumed = Trainer(resume_config(str(tmp_path / "old"), train_tokens=3 * BATCH))
    assert resumed.config.optimizer == "adam" and not isinstance(resumed.optimizers[HOOK], SparseAdam)
    assert resumed.train().step == 3


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match=r"optimizer: expected one of adam, sparse_adam"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"optimizer_state_dtype: bfloat16 moments need --optimizer sparse_adam"):
        TrainConfig(optimizer_state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"optimizer_moments: row-int8 moments need --optimizer sparse_adam"):
        TrainConfig(optimizer_moments="row-int8")
    with pytest.raises(ValueError, match=r"optimizer_moments: expected one of elementwise, row, row-int8"):
        TrainConfig(optimizer="sparse_adam", optimizer_moments="int4")
    with pytest.raises(ValueError, match=r"adam_beta1: sparse_adam replays skipped steps"):
        TrainConfig(optimizer="sparse_adam", adam_beta1=0.99, adam_beta2=0.95)
