"""flashsae with the real SAELens (skipped without sae_lens; `make test-integrations` runs it):
in-memory conversion both ways, and the "flashsae_topk" training architecture (SAELens' registry,
its trainer) against SAELens' own TopK: same losses and gradients, same training."""

from __future__ import annotations

import pytest
import torch

import flashsae
from flashsae import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

sae_lens = pytest.importorskip("sae_lens")
fs_saelens = pytest.importorskip("flashsae.integrations.saelens")

from sae_lens.saes.sae import TrainingSAE, TrainStepInput  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402

fs_saelens.register()  # "flashsae_topk" in SAELens' registry before SAELens builds it by name

D, N, K = 24, 96, 5


def random_saelens(architecture: str, **fields) -> object:
    """A SAELens inference SAE with random weights (every parameter, thresholds positive)."""
    sae = sae_lens.SAE.from_dict({"architecture": architecture, "d_in": D, "d_sae": N, **fields})
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            values = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3
            parameter.copy_(values.abs() * 0.5 if name == "threshold" else values)
    return sae


def inputs(rows: int = 40) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(3)) * 1.3 + 0.1


SAELENS_CASES = {
    "standard": ("standard", {}),
    "topk": ("topk", {"k": K}),
    "topk-rescaled": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    "jumprelu": ("jumprelu", {}),
    "gated": ("gated", {}),
    "standard-no-b-dec": ("standard", {"apply_b_dec_to_input": False}),
}


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_from_saelens_computes_what_saelens_computes(case):
    architecture, fields = SAELENS_CASES[case]
    theirs = random_saelens(architecture, **fields)
    ours = fs_saelens.from_saelens(theirs)
    assert ours.d_in == D and ours.n_latents == N and ours.metadata["source_format"] == "saelens"
    x = inputs()
    with torch.no_grad():
        expected_acts = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x).to_dense(N), expected_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), rtol=1e-5, atol=1e-5)


FLASHSAE_CASES = {
    "topk": lambda: TopKSAE(D, N, K),
    "relu": lambda: ReLUSAE(D, N),
    "jumprelu": lambda: JumpReLUSAE(D, N),
    "gated": lambda: GatedSAE(D, N),
}


@pytest.mark.parametrize("case", list(FLASHSAE_CASES))
def test_to_saelens_and_back(case):
    torch.manual_seed(5)
    ours = FLASHSAE_CASES[case]()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs = fs_saelens.to_saelens(ours)
    assert isinstance(theirs, sae_lens.SAE)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x).x_hat, rtol=1e-5, atol=1e-5)
        back = fs_saelens.from_saelens(theirs)
        torch.testing.assert_close(back(x).x_hat, ours(x).x_hat, rtol=1e-5, atol=1e-5)


def test_conversion_checks_its_arguments():
    with pytest.raises(TypeError, match="sae"):
        fs_saelens.from_saelens(TopKSAE(D, N, K))
    with pytest.raises(TypeError, match="sae"):
        fs_saelens.to_saelens(random_saelens("topk", k=K))
    with pytest.raises(flashsae.FormatError, match="architecture"):
        fs_saelens.to_saelens(flashsae.Transcoder(D, N, K))


# ------------------------------------------------------------------------------------- training


def training_pair(dtype: str = "float64", **fields):
    """(SAELens' TopK training SAE, flashsae_topk) with the same weights, trained a little so
    that decoder norms differ from 1 (rescale_acts_by_decoder_norm matters)."""
    config = {"d_in": D, "d_sae": N, "k": K, "dtype": dtype, **fields}
    torch.manual_seed(0)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(**config))
    torch.manual_seed(0)
    ours = TrainingSAE.from_dict({"architecture": "flashsae_topk", **config})
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            parameter.mul_(1 + 0.3 * torch.rand_like(parameter)).add_(0.02 * torch.randn_like(parameter))
            getattr(ours, name).copy_(parameter)
    return theirs, ours


def test_registered_in_saelens_registry_with_saelens_init():
    from sae_lens.registry import get_sae_training_class

    cls, config_cls = get_sae_training_class("flashsae_topk")
    assert fs_saelens.register() == (cls, config_cls)  # idempotent
    assert cls is fs_saelens.FlashTopKTrainingSAE and config_cls is fs_saelens.FlashTopKTrainingSAEConfig
    torch.manual_seed(1)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K))
    torch.manual_seed(1)
    ours = TrainingSAE.from_dict({"architecture": "flashsae_topk", "d_in": D, "d_sae": N, "k": K})
    assert type(ours) is cls
    for name, parameter in theirs.named_parameters():
        assert torch.equal(getattr(ours, name), parameter), name
    assert ours.W_enc.T.is_contiguous()  # topk_encode's layout, no copy per step
    with pytest.raises(ValueError, match="normalize_activations"):
        config_cls(d_in=D, d_sae=N, k=K, normalize_activations="layer_norm")


