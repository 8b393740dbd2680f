"""lm-saes (W_E / W_D / b_E / b_D, config.json) and Llama Scope (hyperparams.json +
checkpoints/final.safetensors) SAEs match lm-saes' forward (float64 reference)."""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

import flashsae
from flashsae import FormatError, JumpReLUSAE, ReLUSAE, TopKSAE, Transcoder
from io_helpers import assert_close, assert_matches, lm_saes_reference, separated_rows

D, EXPANSION = 32, 8
N = D * EXPANSION
HOOK = "blocks.3.hook_resid_post"


def lm_cfg(**fields):
    cfg = {
        "sae_type": "sae",
        "d_model": D,
        "expansion_factor": EXPANSION,
        "use_decoder_bias": True,
        "act_fn": "relu",
        "norm_activation": "dataset-wise",
        "sparsity_include_decoder_norm": True,
        "top_k": 7,
        "jumprelu_threshold_window": 2.0,
        "hook_point_in": HOOK,
        "hook_point_out": HOOK,
        "use_glu_encoder": False,
    }
    cfg.update(fields)
    return cfg


def lm_state(cfg, norm_in=11.0, norm_out=11.0):
    state = {
        "W_E": torch.randn(D, N) * D**-0.5,
        "b_E": torch.randn(N) * 0.3,
        "W_D": torch.randn(N, D) * (0.3 + torch.rand(N, 1)) * D**-0.5,
        "b_D": torch.randn(D) * 0.1,
        f"dataset_average_activation_norm.{cfg['hook_point_in']}": torch.tensor(norm_in),
    }
    state[f"dataset_average_activation_norm.{cfg['hook_point_out']}"] = torch.tensor(norm_out)
    if cfg["act_fn"] == "jumprelu":
        state["activation_function.log_jumprelu_threshold"] = (torch.rand(N) * 0.8 + 0.05).log()
    return state


