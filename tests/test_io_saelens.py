"""SAELens files (v6 and pre-6 cfg.json + sae_weights.safetensors [+ sparsity.safetensors]): loaded
SAEs match SAELens' forward (float64 reference), round trips, and clear errors."""

import json

import pytest
import torch

import flashsae
from flashsae import BatchTopKSAE, FormatError, GatedSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE, Transcoder
from flashsae.io import saelens
from flashsae.io._common import read_safetensors
from io_helpers import (
    assert_matches,
    saelens_reference,
    saelens_v6_cfg,
    saelens_weights,
    separated_rows,
    write_saelens,
)

D, N, K = 37, 300, 7

CASES = {
    "standard": ("standard", {}, ReLUSAE),
    "standard-no-b-dec": ("standard", {"apply_b_dec_to_input": False}, ReLUSAE),
    "topk": ("topk", {"k": K, "rescale_acts_by_decoder_norm": False}, TopKSAE),
    "topk-k1": ("topk", {"k": 1}, TopKSAE),
    "topk-rescaled": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}, TopKSAE),
    "topk-layer-norm": ("topk", {"k": K, "normalize_activations": "layer_norm"}, TopKSAE),
    "topk-constant-norm": ("topk", {"k": K, "normalize_activations": "constant_norm_rescale"}, TopKSAE),
    "topk-expected-average": ("topk", {"k": K, "normalize_activations": "expected_average_only_in"}, TopKSAE),
    "jumprelu": ("jumprelu", {"apply_b_dec_to_input": False}, JumpReLUSAE),
    "jumprelu-b-dec": ("jumprelu", {}, JumpReLUSAE),
    "gated": ("gated", {}, GatedSAE),
    "gated-no-b-dec": ("gated", {"apply_b_dec_to_input": False}, GatedSAE),
}


def make_x(rows):
    return torch.randn(rows, D) * 1.5 + 0.2


@pytest.mark.parametrize("case", list(CASES))
def test_v6_matches_saelens_forward(tmp_path, case):
    arch, fields, cls = CASES[case]
    cfg = saelens_v6_cfg(arch, D, N, **fields)
    weights = saelens_weights(arch, D, N)
    write_saelens(tmp_path / "sae", cfg, weights)
    sae = flashsae.load(tmp_path / "sae")
    assert type(sae) is cls and sae.dtype == torch.float32 and (sae.d_in, sae.n_latents) == (D, N)
    assert sae.metadata["model"] == "gpt2" and sae.metadata["hookpoint"] == "blocks.3.hook_resid_pre"
    assert sae.metadata["source_format"] == "saelens" and sae.metadata["saelens_config"] == cfg
    x = separated_rows(lambda x: saelens_reference(cfg, weights, x), make_x, 40)
    assert_matches(sae, saelens_reference(cfg, weights, x), x, what=case)


def test_jumprelu_thresholds_load_exactly_in_bfloat16(tmp_path):
    cfg = saelens_v6_cfg("jumprelu", D, N, dtype="bfloat16", apply_b_dec_to_input=False)
    weights = saelens_weights("jumprelu", D, N, dtype=torch.bfloat16)
    weights["threshold"][:5] = torch.tensor([-0.5, 0.0, 1e-3, 0.3, 7.0])
    write_saelens(tmp_path / "sae", cfg, weights)
    sae = flashsae.load(tmp_path / "sae")
    assert sae.dtype == torch.bfloat16 and sae.config.threshold_parametrization == "direct"
    # the stored thresholds themselves (a log parametrization would move them by up to 3% in bfloat16);
    # negative ones gate like 0 after SAELens' relu
    assert torch.equal(sae.threshold, weights["threshold"].clamp_min(0))
    sae.save(tmp_path / "back", format="saelens")
    written = read_safetensors(tmp_path / "back" / "sae_weights.safetensors")
    assert torch.equal(written["threshold"], sae.threshold)


