"""dictionary_learning directories (ae.pt + config.json): every dictionary class matches
dictionary_learning's forward (float64 reference); .pt files are read with weights_only=True."""

import json
import warnings
from collections import OrderedDict

import pytest
import torch

import flashsae
from flashsae import BatchTopKSAE, FormatError, GatedSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE
from io_helpers import assert_matches, dictionary_learning_reference, separated_rows

D, N, K = 37, 300, 7


def state_dict(dict_class: str) -> OrderedDict:
    """A state dict with the keys, shapes and dtypes ``torch.save(ae.state_dict())`` writes."""
    enc = torch.randn(N, D) * D**-0.5
    dec = torch.randn(D, N) * D**-0.5
    if dict_class == "AutoEncoder":
        items = {"bias": torch.randn(D) * 0.1, "encoder.weight": enc, "encoder.bias": torch.randn(N) * 0.3,
                 "decoder.weight": dec}  # fmt: skip
    elif dict_class == "AutoEncoderNew":
        items = {"encoder.weight": enc, "encoder.bias": torch.randn(N) * 0.3, "decoder.weight": dec,
                 "decoder.bias": torch.randn(D) * 0.1}  # fmt: skip
    elif dict_class == "GatedAutoEncoder":
        items = {"decoder_bias": torch.randn(D) * 0.1, "r_mag": torch.randn(N) * 0.2, "gate_bias": torch.randn(N) * 0.3,
                 "mag_bias": torch.randn(N) * 0.3, "encoder.weight": enc, "decoder.weight": dec}  # fmt: skip
    elif dict_class == "JumpReluAutoEncoder":
        threshold = torch.rand(N) * 0.6
        threshold[:3] = torch.tensor([-0.2, 0.0, 0.05])
        items = {"W_enc": enc.T.contiguous(), "b_enc": torch.randn(N) * 0.3, "W_dec": dec.T.contiguous(),
                 "b_dec": torch.randn(D) * 0.1, "threshold": threshold}  # fmt: skip
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        items = {"k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(0.25),
                 "decoder.weight": dec, "encoder.weight": enc, "encoder.bias": torch.randn(N) * 0.3,
                 "b_dec": torch.randn(D) * 0.1}  # fmt: skip
    else:
        items = {"k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(0.25),
                 "group_sizes": torch.tensor([30, 70, 200]), "W_enc": enc.T.contiguous(),
                 "b_enc": torch.randn(N) * 0.3, "W_dec": dec.T.contiguous(), "b_dec": torch.randn(D) * 0.1}  # fmt: skip
    return OrderedDict(items)


def write(path, dict_class, state, config=True, **trainer):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    if config:
        fields = {"dict_class": dict_class, "activation_dim": D, "dict_size": N, "lm_name": "google/gemma-2-2b",
                  "layer": 12, "submodule_name": "resid_post_layer_12", **trainer}  # fmt: skip
        (path / "config.json").write_text(json.dumps({"trainer": fields, "buffer": {"ctx_len": 128}}))


CLASSES = {
    "AutoEncoder": (ReLUSAE, {"apply_b_dec_to_input": True}),
    "AutoEncoderNew": (ReLUSAE, {"apply_b_dec_to_input": False}),
    "GatedAutoEncoder": (GatedSAE, {"apply_b_dec_to_input": True}),
    "JumpReluAutoEncoder": (JumpReLUSAE, {"apply_b_dec_to_input": False, "threshold_parametrization": "direct"}),
    "AutoEncoderTopK": (TopKSAE, {"k": K}),
    "BatchTopKSAE": (BatchTopKSAE, {"k": K}),
    "MatryoshkaBatchTopKSAE": (MatryoshkaSAE, {"k": K, "matryoshka_widths": [30, 100, 300]}),
}


@pytest.mark.parametrize("dict_class", list(CLASSES))
def test_matches_dictionary_learning_forward(tmp_path, dict_class):
    cls, fields = CLASSES[dict_class]
    state = state_dict(dict_class)
    write(tmp_path / "ae", dict_class, state, auxk_alpha=0.05, threshold_beta=0.99, threshold_start_step=7)
    sae = flashsae.load(tmp_path / "ae")
    assert type(sae) is cls and (sae.d_in, sae.n_latents) == (D, N)
    for name, value in fields.items():
        assert getattr(sae.config, name) == value, name
    if cls in (BatchTopKSAE, MatryoshkaSAE):  # trainer settings with a flashsae field are taken over
        assert float(sae.threshold) == 0.25
        assert (sae.config.auxk_alpha, sae.config.threshold_beta, sae.config.threshold_start_step) == (0.05, 0.99, 7)
    assert sae.metadata["model"] == "google/gemma-2-2b" and sae.metadata["hookpoint"] == "resid_post_layer_12"
    x = separated_rows(lambda x: dictionary_learning_reference(dict_class, state, x), lambda r: torch.randn(r, D), 40)
    assert_matches(sae, dictionary_learning_reference(dict_class, state, x), x, what=dict_class)
    # the ae.pt file itself is a valid path too
    assert type(flashsae.load(tmp_path / "ae" / "ae.pt")) is cls


