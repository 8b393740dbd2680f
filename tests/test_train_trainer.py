"""The trainer: exact resume (2N steps == N + resume + N) from the model stream and from a disk
cache, Ctrl-C / crash / full disk, AuxK dead tracking, decoder norm, scale folding, NaN batches."""

import dataclasses
import errno
import importlib.util
import json
import math
import signal

import pytest
import torch

import flashsae
from flashsae.modules import REGISTRY, TopKSAE
from flashsae.train import (
    ActivationSourceConfig,
    CacheConfig,
    NonFiniteActivationsError,
    TrainConfig,
    Trainer,
    fold_activation_scale_,
    resume_config,
    write_cache,
)
from flashsae.train import checkpoint as checkpoint_module
from flashsae.train.sites import MULTI_SITE
from flashsae.train.checkpoint import load_training_checkpoint
from train_helpers import text, tiny_bert, tiny_train_config  # noqa: F401 - text: a fixture the tests request by name

HOOKS = ["encoder.layer.1", "encoder.layer.2"]
BATCH = 64
STEPS = 12


def small(tmp_path, name, text, **overrides):
    settings = {"hookpoints": HOOKS, "k": 8, "batch_size": BATCH, "train_tokens": BATCH * STEPS}
    settings |= {"log_every": 2, "eval_tokens": 128}
    return tiny_train_config(tmp_path, name, text, **(settings | overrides))


def interrupt_at(step):
    def on_step(trainer):
        if trainer.step == step:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does

    return on_step


def assert_same_state(a: Trainer, b: Trainer):
    assert (a.step, a.tokens) == (b.step, b.tokens)
    for name in a.hookpoints:
        for key, value in a.saes[name].state_dict().items():
            assert torch.equal(value, b.saes[name].state_dict()[key]), f"{name}.{key} differs"
        assert torch.equal(a.since_fired[name], b.since_fired[name])
        state_a, state_b = a.optimizers[name].state_dict()["state"], b.optimizers[name].state_dict()["state"]
        for index in state_a:
            for key in state_a[index]:
                assert torch.equal(state_a[index][key], state_b[index][key]), f"Adam {key} of {name} differs"
        assert a.scales[name] == b.scales[name]