def test_pre6_configs(tmp_path):
    """SAELens <= 5 configs: hook_point, activation_fn_str + activation_fn_kwargs, dtype "torch.float32",
    a bool normalize_activations, no sae_lens_version; finetuning scaling_factor folded into W_dec."""
    weights = saelens_weights("topk", D, N)
    old = {
        "d_in": D, "d_sae": N, "dtype": "torch.float32", "device": "cuda", "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8, "hook_point_head_index": None,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": True, "normalize_activations": False, "context_size": 128,
    }  # fmt: skip
    weights["scaling_factor"] = 0.5 + torch.rand(N)
    write_saelens(tmp_path / "old", old, weights)
    sae = flashsae.load(tmp_path / "old")
    assert isinstance(sae, TopKSAE) and sae.k == K
    assert sae.metadata["hookpoint"] == "blocks.8.hook_resid_pre" and sae.metadata["model"] == "gpt2-small"
    v6 = {"architecture": "topk", "d_in": D, "k": K, "apply_b_dec_to_input": True}
    x = separated_rows(lambda x: saelens_reference(v6, weights, x), make_x, 40)
    assert_matches(sae, saelens_reference(v6, weights, x), x, what="pre-6 topk")

    # a relu SAE from SAELens 2-3 (no architecture, d_sae from expansion_factor); scaling_factor of ones
    relu = saelens_weights("standard", D, 2 * D)
    relu["scaling_factor"] = torch.ones(2 * D)
    old = {"d_in": D, "expansion_factor": 2, "dtype": "float32", "hook_point": "blocks.0.hook_resid_pre"}
    write_saelens(tmp_path / "older", old, relu)
    sae = flashsae.load(tmp_path / "older")
    assert isinstance(sae, ReLUSAE) and sae.n_latents == 2 * D and sae.config.apply_b_dec_to_input
    x = make_x(20)
    ref = saelens_reference({"architecture": "standard", "d_in": D}, relu, x)
    assert_matches(sae, ref, x, what="pre-6 relu")

    # activation functions without a flashsae equivalent
    write_saelens(tmp_path / "tanh", {**old, "activation_fn_str": "tanh-relu"}, relu)
    with pytest.raises(FormatError, match="activation_fn 'tanh-relu'"):
        flashsae.load(tmp_path / "tanh")
    weights["scaling_factor"] = torch.rand(N)
    write_saelens(tmp_path / "scaled", {**old, "d_sae": N, "finetuning_scaling_factor": False}, weights)
    with pytest.raises(FormatError, match="scaling_factor is present but finetuning_scaling_factor is false"):
        flashsae.load(tmp_path / "scaled")


def test_sparsity_file_round_trips(tmp_path):
    cfg = saelens_v6_cfg("standard", D, N)
    sparsity = torch.randn(N) - 3
    write_saelens(tmp_path / "sae", cfg, saelens_weights("standard", D, N), sparsity=sparsity)
    sae = flashsae.load(tmp_path / "sae")
    assert torch.equal(torch.tensor(sae.metadata["log_sparsity"], dtype=torch.float32), sparsity)
    sae.save(tmp_path / "native")  # JSON metadata, carried by the native checkpoint too
    flashsae.load(tmp_path / "native").save(tmp_path / "back", format="saelens")
    written = read_safetensors(tmp_path / "back" / "sparsity.safetensors")
    assert torch.equal(written["sparsity"], sparsity)
    assert "log_sparsity" not in json.dumps(json.loads((tmp_path / "back" / "cfg.json").read_text()))


def trained(sae):
    """Non-trivial weights and schedule state (a BatchTopK threshold estimate, step counts)."""
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * (D**-0.5 if p.dim() == 2 else 0.3))
        if isinstance(sae, JumpReLUSAE) and sae.config.threshold_parametrization == "direct":
            sae.direct_threshold.abs_()
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.2372)
        if hasattr(sae, "num_steps"):
            sae.num_steps.fill_(1234)
    sae.metadata = {"model": "EleutherAI/pythia-70m", "hookpoint": "layers.3", "trained_tokens": 10**6}
    return sae