def write(path, cfg, state, weights_name="sae_weights.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if weights_name.endswith(".pt"):
        torch.save({"sae": state, "version": "2.0.0"}, path / weights_name)
    else:
        save_file(state, str(path / weights_name))


def make_x(rows):
    return torch.randn(rows, D) * 2.5


CASES = {
    "relu": (dict(act_fn="relu"), ReLUSAE),
    "relu-no-decoder-norm": (dict(act_fn="relu", sparsity_include_decoder_norm=False), ReLUSAE),
    "topk": (dict(act_fn="topk", sparsity_include_decoder_norm=False), TopKSAE),
    "topk-decoder-norm": (dict(act_fn="topk"), TopKSAE),
    "topk-token-wise": (
        dict(act_fn="topk", norm_activation="token-wise", sparsity_include_decoder_norm=False),
        TopKSAE,
    ),
    "jumprelu": (dict(act_fn="jumprelu", sparsity_include_decoder_norm=False), JumpReLUSAE),
    "jumprelu-decoder-norm": (dict(act_fn="jumprelu"), JumpReLUSAE),
    "jumprelu-inference": (dict(act_fn="jumprelu", norm_activation="inference"), JumpReLUSAE),
    "relu-pre-encoder-bias": (dict(act_fn="relu", apply_decoder_bias_to_pre_encoder=True), ReLUSAE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_lm_saes_forward(tmp_path, case):
    fields, cls = CASES[case]
    cfg = lm_cfg(**fields)
    state = lm_state(cfg)
    write(tmp_path / "sae", cfg, state, "sae_weights.pt" if case == "relu" else "sae_weights.safetensors")
    sae = flashsae.load(tmp_path / "sae")
    assert type(sae) is cls and (sae.d_in, sae.n_latents) == (D, N) and sae.metadata["hookpoint"] == HOOK
    if cls is JumpReLUSAE:  # lm-saes learns log thresholds: the same parametrization, loaded exactly
        assert sae.config.threshold_parametrization == "log"
        assert torch.equal(sae.log_threshold, state["activation_function.log_jumprelu_threshold"])
    x = separated_rows(lambda x: lm_saes_reference(cfg, state, x), make_x, 40)
    ref = lm_saes_reference(cfg, state, x)
    if cfg["sparsity_include_decoder_norm"] and cfg["act_fn"] != "relu":
        # folded: the same active latents and x_hat; latent values in unit-decoder-norm units
        ref = ref._replace(latents=ref.latents * state["W_D"].double().norm(dim=1))
    assert_matches(sae, ref, x, what=case)


def test_llama_scope_release_layout(tmp_path):
    """hyperparams.json + checkpoints/final.safetensors (encoder/decoder nn.Linear names), a scalar
    jump_relu_threshold and the in / out dataset norms in the hyperparameters."""
    folder = tmp_path / "Llama3_1-8B-Base-L15R-8x"
    hyper = {
        "d_model": D, "d_sae": N, "act_fn": "jumprelu", "jump_relu_threshold": 0.2021484375, "top_k": 50,
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 6.3125, "out": 6.3125},
        "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": False,
    }  # fmt: skip
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    weights = {
        "encoder.weight": torch.randn(N, D) * D**-0.5,
        "encoder.bias": torch.randn(N) * 0.3,
        "decoder.weight": torch.randn(D, N) * D**-0.5,
        "decoder.bias": torch.randn(D) * 0.1,
    }
    save_file(weights, str(folder / "checkpoints" / "final.safetensors"))
    sae = flashsae.load(folder)
    assert isinstance(sae, JumpReLUSAE) and sae.config.threshold_parametrization == "direct"
    assert torch.equal(sae.threshold, torch.full((N,), 0.2021484375))
    assert sae.metadata["source_format"] == "lm_saes" and sae.metadata["hookpoint"] == "blocks.15.hook_resid_post"
    cfg = {**hyper}
    state = {
        "W_E": weights["encoder.weight"].T,
        "b_E": weights["encoder.bias"],
        "W_D": weights["decoder.weight"].T,
        "b_D": weights["decoder.bias"],
        "activation_function.log_jumprelu_threshold": torch.full((N,), math.log(0.2021484375), dtype=torch.float64),
        "dataset_average_activation_norm.blocks.15.hook_resid_post": torch.tensor(6.3125),
    }
    x = separated_rows(lambda x: lm_saes_reference(cfg, state, x), lambda r: torch.randn(r, D) * 1.2, 40)
    assert_matches(sae, lm_saes_reference(cfg, state, x), x, what="llama scope")


def test_topk_transcoder(tmp_path):
    cfg = lm_cfg(act_fn="topk", hook_point_out="blocks.3.hook_mlp_out", sparsity_include_decoder_norm=False)
    state = lm_state(cfg, norm_in=9.0, norm_out=2.5)
    write(tmp_path / "tc", cfg, state)
    tc = flashsae.load(tmp_path / "tc")
    assert isinstance(tc, Transcoder) and tc.metadata["hookpoint_out"] == "blocks.3.hook_mlp_out"
    x = separated_rows(lambda x: lm_saes_reference(cfg, state, x), make_x, 30)
    ref = lm_saes_reference(cfg, state, x)
    with torch.no_grad():
        latents = tc.encode(x)
        assert_close(latents.to_dense(N), ref.latents, torch.float32, "latents")
        assert_close(tc.decode(latents, x), ref.x_hat, torch.float32, "prediction")


def test_errors(tmp_path):
    for fields, pattern in [
        (dict(use_glu_encoder=True), "use_glu_encoder=true"),
        (dict(sae_type="crosscoder"), "sae_type 'crosscoder'"),
        (dict(act_fn="batchtopk"), "act_fn 'batchtopk' has no flashsae equivalent"),
        (dict(act_fn="jumprelu", norm_activation="token-wise"), "token-wise' is supported for topk SAEs only"),
        (dict(norm_activation="batch-wise"), "norm_activation 'batch-wise'"),
        (dict(hook_point_out="other", apply_decoder_bias_to_pre_encoder=True), "apply_decoder_bias_to_pre_encoder"),
    ]:
        cfg = lm_cfg(**fields)
        write(tmp_path / "sae", cfg, lm_state(cfg))
        with pytest.raises(FormatError, match=pattern):
            flashsae.load(tmp_path / "sae")
    cfg = lm_cfg()
    state = lm_state(cfg)
    del state[f"dataset_average_activation_norm.{HOOK}"]
    write(tmp_path / "sae", cfg, state)
    with pytest.raises(FormatError, match=r"no dataset_average_activation_norm for 'blocks\.3\.hook_resid_post'"):
        flashsae.load(tmp_path / "sae")
    write(tmp_path / "sae", lm_cfg(act_fn="jumprelu"), lm_state(lm_cfg()))
    with pytest.raises(FormatError, match="act_fn is jumprelu but neither"):
        flashsae.load(tmp_path / "sae")


def test_with_the_real_library(tmp_path):
    """Optional: an SAE saved by lm-saes (now llamascopium) itself (skipped without it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = pytest.importorskip("llamascopium.models.sae")
    cfg = lm.SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=D, expansion_factor=EXPANSION, act_fn="topk",
                       top_k=5, norm_activation="dataset-wise", device="cpu", dtype=torch.float32)  # fmt: skip
    theirs = lm.SparseAutoEncoder(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.set_dataset_average_activation_norm({HOOK: 7.0})
    theirs.save_pretrained(str(tmp_path))
    cfg.save_hyperparameters(str(tmp_path))
    ours = flashsae.load(tmp_path)
    x = torch.randn(20, D) * 2
    with torch.no_grad():
        normalized = theirs.normalize_activations({HOOK: x})[HOOK]
        expected = theirs.decode(theirs.encode(normalized)) / theirs.compute_norm_factor(x, HOOK)
        torch.testing.assert_close(ours(x).x_hat, expected, rtol=1e-5, atol=1e-5)