def records(trainer):
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    volatile = ("elapsed_s", "tokens_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in volatile} for line in lines]


def test_resume_is_exact_from_the_model_stream(tmp_path, text):
    straight = Trainer(small(tmp_path, "straight", text))
    done = straight.train()
    assert not done.interrupted and done.step == STEPS
    assert any(bool((c >= 128).any()) for c in straight.since_fired.values()), "AuxK was active: counters matter"

    half = Trainer(small(tmp_path, "halves", text))
    stopped = half.train(on_step=interrupt_at(STEPS // 2))
    assert stopped.interrupted and stopped.step == STEPS // 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is restored"
    state, _ = load_training_checkpoint(tmp_path / "halves" / "checkpoint")
    assert state["step"] == STEPS // 2
    for name in HOOKS:  # Ctrl-C saved usable SAEs too
        assert flashsae.load(stopped.sae_paths[name]).metadata["steps"] == STEPS // 2

    resumed = Trainer(resume_config(str(tmp_path / "halves")))
    finished = resumed.train()
    assert finished.step == STEPS and not finished.interrupted
    assert_same_state(straight, resumed)
    assert records(straight) == records(resumed), "metrics.jsonl continues exactly, without duplicates"
    assert finished.metrics == done.metrics


def test_resume_after_a_crash_uses_the_last_checkpoint(tmp_path, text):
    straight = Trainer(small(tmp_path, "straight", text))
    straight.train()

    def crash(trainer):
        if trainer.step == 8:
            raise RuntimeError("killed")

    crashed = Trainer(small(tmp_path, "crashed", text, checkpoint_every=5))
    with pytest.raises(RuntimeError, match="killed"):
        crashed.train(on_step=crash)
    state, _ = load_training_checkpoint(tmp_path / "crashed" / "checkpoint")
    assert state["step"] == 5
    resumed = Trainer(resume_config(str(tmp_path / "crashed")))
    resumed.train()
    assert_same_state(straight, resumed)


def test_resume_is_exact_from_a_disk_cache(tmp_path, text):
    cache = tmp_path / "acts"
    source_fields = {f.name for f in dataclasses.fields(ActivationSourceConfig)}
    settings = {k: v for k, v in small(tmp_path, "unused", text).to_dict().items() if k in source_fields}
    write_cache(CacheConfig(**settings, out=str(cache), shard_tokens=100), progress=False)
    straight = Trainer(small(tmp_path, "straight", text, activations=str(cache), hookpoints=None))
    assert straight.hookpoints == HOOKS
    straight.train()
    half = Trainer(small(tmp_path, "halves", text, activations=str(cache), hookpoints=None))
    assert half.train(on_step=interrupt_at(5)).interrupted
    resumed = Trainer(resume_config(str(tmp_path / "halves")))
    resumed.train()
    assert_same_state(straight, resumed)
    metadata = flashsae.load(tmp_path / "straight" / HOOKS[0]).metadata
    assert metadata["activations"] == str(cache.resolve()) and metadata["model"] == str(tiny_bert())


def test_dead_latent_counters_drive_auxk(tmp_path, text):
    trainer = Trainer(small(tmp_path, "dead", text, hookpoints=HOOKS[:1], dead_tokens=2 * BATCH))
    sae = trainer.saes[HOOKS[0]]
    seen = []
    original = sae.forward

    def spy(x, dead_mask=None):
        out = original(x, dead_mask=dead_mask)
        seen.append((None if dead_mask is None else dead_mask.clone(), out.latents))
        return out

    sae.forward = spy
    before = []

    def on_step(t):
        before.append(t.since_fired[HOOKS[0]].clone())

    before.append(trainer.since_fired[HOOKS[0]].clone())
    trainer.train(on_step=on_step)
    # 12 steps, then the evaluation batches over the held-out tokens (no dead mask)
    assert trainer.evaluation["tokens"] > 0
    assert len(seen) == STEPS + -(-trainer.evaluation["tokens"] // BATCH)
    any_dead = False
    for step in range(STEPS):
        counter, (dead_mask, latents) = before[step], seen[step]
        expected_dead = counter >= 2 * BATCH
        if expected_dead.any():
            any_dead = True
            assert torch.equal(dead_mask, expected_dead)
        else:
            assert dead_mask is None, "no dead latent: AuxK is skipped"
        fired = torch.zeros_like(counter, dtype=torch.bool)
        fired[latents.indices[latents.values > 0].long()] = True
        after = before[step + 1]
        assert torch.equal(after[fired], torch.zeros_like(after[fired]))
        assert torch.equal(after[~fired], counter[~fired] + BATCH)
    assert any_dead, "the run is long enough for some latents to count as dead"
    assert seen[-1][0] is None


def test_decoder_norm_scale_folding_and_saved_sae(tmp_path, text):
    trainer = Trainer(small(tmp_path, "fold", text, hookpoints=HOOKS[:1]))
    name = HOOKS[0]
    sample = trainer.source.peek(16384)[name]
    assert math.isclose((sample * trainer.scales[name]).norm(dim=1).mean().item(), math.sqrt(32), rel_tol=1e-5)
    modes = []
    original = trainer.saes[name].forward
    trainer.saes[name].forward = lambda x, dead_mask=None: (
        modes.append(trainer.saes[name].training) or original(x, dead_mask=dead_mask)
    )
    result = trainer.train()
    sae = trainer.saes[name]
    evaluation_batches = -(-result.evaluation["tokens"] // BATCH)
    assert evaluation_batches >= 1 and result.evaluation["part"] == "eval"
    assert modes == [True] * STEPS + [False] * evaluation_batches and sae.training, "evaluation in eval mode, then back"
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents), atol=1e-5)
    saved = flashsae.load(result.sae_paths[name])
    x = trainer.source.next_batch()[name]
    with torch.no_grad():
        raw, scaled = saved(x), sae(x * trainer.scales[name])
    assert torch.equal(raw.latents.indices, scaled.latents.indices)
    torch.testing.assert_close(raw.latents.values, scaled.latents.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw.x_hat * trainer.scales[name], scaled.x_hat, rtol=1e-4, atol=1e-4)
    meta = saved.metadata
    assert meta["hookpoint"] == name and meta["activation_scale_folded"] and meta["steps"] == STEPS
    assert meta["activation_scale"] == trainer.scales[name] and meta["model"] == str(tiny_bert())
    assert meta["final_metrics"] == result.metrics[name]
    figures = result.metrics[name]
    assert 0 < figures["explained_variance"] <= 1 and figures["l0"] <= 8 and 0 <= figures["dead_pct"] <= 100
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["metrics"][name] == figures and summary["saes"][name] == str(result.sae_paths[name])
    assert summary["evaluation"] == result.evaluation
    # folding is exact algebra: fold(s) then fold(1/s) gives the weights back
    copy = flashsae.load(result.sae_paths[name])
    fold_activation_scale_(copy, 2.5)
    fold_activation_scale_(copy, 1 / 2.5)
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(copy.state_dict()[key], value)


def test_training_reduces_the_loss_with_literature_schedule(tmp_path, text):
    config = small(tmp_path, "loss", text, hookpoints=HOOKS[:1], train_tokens=BATCH * 40, log_every=4)
    trainer = Trainer(config)
    trainer.train()
    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    fvu = [line[f"{HOOKS[0]}/fvu"] for line in lines]
    assert fvu[-1] < 0.7 * fvu[0]
    for line in lines:
        assert set(line) >= {"step", "tokens", "lr", "tokens_per_s", f"{HOOKS[0]}/l0", f"{HOOKS[0]}/dead_pct"}
        assert line[f"{HOOKS[0]}/l0"] <= 8 and line["tokens"] == line["step"] * BATCH
        expected_lr = config.resolved_lr(256) * config.lr_factor(line["step"] - 1)
        assert math.isclose(line["lr"], expected_lr)
    assert math.isclose(config.resolved_lr(4 * 256), config.resolved_lr(256) / 2)  # lr ∝ 1/sqrt(n)
    factors = [config.lr_factor(step) for step in range(config.steps)]
    warmup, decay = round(0.05 * 40), round(0.2 * 40)
    assert factors[:warmup] == sorted(factors[:warmup]) and factors[warmup] == 1.0
    assert factors[-decay:] == sorted(factors[-decay:], reverse=True) and 0 < factors[-1] < 0.2
    assert all(0 < f <= 1 for f in factors)


class LooseTopK(TopKSAE):
    """A TopK SAE whose decoder rows are free (no unit norm)."""

    architecture = "loose-topk-test"
    unit_norm_decoder = False


class ConfigLooseTopK(TopKSAE):
    """Free decoder rows decided per instance (a property, as JumpReLU does with its penalty)."""

    architecture = "config-loose-topk-test"

    @property
    def unit_norm_decoder(self) -> bool:
        return self.config.k > 100


class TargetedTopK(TopKSAE):
    """Needs a target besides x, as transcoders do."""

    architecture = "targeted-topk-test"

    def forward(self, x, y, dead_mask=None):  # pragma: no cover - never called
        raise AssertionError


def test_architecture_is_pluggable_and_may_opt_out_of_unit_norm(tmp_path, text, monkeypatch):
    monkeypatch.setitem(REGISTRY, LooseTopK.architecture, LooseTopK)
    calls = {"normalize": 0, "parallel": 0}
    for method, key in (("normalize_decoder_", "normalize"), ("remove_decoder_parallel_grads_", "parallel")):
        original = getattr(TopKSAE, method)

        def spy(self, *args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TopKSAE, method, spy)
    options = {"aux_k": 5, "auxk_alpha": 0.5}
    loose = Trainer(
        small(
            tmp_path,
            "loose",
            text,
            hookpoints=HOOKS[:1],
            architecture=LooseTopK.architecture,
            sae_options=options,
            k=3,
            lr=0.05,
        )
    )
    sae = loose.saes[HOOKS[0]]
    assert type(sae) is LooseTopK and (sae.k, sae.aux_k, sae.config.auxk_alpha) == (3, 5, 0.5)
    loose.train()
    assert calls == {"normalize": 0, "parallel": 0}
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents), atol=1e-3)
    monkeypatch.setitem(REGISTRY, ConfigLooseTopK.architecture, ConfigLooseTopK)
    Trainer(
        small(tmp_path, "config-loose", text, hookpoints=HOOKS[:1], architecture=ConfigLooseTopK.architecture)
    ).train()
    assert calls == {"normalize": 0, "parallel": 0}
    Trainer(small(tmp_path, "tight", text, hookpoints=HOOKS[:1])).train()
    assert calls == {"normalize": STEPS, "parallel": STEPS}
    with pytest.raises(ValueError, match=r"architecture: unknown 'nope'; expected one of .*topk"):
        Trainer(small(tmp_path, "nope", text, architecture="nope"))
    monkeypatch.setitem(REGISTRY, TargetedTopK.architecture, TargetedTopK)
    with pytest.raises(ValueError, match=r"architecture: 'targeted-topk-test' needs y besides x in forward"):
        Trainer(small(tmp_path, "targeted", text, architecture=TargetedTopK.architecture))


def test_nonfinite_batches_are_skipped_then_abort(tmp_path, text):
    trainer = Trainer(small(tmp_path, "nan", text, max_nonfinite_batches=2))
    calls = {"n": 0}
    original = trainer.source.next_batch

    def poisoned():
        batch = original()
        calls["n"] += 1
        if calls["n"] in (3, 7):
            batch[HOOKS[1]][5, 2] = float("nan") if calls["n"] == 3 else float("inf")
        return batch

    trainer.source.next_batch = poisoned
    with pytest.warns(RuntimeWarning, match=r"skipped a batch with NaN/Inf activations \(\d so far, at most 2\)"):
        result = trainer.train()
    assert result.step == STEPS and result.skipped_batches == 2
    assert json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["skipped_batches"] == 2

    failing = Trainer(small(tmp_path, "nan2", text, max_nonfinite_batches=1))
    original2 = failing.source.next_batch

    def always_nan():
        batch = original2()
        batch[HOOKS[0]][0, 0] = float("nan")
        return batch

    failing.source.next_batch = always_nan
    with (
        pytest.warns(RuntimeWarning, match="skipped a batch"),
        pytest.raises(
            NonFiniteActivationsError, match=r"2 batches held NaN/Inf activations \(max_nonfinite_batches=1\)"
        ),
    ):
        failing.train()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, text, monkeypatch):
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def flaky_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", flaky_save)
    observed = {}

    def on_step(trainer):
        if trainer.step == 7:
            state, _ = load_training_checkpoint(trainer.run_dir / "checkpoint")
            observed["step"] = state["step"]
            observed["stale"] = [p.name for p in trainer.run_dir.iterdir() if p.name.startswith(".checkpoint")]

    trainer = Trainer(small(tmp_path, "disk", text, checkpoint_every=3))
    with pytest.warns(RuntimeWarning, match=r"checkpoint at step 6 failed .*No space left on device.*intact"):
        result = trainer.train(on_step=on_step)
    assert observed == {"step": 3, "stale": []}, "the failed save left the old checkpoint and no debris"
    assert result.step == STEPS
    assert load_training_checkpoint(tmp_path / "disk" / "checkpoint")[0]["step"] == STEPS