def test_a_saelens_runner_config_builds_it():
    """What LanguageModelSAERunner does with its config's sae (through JSON, as a checkpoint holds
    it) builds the flashsae-backed SAE."""
    import json

    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.saes.sae import TrainingSAEConfig

    sae_config = fs_saelens.FlashTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)
    runner_config = LanguageModelSAERunnerConfig(
        sae=sae_config, model_name="tiny", hook_name="blocks.0.hook_resid_post", training_tokens=1000
    )
    saved = json.loads(json.dumps(runner_config.get_training_sae_cfg_dict()))
    assert saved["architecture"] == "flashsae_topk"
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(saved).to_dict())
    assert type(sae) is fs_saelens.FlashTopKTrainingSAE and sae.cfg.k == K


def step(sae, x, dead):
    sae.zero_grad()
    output = sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    )
    output.loss.backward()
    return output, {name: parameter.grad.clone() for name, parameter in sae.named_parameters()}


DEAD = {
    "none-dead": lambda: None,
    "no-dead": lambda: torch.zeros(N, dtype=torch.bool),
    "few-dead": lambda: torch.arange(N) % 17 == 0,  # 6 dead < d_in / 2: scale 6 / 12
    "many-dead": lambda: torch.arange(N) % 3 != 0,  # 64 dead > d_in / 2
}


@pytest.mark.parametrize("dead", list(DEAD))
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_same_losses_and_gradients_as_saelens_topk(dead, rescale, apply_b_dec, dtype):
    theirs, ours = training_pair(dtype, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec)
    x = inputs(64).to(getattr(torch, dtype))
    mask = DEAD[dead]()
    expected, expected_grads = step(theirs, x, mask)
    got, grads = step(ours, x, mask)
    tolerance = {"rtol": 1e-9, "atol": 1e-9} if dtype == "float64" else {"rtol": 2e-4, "atol": 2e-5}
    assert got.losses.keys() == expected.losses.keys()
    for name, loss in expected.losses.items():
        torch.testing.assert_close(got.losses[name], loss, **tolerance, msg=name)
    if mask is not None and mask.any():
        assert expected.losses["auxiliary_reconstruction_loss"] > 0
    torch.testing.assert_close(got.loss, expected.loss, **tolerance)
    torch.testing.assert_close(got.sae_out, expected.sae_out, **tolerance)
    torch.testing.assert_close(got.feature_acts.to_dense(), expected.feature_acts, **tolerance)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **tolerance, msg=name)


@pytest.mark.parametrize("rescale", [True, False])
def test_a_flashsae_topk_training_sae_converts(rescale):
    _, ours = training_pair("float64", rescale_acts_by_decoder_norm=rescale)
    converted = fs_saelens.from_saelens(ours)
    assert converted.architecture == "topk" and converted.dtype == torch.float64
    x = inputs().double()
    with torch.no_grad():
        torch.testing.assert_close(converted(x).x_hat, ours(x), rtol=1e-9, atol=1e-9)


def test_under_saelens_autocast():
    """SAETrainer(autocast=True) runs the step under bfloat16 autocast: the losses still agree to
    bfloat16's precision and the gradients stay float32, as SAELens' own."""
    theirs, ours = training_pair("float32")
    x = inputs(64)
    mask = DEAD["few-dead"]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = step(theirs, x, mask)
        got, grads = step(ours, x, mask)
    for name, loss in expected.losses.items():
        torch.testing.assert_close(got.losses[name], loss, rtol=2e-2, atol=1e-3, msg=name)
    for name, grad in expected_grads.items():
        assert grads[name].dtype == grad.dtype == torch.float32, name


def test_encode_is_saelens_encode():
    theirs, ours = training_pair("float32")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_saelens_trainer_trains_it_like_saelens_topk(tmp_path):
    """SAELens' SAETrainer, unchanged, on the same activations: the flashsae_topk SAE follows the
    TopK SAE's trajectory, and what it saves is a plain SAELens topk SAE."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    batches = [inputs(32) + 0.05 * i for i in range(6)]
    trained = {}
    for architecture in ("topk", "flashsae_topk"):
        torch.manual_seed(2)
        sae = TrainingSAE.from_dict({"architecture": architecture, "d_in": D, "d_sae": N, "k": K, "dtype": "float64"})
        config = SAETrainerConfig(total_training_samples=6 * 32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3,
                                  dead_feature_window=2)  # fmt: skip
        trainer = SAETrainer(config, sae, iter([b.double() for b in batches]))
        trained[architecture] = trainer.fit()
        assert trainer.n_training_steps == 6
    for name, parameter in trained["topk"].named_parameters():
        torch.testing.assert_close(getattr(trained["flashsae_topk"], name), parameter, rtol=1e-7, atol=1e-9)
    trained["flashsae_topk"].save_inference_model(tmp_path / "saved")
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "saved"))
    assert loaded.cfg.architecture() == "topk"
    ours = flashsae.load(tmp_path / "saved")
    x = inputs().double()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).x_hat, trained["topk"](x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(loaded(x), trained["topk"](x), rtol=1e-9, atol=1e-9)