@pytest.mark.parametrize(
    "dict_class", ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"]
)
def test_class_guessed_without_config(tmp_path, dict_class):
    write(tmp_path / "ae", dict_class, state_dict(dict_class), config=False)
    assert type(flashsae.load(tmp_path / "ae")) is CLASSES[dict_class][0]


def test_topk_without_config_is_ambiguous(tmp_path):
    write(tmp_path / "ae", "BatchTopKSAE", state_dict("BatchTopKSAE"), config=False)
    with pytest.raises(FormatError, match="cannot tell the dictionary class"):
        flashsae.load(tmp_path / "ae")


def test_compiled_state_dict_prefix(tmp_path):
    state = OrderedDict((f"_orig_mod.{k}", v) for k, v in state_dict("AutoEncoder").items())
    write(tmp_path / "ae", "AutoEncoder", state)
    assert isinstance(flashsae.load(tmp_path / "ae"), ReLUSAE)


class Payload:
    """Unpickling this would run code: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_unsafe_and_broken_files_are_refused(tmp_path, capsys):
    write(tmp_path / "ae", "AutoEncoder", {**state_dict("AutoEncoder"), "hook": Payload()})
    with pytest.raises(FormatError, match=r"weights_only=True\) and will not unpickle"):
        flashsae.load(tmp_path / "ae")
    assert "unpickled!" not in capsys.readouterr().out
    write(tmp_path / "ae", "AutoEncoder", state_dict("AutoEncoder"))
    raw = (tmp_path / "ae" / "ae.pt").read_bytes()
    (tmp_path / "ae" / "ae.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(FormatError, match="is not a readable torch checkpoint"):
        flashsae.load(tmp_path / "ae")
    write(tmp_path / "ae", "CrossCoder", state_dict("AutoEncoder"))
    with pytest.raises(FormatError, match="unknown dict_class 'CrossCoder'"):
        flashsae.load(tmp_path / "ae")
    state = state_dict("AutoEncoderTopK")
    state["k"] = torch.tensor(N + 1)
    write(tmp_path / "ae", "AutoEncoderTopK", state)
    with pytest.raises(FormatError, match=r"k must be an int in \[1, dict_size=300\], got 301"):
        flashsae.load(tmp_path / "ae")
    state = state_dict("MatryoshkaBatchTopKSAE")
    state["group_sizes"] = torch.tensor([30, 70])
    write(tmp_path / "ae", "MatryoshkaBatchTopKSAE", state)
    with pytest.raises(FormatError, match="group_sizes"):
        flashsae.load(tmp_path / "ae")
    gated = {k: v for k, v in state_dict("GatedAutoEncoder").items() if k != "r_mag"}
    write(tmp_path / "ae", "GatedAutoEncoder", gated)
    with pytest.raises(FormatError, match="missing tensor 'r_mag'"):
        flashsae.load(tmp_path / "ae")


def test_with_the_real_library(tmp_path):
    """Optional: modules of dictionary_learning itself, saved as it saves them (skipped without it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dictionary = pytest.importorskip("dictionary_learning.dictionary")
        batch_top_k = pytest.importorskip("dictionary_learning.trainers.batch_top_k")
    for name, module in [("GatedAutoEncoder", dictionary.GatedAutoEncoder(D, N)),
                         ("BatchTopKSAE", batch_top_k.BatchTopKSAE(D, N, K))]:  # fmt: skip
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.2)
            if name == "BatchTopKSAE":
                module.threshold.fill_(0.3)
        path = tmp_path / name
        path.mkdir()
        torch.save(module.state_dict(), path / "ae.pt")
        (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": name}}))
        ours = flashsae.load(path).eval()
        x = torch.randn(20, D)
        with torch.no_grad():
            torch.testing.assert_close(ours(x).x_hat, module(x), rtol=1e-5, atol=1e-5)