def test_init_from_a_saved_sae(tmp_path, text):
    first = Trainer(small(tmp_path, "first", text, hookpoints=HOOKS[:1]))
    first.train()
    again = Trainer(small(tmp_path, "again", text, hookpoints=HOOKS[:1], init_from=str(tmp_path / "first")))
    name = HOOKS[0]
    assert again.scales[name] == first.scales[name]
    for key, value in first.saes[name].state_dict().items():  # unfolded back to the training scale
        torch.testing.assert_close(again.saes[name].state_dict()[key], value, rtol=1e-5, atol=1e-6)
    wrong = TopKSAE(16, 64, 4)
    wrong.save(tmp_path / "wrong")
    with pytest.raises(ValueError, match=r"init_from: the SAE in .*wrong takes d_in=16, but hookpoint .* has width 32"):
        Trainer(small(tmp_path, "bad", text, hookpoints=HOOKS[:1], init_from=str(tmp_path / "wrong")))
    with pytest.raises(FileNotFoundError, match=r"init_from: .* holds no SAE for encoder.layer.2"):
        Trainer(small(tmp_path, "bad2", text, hookpoints=HOOKS[1:], init_from=str(tmp_path / "first")))


def test_run_directory_rules(tmp_path, text):
    Trainer(small(tmp_path, "run", text, hookpoints=HOOKS[:1], train_tokens=BATCH * 2)).train()
    with pytest.raises(FileExistsError, match=r"already holds a run; pass --resume"):
        Trainer(small(tmp_path, "run", text, hookpoints=HOOKS[:1]))
    with pytest.raises(ValueError, match=r"resume: cannot change k=4 \(run: 8\)"):
        resume_config(str(tmp_path / "run"), k=4)
    with pytest.raises(ValueError, match=r"resume: the settings differ from the checkpoint's \(k: run 8, now 4"):
        Trainer(small(tmp_path, "run", text, hookpoints=HOOKS[:1], k=4, resume=True))
    with pytest.raises(FileNotFoundError, match=r"resume: .*nothing holds no checkpoint"):
        resume_config(str(tmp_path / "nothing"))
    longer = Trainer(resume_config(str(tmp_path / "run"), train_tokens=BATCH * 4))  # extending is allowed
    assert longer.step == 2 and longer.train().step == 4


