"""sparsify hookpoint directories (cfg.json + sae.safetensors) and multi-hookpoint run directories:
loaded SAEs and transcoders match sparsify's forward (float64 reference), round trips, errors."""

import json
import warnings

import pytest
import torch

import flashsae
from flashsae import BatchTopKSAE, FormatError, JumpReLUSAE, TopKSAE, Transcoder
from flashsae.io import sparsify
from flashsae.io._common import read_safetensors
from io_helpers import assert_matches, separated_rows, sparsify_reference, write_sparsify

D = 37


def sparsify_cfg(**fields):
    """A cfg.json as SparseCoder.save_to_disk writes it (SparseCoderConfig.to_dict() + d_in)."""
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": 32,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    }
    cfg.update(fields)
    return cfg


def sparsify_weights(n, skip=False):
    weights = {
        "encoder.weight": torch.randn(n, D) * D**-0.5,
        "encoder.bias": torch.randn(n) * 0.3,
        "W_dec": torch.randn(n, D) * D**-0.5,
        "b_dec": torch.randn(D) * 0.1,
    }
    if skip:
        weights["W_skip"] = torch.randn(D, D) * 0.1
    return weights


def make_x(rows):
    return torch.randn(rows, D)


CASES = {
    "sae": (dict(num_latents=300, k=7), 300, TopKSAE),
    "sae-expansion-factor": (dict(num_latents=0, expansion_factor=4, k=5, multi_topk=True), 4 * D, TopKSAE),
    "sae-k1": (dict(num_latents=64, k=1), 64, TopKSAE),
    "transcoder": (dict(num_latents=200, k=6, transcode=True), 200, Transcoder),
    "skip-transcoder": (dict(num_latents=100, k=4, transcode=True, skip_connection=True), 100, Transcoder),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_sparsify_forward(tmp_path, case):
    fields, n, cls = CASES[case]
    cfg = sparsify_cfg(**fields)
    weights = sparsify_weights(n, skip=cfg["skip_connection"])
    write_sparsify(tmp_path / "layers.4", cfg, weights)
    sae = flashsae.load(tmp_path / "layers.4")
    assert type(sae) is cls and sae.n_latents == n and sae.k == cfg["k"]
    assert sae.metadata["hookpoint"] == "layers.4" and sae.metadata["sparsify_config"] == cfg
    if cls is TopKSAE:
        assert sae.config.multi_topk == cfg["multi_topk"]
    else:
        assert sae.config.skip == cfg["skip_connection"] and sae.d_out == D
    x = separated_rows(lambda x: sparsify_reference(cfg, weights, x), make_x, 40)
    ref = sparsify_reference(cfg, weights, x)
    assert_matches(sae, ref, x, what=case)
    # sparsify's fvu: sum |y - y_hat|^2 / sum |y - mean(y)|^2 over the batch
    fvu = (ref.x_hat - x.double()).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()
    assert abs(sae(x).fvu.item() - fvu.item()) <= 1e-5 * fvu.item()


def test_multi_hookpoint_directory(tmp_path):
    run = tmp_path / "run"
    layouts = {"layers.10": 90, "layers.2": 60, "layers.2.mlp": 70, "embed_tokens": 50}
    for hook, n in layouts.items():
        write_sparsify(run / hook, sparsify_cfg(num_latents=n, k=3), sparsify_weights(n))
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m", "sae": {}}))
    (run / "lr_scheduler.pt").write_bytes(b"not read")  # run state sits next to the SAEs
    (run / ".hidden").mkdir()
    saes = flashsae.load_many(run)
    assert list(saes) == ["embed_tokens", "layers.2", "layers.2.mlp", "layers.10"]  # natural order
    for hook, sae in saes.items():
        assert sae.n_latents == layouts[hook] and sae.metadata["hookpoint"] == hook
        assert sae.metadata["model"] == "EleutherAI/pythia-160m"
    one = flashsae.load(run, subfolder="layers.10")
    assert torch.equal(one.W_dec, saes["layers.10"].W_dec)
    with pytest.raises(FormatError, match=r"holds 4 SAEs \(embed_tokens, layers\.2, layers\.2\.mlp, layers\.10\)"):
        flashsae.load(run)
    with pytest.raises(FileNotFoundError, match="subfolder"):
        flashsae.load(run, subfolder="layers.99")
    with pytest.raises(FormatError, match="has no subdirectory holding an SAE"):
        flashsae.load_many(run / "layers.10")


@pytest.mark.parametrize(
    "make",
    [
        lambda: TopKSAE(D, 150, 5, aux_k=9, auxk_alpha=0.2, multi_topk=True),
        lambda: Transcoder(D, 120, 4, skip=True, auxk_alpha=0.5),
        lambda: Transcoder(D, 120, 4),
    ],
    ids=["topk", "skip-transcoder", "transcoder"],
)
def test_round_trip_through_sparsify(tmp_path, make):
    sae = make()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    sae.metadata = {"hookpoint": "layers.1", "model": "m", "steps": 7}
    sae.save(tmp_path / "layers.1", format="sparsify")
    cfg = json.loads((tmp_path / "layers.1" / "cfg.json").read_text())
    assert cfg["num_latents"] == sae.n_latents and cfg["k"] == sae.k and cfg["d_in"] == D
    assert set(cfg) <= set(sparsify.DEFAULTS) | {"d_in"}  # nothing sparsify would warn about
    weights = read_safetensors(tmp_path / "layers.1" / "sae.safetensors")
    x = separated_rows(lambda x: sparsify_reference(cfg, weights, x), make_x, 30)
    assert_matches(sae, sparsify_reference(cfg, weights, x), x, what="written")
    back = flashsae.load(tmp_path / "layers.1")
    assert back.config == sae.config and back.metadata == {**sae.metadata, "source_format": "sparsify"} | {
        "sparsify_config": cfg
    }
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_save_refuses_what_sparsify_cannot_express(tmp_path):
    batch = BatchTopKSAE(D, 100, 4)
    with pytest.raises(FormatError, match=r"architecture: sparsify stores TopK SAEs and transcoders only; .*threshold"):
        batch.save(tmp_path / "b", format="sparsify")
    with pytest.raises(FormatError, match="per-latent thresholds"):
        JumpReLUSAE(D, 100).save(tmp_path / "j", format="sparsify")
    with pytest.raises(FormatError, match="apply_b_dec_to_input: sparsify SAEs always subtract b_dec"):
        TopKSAE(D, 100, 4, apply_b_dec_to_input=False).save(tmp_path / "t", format="sparsify")
    with pytest.raises(FormatError, match="input_norm: sparsify has no input normalization"):
        TopKSAE(D, 100, 4, input_norm="layer_norm").save(tmp_path / "t", format="sparsify")
    with pytest.raises(FormatError, match="d_out: sparsify transcoders predict d_in=37 features, this one d_out=20"):
        Transcoder(D, 100, 4, d_out=20).save(tmp_path / "t", format="sparsify")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_the_problem(tmp_path):
    path = tmp_path / "layers.0"
    weights = sparsify_weights(64)
    write_sparsify(path, sparsify_cfg(num_latents=64, k=4, activation="groupmax"), weights)
    with pytest.raises(FormatError, match="activation 'groupmax' has no flashsae equivalent"):
        flashsae.load(path)
    write_sparsify(path, sparsify_cfg(num_latents=64, k=4, skip_connection=True), {**weights, "W_skip": torch.eye(D)})
    with pytest.raises(FormatError, match="skip_connection=true without transcode"):
        flashsae.load(path)
    write_sparsify(path, sparsify_cfg(num_latents=64, k=4), {k: v for k, v in weights.items() if k != "W_dec"})
    with pytest.raises(FormatError, match="missing tensor 'W_dec'"):
        flashsae.load(path)
    write_sparsify(path, sparsify_cfg(num_latents=65, k=4), weights)
    with pytest.raises(FormatError, match=r"'encoder\.weight' has shape \[64, 37\], expected \[65, 37\]"):
        flashsae.load(path)
    write_sparsify(path, sparsify_cfg(num_latents=64, k=65), weights)
    with pytest.raises(FormatError, match=r"k=65 must be in \[1, num_latents=64\]"):
        flashsae.load(path)
    write_sparsify(path, sparsify_cfg(num_latents=64, k=4), weights)
    raw = (path / "sae.safetensors").read_bytes()
    (path / "sae.safetensors").write_bytes(raw[:-7])
    with pytest.raises(FormatError, match="is not a complete safetensors file"):
        flashsae.load(path)


def test_with_the_real_library(tmp_path, monkeypatch):
    """Optional: sparsify itself reads what flashsae writes and vice versa (skipped without sparsify)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse_coder = pytest.importorskip("sparsify.sparse_coder")
        utils = pytest.importorskip("sparsify.utils")
    monkeypatch.setattr(sparse_coder, "decoder_impl", utils.eager_decode)  # its Triton decoder needs a GPU
    theirs = sparse_coder.SparseCoder(D, sparse_coder.SparseCoderConfig(num_latents=120, k=5, transcode=True))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.save_to_disk(tmp_path / "theirs")
    ours = flashsae.load(tmp_path / "theirs")
    x = torch.randn(20, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).x_hat, theirs(x).sae_out, rtol=1e-5, atol=1e-5)
    ours.save(tmp_path / "ours", format="sparsify")
    again = sparse_coder.SparseCoder.load_from_disk(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(x).sae_out, theirs(x).sae_out, rtol=0, atol=0)
