"""L0Controller and target_l0 in JumpReLU, ReLU and Gated: the controller's arithmetic, the
first-batch start at the target, the state in buffers (save / load / resume exactly)."""

import math

import pytest
import torch

import flashsae
from flashsae.modules.l0_controller import (
    COEFFICIENT_GAIN,
    FAST_GAIN,
    MAX_DECADES,
    L0Controller,
    bias_shift,
    lower_biases_,
    step_initial_coefficient,
    uniform_cut,
)
from sae_helpers import one_thread  # noqa: F401 - a fixture the tests request by name

PENALIZED = ["jumprelu", "relu", "gated"]


def test_update_integrates_the_clamped_shift():
    controller = L0Controller(9.0)
    controller.start(2.0, data_scale=0.5)
    assert float(controller.coefficient()) == pytest.approx(2.0) and float(controller.data_scale) == 0.5
    expected = math.log(2.0)
    for shift in (0.3, -0.2, 5.0, -7.0):
        controller.update(torch.tensor(shift, dtype=torch.float64))
        expected += COEFFICIENT_GAIN * max(-1.0, min(1.0, shift))
        assert float(controller.log_coefficient) == pytest.approx(expected, rel=1e-12)
        assert float(controller.take_shift()) == pytest.approx(FAST_GAIN * shift, rel=1e-12)
        assert float(controller.pending_shift) == 0.0


def test_anti_windup_clamps_the_coefficient():
    controller = L0Controller(4.0)
    controller.start(1.0, data_scale=1.0)
    top = MAX_DECADES * math.log(10)
    for _ in range(int(top / COEFFICIENT_GAIN) + 50):
        controller.update(torch.tensor(3.0))
    assert float(controller.log_coefficient) == pytest.approx(top)
    controller.update(torch.tensor(0.0))  # in balance: no further move
    assert float(controller.log_coefficient) == pytest.approx(top)
    controller.update(torch.tensor(-0.5))  # the other way: comes back at once, no wound-up integral
    assert float(controller.log_coefficient) == pytest.approx(top - 0.5 * COEFFICIENT_GAIN)


