"""Format detection, Hub ids (offline), forcing a format, dtype on load, the convert command, and the
module options that express foreign formats exactly (TopK input_norm / apply_b_dec_to_input, Gated
apply_b_dec_to_input, JumpReLU direct thresholds), including backward compatibility of checkpoints."""

import argparse
import json
import math
import shutil
import sys
import types

import pytest
import torch

import flashsae
from flashsae import FormatError, GatedSAE, JumpReLUSAE, TopKSAE
from flashsae.io import convert, detect_format
from helpers import assert_close
from io_helpers import layer_norm_stats, saelens_v6_cfg, saelens_weights, write_saelens, write_sparsify

D, N, K = 19, 60, 4


def sparsify_dir(path, n=N, k=K):
    cfg = {"activation": "topk", "num_latents": n, "k": k, "d_in": D, "transcode": False, "skip_connection": False}
    weights = {"encoder.weight": torch.randn(n, D), "encoder.bias": torch.randn(n), "W_dec": torch.randn(n, D),
               "b_dec": torch.randn(D)}  # fmt: skip
    write_sparsify(path, cfg, weights)


def test_detection(tmp_path):
    TopKSAE(D, N, K).save(tmp_path / "native")
    write_saelens(tmp_path / "saelens", saelens_v6_cfg("topk", D, N, k=K), saelens_weights("topk", D, N))
    sparsify_dir(tmp_path / "sparsify")
    (tmp_path / "dl").mkdir()
    torch.save({"bias": torch.zeros(D), "encoder.weight": torch.zeros(N, D), "encoder.bias": torch.zeros(N),
                "decoder.weight": torch.zeros(D, N)}, tmp_path / "dl" / "ae.pt")  # fmt: skip
    torch.save({"pre_bias": torch.zeros(D), "latent_bias": torch.zeros(N), "encoder.weight": torch.zeros(N, D),
                "decoder.weight": torch.zeros(D, N), "activation": "ReLU"}, tmp_path / "openai.pt")  # fmt: skip
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"sae_type": "sae", "d_model": D}))
    (tmp_path / "lm" / "sae_weights.safetensors").write_bytes(b"")
    expected = {
        "native": "native",
        "saelens": "saelens",
        "sparsify": "sparsify",
        "dl": "dictionary_learning",
        "openai.pt": "openai",
        "lm": "lm_saes",
        "saelens/sae_weights.safetensors": "saelens",
        "native/cfg.json": "native",
        "dl/ae.pt": "dictionary_learning",
    }
    for name, fmt in expected.items():
        assert detect_format(tmp_path / name) == fmt, name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match=r"cannot tell which SAE format .* \(entries: \['weights.bin'\]\)"):
        flashsae.load(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        flashsae.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="format: expected one of native, saelens"):
        flashsae.load(tmp_path / "native", format="safetensors")
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors does not exist"):
        flashsae.load(tmp_path / "sparsify", format="saelens")
    with pytest.raises(ValueError, match="format: flashsae writes native, saelens, sparsify"):
        TopKSAE(D, N, K).save(tmp_path / "x", format="openai")


def test_class_checks_dtype_and_device(tmp_path):
    write_saelens(tmp_path / "sae", saelens_v6_cfg("topk", D, N, k=K), saelens_weights("topk", D, N))
    sae = TopKSAE.load(tmp_path / "sae", dtype=torch.float64, device="cpu")
    assert sae.dtype == torch.float64 and sae.device.type == "cpu"
    with pytest.raises(ValueError, match="holds a 'topk' SAE, not 'jumprelu'"):
        JumpReLUSAE.load(tmp_path / "sae")
    assert flashsae.load(tmp_path / "sae", backend="torch").backend == "torch"


# ------------------------------------------------------------------------------------------ Hub


def test_hub_ids_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="needs the huggingface_hub package"):
        flashsae.load("EleutherAI/sae-pythia-70m-32k", subfolder="layers.3")
    # paths that cannot be Hub ids stay file errors
    with pytest.raises(FileNotFoundError, match="is not a directory or file"):
        flashsae.load("./runs/missing")
    with pytest.raises(FileNotFoundError, match="is not a directory or file"):
        flashsae.load(tmp_path / "missing")