ROUND_TRIPS = {
    "topk": lambda: TopKSAE(D, N, K, aux_k=11, auxk_alpha=0.1, multi_topk=True),
    "topk-layer-norm": lambda: TopKSAE(D, N, K, input_norm="layer_norm", apply_b_dec_to_input=False),
    "relu": lambda: ReLUSAE(D, N, l1_coefficient=3.0, apply_b_dec_to_input=True),
    "jumprelu-log": lambda: JumpReLUSAE(D, N, bandwidth=0.01, sparsity_loss="tanh"),
    "jumprelu-direct": lambda: JumpReLUSAE(D, N, threshold_parametrization="direct", apply_b_dec_to_input=True),
    "gated": lambda: GatedSAE(D, N, l1_coefficient=0.3, apply_b_dec_to_input=False),
    "batchtopk": lambda: BatchTopKSAE(D, N, K, threshold_beta=0.99, threshold_start_step=10),
    "matryoshka": lambda: MatryoshkaSAE(D, N, K, matryoshka_widths=[30, 100]),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_through_saelens(tmp_path, case):
    sae = trained(ROUND_TRIPS[case]())
    sae.save(tmp_path / "sl", format="saelens")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "EleutherAI/pythia-70m" and cfg["metadata"]["hook_name"] == "layers.3"
    weights = read_safetensors(tmp_path / "sl" / "sae_weights.safetensors")
    back = flashsae.load(tmp_path / "sl")
    # SAELens' own forward on the written files equals flashsae's forward of the original SAE
    x = separated_rows(lambda x: saelens_reference(cfg, weights, x), make_x, 30)
    assert_matches(sae, saelens_reference(cfg, weights, x), x, what=f"{case} written")
    assert_matches(back, saelens_reference(cfg, weights, x), x, what=f"{case} read back")
    expected_architecture = "jumprelu" if case.startswith("jumprelu") else sae.architecture
    assert back.architecture == expected_architecture
    # training settings, metadata and schedule state ride along (the flashsae block and sidecar)
    assert back.config == sae.config
    assert {k: back.metadata[k] for k in sae.metadata} == sae.metadata
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    if isinstance(sae, BatchTopKSAE):
        assert float(back.threshold) == float(sae.threshold) and cfg["architecture"] == "jumprelu"
        assert torch.equal(weights["threshold"], torch.full((N,), float(sae.threshold)))


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_parts_are_the_files(tmp_path, case):
    """to_parts is what save writes and from_parts is what load reads, without the files (the
    in-memory conversion to and from a loaded SAELens SAE uses them)."""
    sae = trained(ROUND_TRIPS[case]())
    sae.save(tmp_path / "sl", format="saelens")
    config, tensors, state = saelens.to_parts(sae)
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text()) == json.loads(json.dumps(config))
    written = read_safetensors(tmp_path / "sl" / "sae_weights.safetensors")
    assert written.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert not tensor.requires_grad and torch.equal(written[name], tensor), name
    from_files, from_parts = flashsae.load(tmp_path / "sl"), saelens.from_parts(config, tensors, state=state)
    assert type(from_parts) is type(from_files) and from_parts.config == from_files.config
    assert from_parts.metadata == from_files.metadata
    for name, tensor in from_files.state_dict().items():
        assert torch.equal(from_parts.state_dict()[name], tensor), name


def test_from_parts_checks_its_arguments():
    config, tensors, _ = saelens.to_parts(TopKSAE(D, N, K))
    with pytest.raises(TypeError, match="config"):
        saelens.from_parts([config], tensors)
    with pytest.raises(TypeError, match="tensors"):
        saelens.from_parts(config, list(tensors.values()))
    with pytest.raises(FormatError, match="W_dec"):
        saelens.from_parts(config, {**tensors, "W_dec": tensors["W_dec"][:-1]})


def test_edited_files_follow_the_file(tmp_path):
    """Without the sidecar, or with thresholds edited in SAELens, the file's thresholds win (direct)."""
    sae = trained(JumpReLUSAE(D, N))
    sae.save(tmp_path / "sl", format="saelens")
    (tmp_path / "sl" / saelens.STATE_NAME).unlink()
    back = flashsae.load(tmp_path / "sl")
    assert back.config.threshold_parametrization == "direct" and torch.equal(back.threshold, sae.threshold)
    assert int(back.num_steps) == 0
    sae.save(tmp_path / "sl", format="saelens")
    weights = read_safetensors(tmp_path / "sl" / "sae_weights.safetensors")
    weights["threshold"][7] += 0.25
    write_saelens(tmp_path / "sl", json.loads((tmp_path / "sl" / "cfg.json").read_text()), weights)
    back = flashsae.load(tmp_path / "sl")
    assert back.config.threshold_parametrization == "direct" and torch.equal(back.threshold, weights["threshold"])


def test_edited_batchtopk_file_loads_as_jumprelu(tmp_path):
    """A BatchTopK saved as SAELens jumprelu whose thresholds were edited per latent is a JumpReLU."""
    trained(BatchTopKSAE(D, N, K)).save(tmp_path / "sl", format="saelens")
    weights = read_safetensors(tmp_path / "sl" / "sae_weights.safetensors")
    weights["threshold"][0] = 0.9
    write_saelens(tmp_path / "sl", json.loads((tmp_path / "sl" / "cfg.json").read_text()), weights)
    assert isinstance(flashsae.load(tmp_path / "sl"), JumpReLUSAE)