def test_bias_shift_lowers_biases_to_the_target():
    torch.manual_seed(0)
    W_enc = torch.randn(40, 6, dtype=torch.float64) * torch.rand(40, 1, dtype=torch.float64)  # rows of mixed norms
    b_enc = torch.randn(40, dtype=torch.float64)
    x = 3.0 * torch.randn(100, 6, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    shift = bias_shift(x @ W_enc.T + b_enc, W_enc, scale, 4.0)
    lower_biases_(b_enc, W_enc, shift, scale)
    assert int((x @ W_enc.T + b_enc > 0).sum()) == 400


@pytest.mark.parametrize(("rows", "n", "target"), [(37, 50, 3.0), (128, 300, 17.5)])
def test_uniform_cut_gives_the_target(rows, n, target):
    pre = torch.randn(rows, n, dtype=torch.float64)
    cut = uniform_cut(pre, target)
    assert cut.dim() == 0 and int((pre > cut).sum()) == round(rows * target)


def test_step_initial_coefficient():
    assert step_initial_coefficient(0.5) == 0.25
    assert step_initial_coefficient(0.0) == 1.0


def test_gated_starts_with_a_penalty_that_holds_its_gates():
    # Gated's lambda starts at twice the mean projection of the first batch's residual on the decoder
    # rows of its open gates (shrinkage share 1.0; it stays near its start, see the constant), so
    # the penalty on a typical open gate balances the auxiliary loss's pull; the former 0.3 left
    # the controller's bias shifts fighting that pull (demo: explained variance 0.760 -> 0.847)
    torch.manual_seed(3)
    sae = flashsae.create("gated", d_in=24, n_latents=96, target_l0=6)
    x = torch.randn(512, 24) * 3 + 1
    sae.init_b_dec_(x)
    sae(x)
    with torch.no_grad():
        residual = x - sae.b_dec
        gates = residual @ sae.W_enc.T + sae.b_enc > 0  # the biases the first batch was cut with
        unit = torch.nn.functional.normalize(sae.W_dec, dim=1)
        expected = 2 * float((residual @ unit.T)[gates].mean())
    assert float(sae.l0_controller.coefficient()) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("architecture", "options", "pattern"),
    [
        ("jumprelu", {"target_l0": 0}, r"target_l0: expected a finite number > 0"),
        ("relu", {"target_l0": 64}, r"target_l0: expected a number in \(0, n_latents=64\)"),
        ("gated", {"target_l0": "3"}, r"target_l0: expected a finite number > 0"),
        ("jumprelu", {"target_l0": 3, "bandwidth": 0}, r"bandwidth: expected a finite number > 0"),
    ],
)
def test_bad_target_configs(architecture, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashsae.create(architecture, d_in=8, n_latents=64, **options)


def test_jumprelu_bandwidth_defaults_follow_the_mode():
    assert flashsae.create("jumprelu", d_in=8, n_latents=64).config.bandwidth == 0.001
    assert flashsae.create("jumprelu", d_in=8, n_latents=64, target_l0=4).config.bandwidth == 0.1
    assert flashsae.create("jumprelu", d_in=8, n_latents=64, target_l0=4, bandwidth=0.3).config.bandwidth == 0.3


@pytest.mark.parametrize("architecture", PENALIZED)
def test_without_a_target_there_is_no_controller(architecture):
    sae = flashsae.create(architecture, d_in=8, n_latents=64)
    assert not any(key.startswith("l0_controller") for key in sae.state_dict())


def unnormalized(rows, d, seed):
    """Activations far from unit scale with a large mean, as a model's raw activations are."""
    generator = torch.Generator().manual_seed(seed)
    return 40.0 + 25.0 * torch.randn(rows, d, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("architecture", PENALIZED)
def test_first_training_batch_starts_at_the_target(architecture):
    torch.manual_seed(0)
    sae = flashsae.create(architecture, d_in=24, n_latents=96, target_l0=5, dtype=torch.float64)
    x = unnormalized(200, 24, seed=1)
    sae.init_b_dec_(x)
    out = sae(x)
    l0 = (out.latents.indices >= 0).sum(-1).double().mean()
    assert float(l0) == pytest.approx(5.0, abs=0.01)
    assert bool(sae.l0_controller.started) and float(sae.l0_controller.coefficient()) > 0
    residual = (x - sae.b_dec).detach()
    assert float(sae.l0_controller.data_scale) == pytest.approx(float(residual.pow(2).mean().sqrt()), rel=1e-9)


def train_steps(sae, batches):
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for x in batches:
        out = sae(x)
        out.loss.backward()
        if sae.unit_norm_decoder:
            sae.remove_decoder_parallel_grads_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sae.unit_norm_decoder:
            sae.normalize_decoder_()
    return optimizer


@pytest.mark.parametrize("architecture", PENALIZED)
def test_controller_state_saves_and_resumes_exactly(architecture, tmp_path, one_thread):
    """Training 8 steps equals training 4, saving, loading and training 4 more (the optimizer state
    carried over by hand): every parameter and buffer, the controller's included, is identical."""
    batches = [unnormalized(64, 16, seed=s) for s in range(8)]
    torch.manual_seed(3)
    straight = flashsae.create(architecture, d_in=16, n_latents=48, target_l0=4, dtype=torch.float64)
    straight.init_b_dec_(batches[0])
    torch.manual_seed(3)
    halves = flashsae.create(architecture, d_in=16, n_latents=48, target_l0=4, dtype=torch.float64)
    halves.init_b_dec_(batches[0])
    train_steps(straight, batches)
    optimizer = train_steps(halves, batches[:4])
    halves.save(tmp_path / "sae")
    resumed = flashsae.load(tmp_path / "sae")
    assert bool(resumed.l0_controller.started)
    moved = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    moved.load_state_dict(optimizer.state_dict())
    for x in batches[4:]:
        out = resumed(x)
        out.loss.backward()
        if resumed.unit_norm_decoder:
            resumed.remove_decoder_parallel_grads_()
        moved.step()
        moved.zero_grad(set_to_none=True)
        if resumed.unit_norm_decoder:
            resumed.normalize_decoder_()
    expected, got = straight.state_dict(), resumed.state_dict()
    assert set(expected) == set(got)
    assert float(straight.l0_controller.log_coefficient) != float(straight.l0_controller.log_initial)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