def test_wandb_needs_its_package(tmp_path, text):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    trainer = Trainer(small(tmp_path, "wandb", text, hookpoints=HOOKS[:1], wandb_project="p"))
    with pytest.raises(ImportError, match=r"wandb_project: .* needs the wandb package"):
        trainer.train()


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"batch_size": 0}, r"batch_size: expected a positive int, got 0"),
        ({"buffer_tokens": 100, "batch_size": 64}, r"buffer_tokens: expected at least 2 x batch_size = 128"),
        ({"lr": -1.0}, r"lr: expected a positive number"),
        ({"lr_warmup_fraction": 0.9, "lr_decay_fraction": 0.2}, r"fractions add up to more than 1"),
        ({"device": "tpu"}, r"device: expected one of auto, cpu, cuda"),
        ({"hookpoints": []}, r"hookpoints: expected a non-empty list"),
        ({"hookpoints": ["a", "a"]}, r"hookpoints: expected distinct"),
        ({"sae_options": {"k": 3}}, r"sae_options: set k with its own option"),
        ({"ctx_len": 2}, r"ctx_len: expected at least 4"),
        ({"k": 0}, r"k: expected a positive int"),
        ({"target_l0": 0}, r"target_l0: expected a positive int"),
        ({"k": 16, "target_l0": 32}, r"target_l0: 32 conflicts with k=16"),
        ({"sae_options": {"target_l0": 3}}, r"sae_options: set target_l0 with its own option"),
        ({"resume": True, "out": None}, r"resume: needs --out"),
        ({"autocast": "fp8"}, r"autocast: expected one of auto, bf16, off"),
        ({"seed": -1}, r"seed: expected an int >= 0"),
    ],
)
def test_bad_train_configs(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**overrides)