def fake_hub(monkeypatch, snapshot):
    module = types.ModuleType("huggingface_hub")
    module.snapshot_download = snapshot
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_hub_ids_offline_and_online(tmp_path, monkeypatch):
    def offline(repo_id, allow_patterns=None):
        raise ConnectionError("Max retries exceeded with url: https://huggingface.co/api/models")

    fake_hub(monkeypatch, offline)
    with pytest.raises(OSError, match=r"fetching Hub repo 'org/repo' \(subfolder 'layers\.3'\) failed: .*Offline\?"):
        flashsae.load("org/repo", subfolder="layers.3")

    snapshot = tmp_path / "snapshot"
    sparsify_dir(snapshot / "layers.3")
    calls = []

    def download(repo_id, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    fake_hub(monkeypatch, download)
    sae = flashsae.load("org/repo", subfolder="layers.3")
    assert isinstance(sae, TopKSAE) and sae.metadata["hookpoint"] == "layers.3"
    assert flashsae.load("org/repo/layers.3").n_latents == N  # the subfolder inside the id
    assert calls == [("org/repo", ["layers.3/*"]), ("org/repo", ["layers.3/*"])]
    assert list(flashsae.load_many("org/repo")) == ["layers.3"]
    with pytest.raises(FileNotFoundError, match=r"Hub repo 'org/repo' has no 'layers\.9'"):
        flashsae.load("org/repo", subfolder="layers.9")


# -------------------------------------------------------------------------------------- convert


def run_cli(argv):
    """A minimal `flashsae` argparse main with only the convert command (as cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="flashsae")
    convert.add_convert_parser(parser.add_subparsers(dest="command", required=True))
    return convert.run_convert(parser.parse_args(argv))


def test_convert_command(tmp_path, capsys):
    weights = saelens_weights("jumprelu", D, N)
    write_saelens(tmp_path / "gemma", saelens_v6_cfg("jumprelu", D, N, apply_b_dec_to_input=False), weights)
    assert run_cli(["convert", str(tmp_path / "gemma"), str(tmp_path / "native"), "--to", "native"]) == 0
    assert "(jumprelu, native)" in capsys.readouterr().out
    original, native = flashsae.load(tmp_path / "gemma"), flashsae.load(tmp_path / "native")
    assert native.metadata == original.metadata and native.config == original.config
    for name, tensor in original.state_dict().items():
        assert torch.equal(native.state_dict()[name], tensor)

    run = tmp_path / "run"
    for hook in ("layers.0", "layers.1"):
        sparsify_dir(run / hook)
    assert run_cli(["convert", str(run), str(tmp_path / "out"), "--to", "saelens", "--dtype", "bfloat16"]) == 0
    converted = flashsae.load_many(tmp_path / "out")
    assert list(converted) == ["layers.0", "layers.1"]
    assert all(sae.dtype == torch.bfloat16 and sae.metadata["hookpoint"] == name for name, sae in converted.items())
    assert run_cli(["convert", str(run), str(tmp_path / "one"), "--to", "native", "--subfolder", "layers.1"]) == 0
    assert detect_format(tmp_path / "one") == "native"

    capsys.readouterr()
    assert run_cli(["convert", str(tmp_path / "gemma"), str(tmp_path / "bad"), "--to", "sparsify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashsae convert: error: architecture: sparsify stores TopK SAEs and transcoders only")
    assert not (tmp_path / "bad").exists()
    assert run_cli(["convert", str(tmp_path / "missing"), str(tmp_path / "bad"), "--to", "native"]) == 2
    with pytest.raises(SystemExit):
        run_cli(["convert", str(tmp_path / "gemma"), str(tmp_path / "bad"), "--to", "dictionary_learning"])


# ------------------------------------------------------------------------------- module options


def topk_reference(sae, x):
    """Float64 TopK forward with LN input preprocessing: (x_hat, fvu in the normalized space)."""
    p = {name: t for name, t in sae.named_parameters()}
    x_n, mu, std = layer_norm_stats(x)
    pre = (x_n - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
    top = pre.relu().topk(sae.k, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    x_hat_n = f @ p["W_dec"] + p["b_dec"]
    fvu = (x_hat_n - x_n).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    return x_hat_n * std + mu, fvu


def test_topk_input_norm_forward_and_gradients_float64():
    sae = TopKSAE(D, N, K, input_norm="layer_norm", dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    twin = TopKSAE(D, N, K, input_norm="layer_norm", dtype=torch.float64)
    twin.load_state_dict(sae.state_dict())
    x = torch.randn(33, D, dtype=torch.float64) * 3 + 1
    out = sae(x)
    x_hat, fvu = topk_reference(twin, x)
    assert_close(out.x_hat, x_hat, torch.float64, "x_hat")
    assert_close(out.fvu, fvu, torch.float64, "fvu in the normalized space")
    out.loss.backward()
    fvu.backward()  # no dead_mask: the objective is the fvu
    for (name, p), q in zip(sae.named_parameters(), twin.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float64, f"grad {name}")
    with pytest.raises(ValueError, match="x: decode needs the input x"):
        sae.decode(sae.encode(x))
    with pytest.raises(ValueError, match="input_norm: expected one of"):
        TopKSAE(D, N, K, input_norm="batch_norm")


def test_gated_without_b_dec_subtraction_float64():
    sae = GatedSAE(D, N, apply_b_dec_to_input=False, dtype=torch.float64)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(25, D, dtype=torch.float64)
    p = dict(sae.named_parameters())
    gate = x @ p["W_enc"].T + p["b_enc"]
    f = (gate > 0) * (p["r_mag"].exp() * (x @ p["W_enc"].T) + p["b_mag"]).relu()
    out = sae(x)
    assert_close(out.latents.to_dense(N), f, torch.float64, "forward latents")
    assert_close(sae.encode(x).to_dense(N), f, torch.float64, "encode latents")
    assert_close(out.x_hat, f @ p["W_dec"] + p["b_dec"], torch.float64, "x_hat")


def test_jumprelu_direct_thresholds_train_like_log_ones():
    log = JumpReLUSAE(D, N, threshold_init=0.05, bandwidth=0.5, dtype=torch.float64)
    direct = JumpReLUSAE(D, N, threshold_init=0.05, bandwidth=0.5, threshold_parametrization="direct",
                         dtype=torch.float64)  # fmt: skip
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(direct, name).copy_(getattr(log, name))
    assert {n for n, _ in direct.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec", "direct_threshold"}
    x = torch.randn(40, D, dtype=torch.float64)
    out_log, out_direct = log(x), direct(x)
    assert_close(out_direct.loss, out_log.loss, torch.float64, "loss")
    out_log.loss.backward()
    out_direct.loss.backward()
    assert direct.direct_threshold.grad.abs().max() > 0, "no latent in the window: a vacuous check"
    # d/dtheta = d/dlog(theta) / theta
    assert_close(direct.direct_threshold.grad, log.log_threshold.grad / log.threshold, torch.float64, "grad")
    with torch.no_grad():
        direct.direct_threshold[:3] = -1.0
    direct.eval()
    direct(x)  # an eval forward leaves it alone
    assert (direct.direct_threshold[:3] == -1).all()
    direct.train()
    direct(x)  # a training step projects onto >= 0 (SAELens' scheme)
    assert (direct.direct_threshold >= 0).all() and (direct.direct_threshold[:3] == 0).all()
    with pytest.raises(ValueError, match="threshold_parametrization: expected one of"):
        JumpReLUSAE(D, N, threshold_parametrization="exp")


def test_new_fields_round_trip_and_old_checkpoints_load(tmp_path):
    saes = [
        TopKSAE(D, N, K, apply_b_dec_to_input=False, input_norm="constant_norm_rescale"),
        GatedSAE(D, N, apply_b_dec_to_input=False),
        JumpReLUSAE(D, N, threshold_parametrization="direct"),
    ]
    for sae in saes:
        sae.save(tmp_path / sae.architecture)
        back = flashsae.load(tmp_path / sae.architecture)
        assert back.config == sae.config
        assert all(torch.equal(t, back.state_dict()[k]) for k, t in sae.state_dict().items())
    # a checkpoint written before these fields existed loads with the old behavior
    for sae in (TopKSAE(D, N, K), GatedSAE(D, N), JumpReLUSAE(D, N)):
        path = tmp_path / f"old-{sae.architecture}"
        sae.save(path)
        header = json.loads((path / "cfg.json").read_text())
        for name in ("apply_b_dec_to_input", "input_norm", "threshold_parametrization"):
            if sae.architecture != "jumprelu" or name != "apply_b_dec_to_input":
                header["config"].pop(name, None)
        (path / "cfg.json").write_text(json.dumps(header))
        back = flashsae.load(path)
        assert back.config == sae.config
        x = torch.randn(5, D)
        assert torch.equal(back.eval()(x).x_hat, sae.eval()(x).x_hat)


def test_constant_norm_rescale_matches_definition():
    sae = TopKSAE(D, N, K, input_norm="constant_norm_rescale", dtype=torch.float64)
    x = torch.randn(12, D, dtype=torch.float64) * 5
    coeff = math.sqrt(D) / x.norm(dim=-1, keepdim=True)
    twin = TopKSAE(D, N, K, dtype=torch.float64)
    twin.load_state_dict(sae.state_dict())
    assert_close(sae(x).x_hat, twin(x * coeff).x_hat / coeff, torch.float64, "x_hat")
    assert torch.equal(sae.encode(x).indices, twin.encode(x * coeff).indices)


def test_saves_are_atomic(tmp_path, monkeypatch):
    write_saelens(tmp_path / "sae", saelens_v6_cfg("topk", D, N, k=K), saelens_weights("topk", D, N))
    sae = flashsae.load(tmp_path / "sae")
    sae.save(tmp_path / "out", format="saelens")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    from flashsae.io import _common

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_common, "write_json", failing)  # the SAELens writer's cfg.json
    with pytest.raises(OSError, match="disk full"):
        TopKSAE(D, N, K).save(tmp_path / "out", format="saelens")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sae"]
    shutil.rmtree(tmp_path / "out")


NATIVE_OPTIONS = {
    "topk": dict(k=K, multi_topk=True, aux_k=5, input_norm="layer_norm", apply_b_dec_to_input=False),
    "batchtopk": dict(k=K, threshold_beta=0.9, threshold_start_step=3),
    "matryoshka": dict(k=K, matryoshka_widths=[10, 30]),
    "jumprelu": dict(sparsity_loss="tanh", l0_warmup_steps=100, threshold_parametrization="direct"),
    "relu": dict(l1_coefficient=2.0, l1_warmup_steps=50, apply_b_dec_to_input=True),
    "gated": dict(l1_coefficient=0.2, apply_b_dec_to_input=False),
    "transcoder": dict(k=K, d_out=11, skip=True),
    "crosscoder": dict(n_sites=2, k=K, aux_k=5),
    "clt": dict(n_layers=3, k=K, d_out=11, skip=True, activation="jumprelu", aux_k=5),
}


@pytest.mark.parametrize("architecture", sorted(flashsae.REGISTRY))
def test_native_round_trips_every_field(tmp_path, architecture):
    sae = flashsae.create(architecture, d_in=D, n_latents=N, dtype=torch.bfloat16, **NATIVE_OPTIONS[architecture])
    with torch.no_grad():
        for tensor in sae.state_dict().values():
            tensor.copy_(torch.rand_like(tensor.double()).mul(100).to(tensor.dtype))
    sae.metadata = {
        "model": "EleutherAI/pythia-70m", "hookpoint": "gpt_neox.layers.3", "activation_scale": 0.123456789,
        "activation_scale_folded": True, "trained_tokens": 123456789, "train_config": {"lr": 1e-4, "hookpoints": ["a"]},
        "final_metrics": {"fvu": 0.21, "dead_pct": 0.0},
    }  # fmt: skip
    sae.save(tmp_path / "ckpt", format="native")
    back = flashsae.load(tmp_path / "ckpt")
    assert type(back) is type(sae) and back.config == sae.config and back.metadata == sae.metadata
    assert back.dtype == torch.bfloat16 and back.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_a_training_run_converts_whole(tmp_path):
    """flashsae train's run directory (one native SAE per hookpoint, the training checkpoint and run
    files beside them) loads as a multi-hookpoint directory and converts folder by folder."""
    from flashsae.train import TrainConfig, Trainer
    from train_helpers import tiny_bert, write_text_files

    hooks = ["encoder.layer.1", "encoder.layer.2"]
    config = TrainConfig(
        model=str(tiny_bert()), hookpoints=hooks, dataset=str(write_text_files(tmp_path / "text")["jsonl"]),
        ctx_len=16, model_batch_size=4, device="cpu", k=4, batch_size=32, buffer_tokens=128, train_tokens=32 * 3,
        checkpoint_every=2, log_every=1, eval_tokens=32, progress=False, tensorboard=False, out=str(tmp_path / "run"),
    )  # fmt: skip
    result = Trainer(config).train()
    saes = flashsae.load_many(result.run_dir)
    assert list(saes) == hooks  # the checkpoint directory and run files are not SAEs
    assert run_cli(["convert", str(result.run_dir), str(tmp_path / "sparsify"), "--to", "sparsify"]) == 0
    assert run_cli(["convert", str(result.run_dir), str(tmp_path / "saelens"), "--to", "saelens"]) == 0
    x = torch.randn(16, saes[hooks[0]].d_in)
    for fmt in ("sparsify", "saelens"):
        converted = flashsae.load_many(tmp_path / fmt)
        for hook in hooks:
            assert converted[hook].metadata["hookpoint"] == hook and converted[hook].config == saes[hook].config
            with torch.no_grad():
                assert torch.equal(converted[hook](x).x_hat, saes[hook](x).x_hat), (fmt, hook)