def test_passive_normalization_and_hook_z_are_written_back(tmp_path):
    cfg = saelens_v6_cfg("topk", D, N, k=K, normalize_activations="expected_average_only_in")
    cfg["reshape_activations"] = "hook_z"
    write_saelens(tmp_path / "sae", cfg, saelens_weights("topk", D, N))
    sae = flashsae.load(tmp_path / "sae")
    assert sae.config.input_norm == "none"  # SAELens' forward does not apply it once saved
    sae.save(tmp_path / "back", format="saelens")
    written = json.loads((tmp_path / "back" / "cfg.json").read_text())
    assert written["normalize_activations"] == "expected_average_only_in" and written["reshape_activations"] == "hook_z"
    assert written["metadata"]["context_size"] == 128  # bookkeeping fields of the original config survive


def test_save_refuses_what_saelens_cannot_express(tmp_path):
    with pytest.raises(FormatError, match="architecture: SAELens has no 'transcoder'"):
        Transcoder(D, N, K).save(tmp_path / "t", format="saelens")
    with pytest.raises(FormatError, match="threshold: this batchtopk SAE has no inference threshold yet"):
        BatchTopKSAE(D, N, K).save(tmp_path / "b", format="saelens")
    jump = JumpReLUSAE(D, N, threshold_parametrization="direct")
    with torch.no_grad():
        jump.direct_threshold[3] = -0.1
    with pytest.raises(FormatError, match="threshold: SAELens gates relu"):
        jump.save(tmp_path / "j", format="saelens")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed save left files behind"


def test_load_errors_name_the_problem(tmp_path):
    cfg = saelens_v6_cfg("topk", D, N, k=K)
    weights = saelens_weights("topk", D, N)
    write_saelens(tmp_path / "sae", {**cfg, "architecture": "temporal"}, weights)
    with pytest.raises(FormatError, match="unknown architecture 'temporal'"):
        flashsae.load(tmp_path / "sae")
    write_saelens(tmp_path / "sae", cfg, {k: v for k, v in weights.items() if k != "b_enc"})
    with pytest.raises(FormatError, match="missing tensor 'b_enc'"):
        flashsae.load(tmp_path / "sae")
    write_saelens(tmp_path / "sae", cfg, {**weights, "W_enc": weights["W_enc"].T.contiguous()})
    with pytest.raises(FormatError, match=r"'W_enc' has shape \[300, 37\], expected \[37, 300\]"):
        flashsae.load(tmp_path / "sae")
    write_saelens(tmp_path / "sae", cfg, {**weights, "extra": torch.ones(3)})
    with pytest.raises(FormatError, match=r"unexpected entries \['extra'\]"):
        flashsae.load(tmp_path / "sae")
    write_saelens(tmp_path / "sae", {**cfg, "k": N + 1}, weights)
    with pytest.raises(FormatError, match="k=301 exceeds d_sae=300"):
        flashsae.load(tmp_path / "sae")
    jump = saelens_v6_cfg("jumprelu", D, N, normalize_activations="layer_norm")
    write_saelens(tmp_path / "sae", jump, saelens_weights("jumprelu", D, N))
    with pytest.raises(FormatError, match="normalize_activations='layer_norm' is supported for topk SAEs only"):
        flashsae.load(tmp_path / "sae")
    write_saelens(tmp_path / "sae", cfg, weights)
    raw = (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match="is not a complete safetensors file"):
        flashsae.load(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match="is not valid JSON"):
        flashsae.load(tmp_path / "sae")
    weights["W_dec"][0] = 0
    write_saelens(tmp_path / "sae", {**cfg, "rescale_acts_by_decoder_norm": True}, weights)
    with pytest.raises(FormatError, match=r"rescale_acts_by_decoder_norm: latents \[0\] have a zero decoder row"):
        flashsae.load(tmp_path / "sae")
    weights["W_dec"][0] = float("nan")
    write_saelens(tmp_path / "sae", cfg, weights)
    with pytest.raises(FormatError, match="W_dec holds NaN or Inf"):
        flashsae.load(tmp_path / "sae")


def test_with_the_real_library(tmp_path):
    """Optional: SAELens itself reads what flashsae writes and vice versa (skipped without sae_lens)."""
    sae_lens = pytest.importorskip("sae_lens")
    ours = trained(TopKSAE(D, N, K))
    ours.save(tmp_path / "ours", format="saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    x = make_x(30)
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x).x_hat, rtol=1e-5, atol=1e-5)
    theirs.save_model(str(tmp_path / "theirs"))
    again = flashsae.load(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(x).x_hat, ours(x).x_hat, rtol=1e-5, atol=1e-5)