def test_bad_hookpoint_on_the_model(tmp_path, text):
    with pytest.raises(ValueError, match=r"hookpoints: 'encoder.layers.1' matches no module.*encoder.layer.1"):
        Trainer(small(tmp_path, "x", text, hookpoints=["encoder.layers.1"]))


@pytest.mark.parametrize("architecture", sorted(set(REGISTRY) - set(MULTI_SITE)))
def test_every_registered_architecture_trains_and_folds(tmp_path, text, architecture):
    """New architectures need no trainer change: each one trains, and its saved (folded) SAE computes
    on raw activations what the trained one computes on scaled ones."""
    name = HOOKS[0]
    # no threshold calibration: it would put a BatchTopK threshold midway between two activations of
    # the buffer's rows, the rows drawn below, where the folded weights' rounding (~1e-7) may flip one
    options = {"hookpoints": [name], "architecture": architecture, "calibration_tokens": 0}
    trainer = Trainer(small(tmp_path, architecture, text, **options))
    result = trainer.train()
    assert result.step == STEPS and set(result.metrics[name]) == {"explained_variance", "fvu", "l0", "dead_pct"}
    sae, saved, scale = trainer.saes[name], flashsae.load(result.sae_paths[name]), trainer.scales[name]
    assert type(saved) is type(sae) and saved.architecture == architecture
    x = trainer.source.next_batch()[name]
    sae.eval()
    with torch.no_grad():
        raw, scaled = saved.eval()(x), sae(x * scale)
    torch.testing.assert_close(raw.x_hat * scale, scaled.x_hat, rtol=1e-4, atol=1e-4 * scaled.x_hat.abs().max().item())


