"""The train / eval split of a corpus (flashsae.train.split): the parts never share a document, are
deterministic and both non-empty on the demo corpus; training, the activation cache and evaluation
read the part they should, and ``flashsae eval`` reads the eval part by default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flashsae.eval import evaluate, load_eval_model
from flashsae.eval.data import token_batches
from flashsae.train import CacheConfig, Trainer, write_cache
from flashsae.train.activations import ModelActivations
from flashsae.train.split import DEFAULT_EVAL_FRACTION, CorpusPart, split_score
from flashsae.train.text import ContextPacker, DocumentSource, Tokenization, builtin_corpus
from test_eval_cli import main, saved_sae
from train_helpers import TEXTS, text, tiny_bert, tiny_gpt2, tiny_train_config  # noqa: F401 - text: a fixture


def parts(documents, fraction):
    train = [doc for doc in documents if CorpusPart("train", fraction).keeps(doc)]
    held_out = [doc for doc in documents if CorpusPart("eval", fraction).keeps(doc)]
    return train, held_out


@pytest.mark.parametrize("fraction", [0.05, DEFAULT_EVAL_FRACTION, 0.3, 0.5])
def test_the_parts_of_the_demo_corpus_partition_it(fraction):
    corpus = builtin_corpus()
    train, held_out = parts(corpus, fraction)
    assert train and held_out, "both parts hold documents"
    assert len(train) + len(held_out) == len(corpus) and not set(train) & set(held_out)
    assert [doc for doc in corpus if doc in set(train) | set(held_out)] == corpus
    assert CorpusPart("all", fraction).keeps(corpus[0])


def test_the_split_is_deterministic_and_pinned():
    corpus = builtin_corpus()
    # pinned: the same documents are held out on every machine and Python version (a hash of the
    # text, not Python's salted hash() and not the order of the corpus)
    _, held_out = parts(corpus, DEFAULT_EVAL_FRACTION)
    assert len(corpus) == 79 and len(held_out) == 7
    assert split_score("") == pytest.approx(0.597699, abs=1e-6)
    script = "from flashsae.train.split import split_score as s; print(repr([s(t) for t in ['a', 'b', '']]))"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert other.stdout.strip() == repr([split_score(t) for t in ["a", "b", ""]])
    # a duplicated document lands on the same side, wherever it is in the corpus
    _, shuffled_out = parts(list(reversed(corpus)) + corpus[:5], DEFAULT_EVAL_FRACTION)
    assert set(shuffled_out) == set(held_out)
    # a larger fraction only moves documents from train to eval
    assert set(held_out) <= set(parts(corpus, 0.3)[1])
    train_zero, eval_zero = parts(corpus, 0.0)
    assert train_zero == corpus and eval_zero == []


def test_bad_split_settings():
    with pytest.raises(ValueError, match="eval_fraction: expected a number in"):
        CorpusPart("eval", 1.0)
    with pytest.raises(TypeError, match="eval_fraction: expected a number in"):
        CorpusPart("eval", "0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split: expected one of train, eval, all"):
        CorpusPart("test")
    with pytest.raises(ValueError, match="eval_fraction"):
        CacheConfig(eval_fraction=-0.1)


class WordTokenizer:
    """One id per character (enough to check which text the packer read); no special tokens."""

    eos_token_id, sep_token_id, pad_token_id, unk_token_id = 0, None, None, None
    all_special_ids = [0]

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [1 + ord(c) % 200 for c in text]}


def packed(documents, part, *, start_state=None):
    packer = ContextPacker(
        DocumentSource("docs", lambda start: iter(documents[start:])), Tokenization(WordTokenizer()), 32,
        cycle=False, part=part,
    )  # fmt: skip
    if start_state is not None:
        packer.load_state_dict(start_state)
    ids = []
    while (contexts := packer.next_contexts(3)) is not None:
        ids += contexts[0][contexts[1].bool()].tolist()
    return ids, packer


def test_the_packer_reads_one_part_and_resumes_inside_it():
    documents = [f"document number {i} " * (1 + i % 4) for i in range(60)]
    tokenizer = WordTokenizer()
    for name in ("train", "eval"):
        part = CorpusPart(name, 0.3)
        kept = [doc for doc in documents if part.keeps(doc)]
        ids, _ = packed(documents, part)
        assert ids == [token for doc in kept for token in tokenizer(doc)["input_ids"] + [0]]
    # resuming from a mid-pass state continues exactly (the position counts every document)
    part = CorpusPart("eval", 0.3)
    packer = ContextPacker(
        DocumentSource("docs", lambda start: iter(documents[start:])), Tokenization(tokenizer), 32, cycle=False,
        part=part,
    )  # fmt: skip
    first = packer.next_contexts(2)
    state = packer.state_dict()
    rest, _ = packed(documents, part, start_state=state)
    whole, _ = packed(documents, part)
    assert first[0][first[1].bool()].tolist() + rest == whole
    # a part without documents is a clear error, not an empty run
    with pytest.raises(ValueError, match=r"the eval part .* holds none of its 60 documents"):
        packed(documents, CorpusPart("eval", 0.0))


def test_evaluation_data_defaults_to_the_eval_part(text):
    tokenizer = Tokenization(load_eval_model(str(tiny_gpt2()), device=torch.device("cpu"))[1])

    def token_count(**options):
        batches = token_batches(
            str(text), tokenizer=tokenizer.tokenizer, n_tokens=10**6, ctx_len=16, batch_size=4,
            exclude_special_tokens=True, device=torch.device("cpu"), **options,
        )  # fmt: skip
        return sum(int(batch.keep.sum()) for batch in batches)

    train_texts, eval_texts = parts(TEXTS, DEFAULT_EVAL_FRACTION)
    assert train_texts and eval_texts
    expected = {name: sum(len(tokenizer.encode(t)) for t in texts) for name, texts in
                (("train", train_texts), ("eval", eval_texts), ("all", TEXTS))}  # fmt: skip
    assert token_count() == expected["eval"]
    for name in ("train", "eval", "all"):
        assert token_count(part=name) == expected[name]


def test_flashsae_eval_reads_the_eval_part_by_default(tmp_path, text, capsys):
    saved_sae(tmp_path / "sae", text, eval_fraction=DEFAULT_EVAL_FRACTION)
    out = tmp_path / "results.json"
    assert main(["eval", str(tmp_path / "sae"), "--downstream", "none", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    (record,) = json.loads(out.read_text())["saes"]
    tokenizer = load_eval_model(str(tiny_gpt2()), device=torch.device("cpu"))[1]
    _, eval_texts = parts(TEXTS, DEFAULT_EVAL_FRACTION)
    held_out = sum(len(Tokenization(tokenizer).encode(t)) for t in eval_texts)
    assert record["tokens"] == held_out and record["config"]["part"] == "eval"
    assert f"{held_out:,} tokens of {text}, eval part (10% of documents, by text hash)" in printed
    assert main(["eval", str(tmp_path / "sae"), "--downstream", "none", "--part", "train", "--no-progress"]) == 0
    assert "train part (90% of documents, by text hash)" in capsys.readouterr().out


def test_training_never_sees_the_eval_part_and_measures_on_it(tmp_path, text):
    config = tiny_train_config(
        tmp_path, "run", text, hookpoints=["encoder.layer.1"], k=4, batch_size=32, train_tokens=32 * 6,
        buffer_tokens=256, eval_tokens=10**6,
    )  # fmt: skip
    trainer = Trainer(config)
    train_rows = torch.cat([chunk["encoder.layer.1"] for chunk in trainer.activations.other_part("train").chunks()])
    eval_rows = torch.cat([chunk["encoder.layer.1"] for chunk in trainer.eval_chunks()])
    assert eval_rows.shape[0] > 0 and train_rows.shape[0] > 0
    # no activation row of the eval part is among the training rows (they are contextual, so equal
    # rows would mean the same text in the same context)
    assert not (torch.cdist(eval_rows, train_rows) < 1e-6).any()
    result = trainer.train()
    assert result.evaluation == {
        "part": "eval", "tokens": eval_rows.shape[0], "dataset": str(text),
        "split": "eval part (10% of documents, by text hash)",
    }  # fmt: skip
    assert 0 < result.metrics["encoder.layer.1"]["l0"] <= 4


def test_the_cache_stores_both_parts_and_training_evaluates_on_its_eval_part(tmp_path, text):
    config = CacheConfig(
        model=str(tiny_bert()), hookpoints=["encoder.layer.1"], dataset=str(text), ctx_len=16, model_batch_size=4,
        device="cpu", out=str(tmp_path / "cache"), shard_tokens=40,
    )  # fmt: skip
    manifest = write_cache(config, progress=False)
    source = ModelActivations(config, cycle=False, device=torch.device("cpu"), part="eval")
    expected = torch.cat([chunk["encoder.layer.1"] for chunk in source.chunks()])
    train_rows = torch.cat([chunk["encoder.layer.1"] for chunk in source.other_part("train").chunks()])
    assert manifest["eval_fraction"] == DEFAULT_EVAL_FRACTION
    assert manifest["eval_tokens"] == expected.shape[0] > 0 and manifest["tokens"] == train_rows.shape[0]
    run = tiny_train_config(
        tmp_path, "run", text, activations=str(tmp_path / "cache"), hookpoints=None, k=4, batch_size=32,
        train_tokens=64, eval_tokens=10**6, model=str(tiny_bert()),
    )  # fmt: skip
    trainer = Trainer(run)
    stored = torch.cat([chunk["encoder.layer.1"] for chunk in trainer.eval_chunks()])
    assert torch.equal(stored, expected)
    result = trainer.train()
    assert result.evaluation["tokens"] == expected.shape[0]
    # a cache without an eval part trains, and says that nothing was measured
    no_eval = CacheConfig(**(config.to_dict() | {"out": str(tmp_path / "train-only"), "eval_tokens": 0}))
    assert write_cache(no_eval, progress=False)["eval_shards"] == []
    bare = tiny_train_config(
        tmp_path, "bare", text, activations=str(tmp_path / "train-only"), hookpoints=None, k=4, batch_size=32,
        train_tokens=64, eval_tokens=64, model=str(tiny_bert()),
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="no held-out tokens"):
        bare_result = Trainer(bare).train()
    assert bare_result.evaluation == {} and set(bare_result.metrics["encoder.layer.1"]) == {"dead_pct"}