def test_resume_is_exact_with_schedule_buffers(tmp_path, text):
    """BatchTopK keeps num_steps and its threshold estimate in buffers: the checkpoint carries them."""
    options = {"architecture": "batchtopk", "hookpoints": HOOKS[:1], "sae_options": {"threshold_start_step": 3}}
    straight = Trainer(small(tmp_path, "straight", text, **options))
    straight.train()
    assert straight.saes[HOOKS[0]].threshold.item() > 0, "the threshold estimate is running"
    half = Trainer(small(tmp_path, "halves", text, **options))
    assert half.train(on_step=interrupt_at(7)).interrupted
    resumed = Trainer(resume_config(str(tmp_path / "halves")))
    resumed.train()
    assert_same_state(straight, resumed)
    assert int(resumed.saes[HOOKS[0]].num_steps) == STEPS


def test_target_l0_resolves_k_and_the_controllers_target():
    assert (TrainConfig().resolved_k(), TrainConfig().resolved_target_l0()) == (32, 32)
    assert (TrainConfig(target_l0=20).resolved_k(), TrainConfig(k=12).resolved_target_l0()) == (20, 12)
    assert TrainConfig(k=12, target_l0=12).resolved_k() == 12


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "relu", "gated"])
def test_target_l0_reaches_every_architecture(tmp_path, text, architecture):
    options = {"hookpoints": HOOKS[:1], "architecture": architecture, "k": None, "target_l0": 7}
    trainer = Trainer(small(tmp_path, architecture, text, **options))
    config = trainer.saes[HOOKS[0]].config
    assert (config.k if hasattr(config, "k") else config.target_l0) == 7


@pytest.mark.parametrize("architecture", ["jumprelu", "gated"])
def test_resume_is_exact_with_the_l0_controller(tmp_path, text, architecture):
    """The target-L0 controller's state (coefficient, pending shift, data scale) is in buffers:
    an interrupted and resumed run ends where an uninterrupted one does."""
    options = {"architecture": architecture, "hookpoints": HOOKS[:1], "k": None, "target_l0": 6}
    straight = Trainer(small(tmp_path, "straight", text, **options))
    straight.train()
    controller = straight.saes[HOOKS[0]].l0_controller
    assert bool(controller.started) and float(controller.log_coefficient) != float(controller.log_initial)
    half = Trainer(small(tmp_path, "halves", text, **options))
    assert half.train(on_step=interrupt_at(7)).interrupted
    resumed = Trainer(resume_config(str(tmp_path / "halves")))
    resumed.train()
    assert_same_state(straight, resumed)
