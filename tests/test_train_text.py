"""Text sources and packing: documents from every kind of source, contexts that reassemble exactly
into the token stream, special tokens and padding where they belong, exact resume."""

import sys
import types

import pytest
import torch

from flashsae.train.text import ContextPacker, DocumentSource, Tokenization, builtin_corpus, document_source
from train_helpers import TEXTS, tiny_bert, tiny_gpt2, write_text_files


def tokenization(model_dir):
    from transformers import AutoTokenizer

    return Tokenization(AutoTokenizer.from_pretrained(model_dir))


def test_builtin_corpus_is_pythons_documentation():
    docs = builtin_corpus()
    from pydoc_data.topics import topics

    assert len(docs) == len(topics) > 50
    assert docs == [topics[name] for name in sorted(topics)]
    assert sum(map(len, docs)) > 300_000
    assert list(document_source("pydoc").open(3)) == docs[3:]


def test_local_files(tmp_path):
    files = write_text_files(tmp_path)
    assert list(document_source(str(files["jsonl"])).open(0)) == TEXTS
    assert list(document_source(str(files["jsonl"])).open(2)) == TEXTS[2:]
    assert "".join(document_source(str(files["txt"])).open(0)) == "\n\n".join(TEXTS)
    folder = list(document_source(str(files["dir"])).open(0))  # docs.jsonl, then docs.txt
    assert folder[: len(TEXTS)] == TEXTS and "".join(folder[len(TEXTS) :]) == "\n\n".join(TEXTS)


def test_large_txt_is_cut_at_blank_lines(tmp_path, monkeypatch):
    text_module = sys.modules["flashsae.train.text"]
    monkeypatch.setattr(text_module, "TXT_BLOCK_CHARS", 100)
    paragraphs = [f"paragraph {i} " * 10 + "\n" for i in range(20)]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(paragraphs))
    docs = list(document_source(str(path)).open(0))
    assert len(docs) > 5 and "".join(docs) == path.read_text()
    assert all(doc.endswith("\n\n") for doc in docs[:-1])


@pytest.mark.parametrize(
    ("content", "error", "pattern"),
    [
        ('{"text": "a"}\n{"body": "b"}\n', ValueError, r"docs.jsonl:2 has no string field 'text'"),
        ('{"text": "a"}\nnot json\n', ValueError, r"docs.jsonl:2 is not valid JSON"),
    ],
)
def test_bad_jsonl(tmp_path, content, error, pattern):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(error, match=pattern):
        list(document_source(str(path)).open(0))


def test_missing_or_unusable_datasets(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"dataset: ./nope.txt is neither a file nor a directory"):
        document_source("./nope.txt")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"should be a .txt or .jsonl file, got .md"):
        document_source(str(tmp_path / "notes.md"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no .txt or .jsonl files"):
        document_source(str(tmp_path / "empty"))
    # a hub name without the datasets package installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'flashsae\[datasets\]'"):
        document_source("someone/some-corpus")


def test_hub_dataset_not_found_offline(monkeypatch):
    def load_dataset(*_args, **_kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"cannot load 'someone/some-corpus' \(HF_HUB_OFFLINE is set"):
        document_source("someone/some-corpus")


def test_tokenization_probe_finds_the_wrapping():
    bert, gpt2 = tokenization(tiny_bert()), tokenization(tiny_gpt2())
    cls, sep = bert.tokenizer.cls_token_id, bert.tokenizer.sep_token_id
    assert (bert.prefix, bert.suffix, bert.separator) == ([cls], [sep], [sep])
    assert bert.tokenizer.unk_token_id not in bert.special_ids.tolist()  # unknown words are content
    eos = gpt2.tokenizer.eos_token_id
    assert (gpt2.prefix, gpt2.suffix, gpt2.separator) == ([], [], [eos])


@pytest.mark.parametrize("model", ["bert", "gpt2"])
@pytest.mark.parametrize("ctx_len", [8, 13])
def test_contexts_reassemble_the_stream(model, ctx_len):
    tok = tokenization(tiny_bert() if model == "bert" else tiny_gpt2())
    stream = [t for doc in TEXTS for t in tok.encode(doc) + tok.separator]
    docs = DocumentSource("texts", lambda start: iter(TEXTS[start:]))
    packer = ContextPacker(docs, tok, ctx_len, cycle=False)
    chunks = []
    while (chunk := packer.next_contexts(5)) is not None:
        chunks.append(chunk)
    ids, mask = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    assert ids.shape[1] == ctx_len and ids.dtype == torch.long
    n_wrap = len(tok.prefix) + len(tok.suffix)
    content = []
    for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
        length = sum(m)
        assert m == [1] * length + [0] * (ctx_len - length), "padding only at the end"
        assert row[length:] == [tok.pad_id] * (ctx_len - length)
        assert row[: len(tok.prefix)] == tok.prefix and row[length - len(tok.suffix) : length] == tok.suffix
        content += row[len(tok.prefix) : length - len(tok.suffix)]
    assert content == stream, "the contexts hold exactly the packed documents, in order"
    full = -(-len(stream) // (ctx_len - n_wrap))
    assert ids.shape[0] == full and mask[:-1].all(), "only the last context of the pass is padded"
    assert packer.exhausted and packer.next_contexts(5) is None


def test_cycling_and_exact_resume():
    tok = tokenization(tiny_bert())
    docs = DocumentSource("texts", lambda start: iter(TEXTS[start:]))
    packer = ContextPacker(docs, tok, 11, cycle=True)
    first_pass = []
    while packer.passes == 0:
        first_pass.append(packer.next_contexts(4)[0])
    second = packer.next_contexts(4)[0]
    assert torch.equal(second, torch.cat(first_pass)[:4]), "a new pass starts the documents over"
    for _ in range(3):
        packer.next_contexts(4)
    state = dict(packer.state_dict())
    expected = [packer.next_contexts(4)[0] for _ in range(12)]
    resumed = ContextPacker(docs, tok, 11, cycle=True)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_contexts(4)[0]) for a in expected)


def test_empty_dataset_is_an_error(tmp_path):
    tok = tokenization(tiny_bert())
    packer = ContextPacker(DocumentSource("nothing", lambda start: iter([])), tok, 8, cycle=True)
    with pytest.raises(ValueError, match=r"dataset: nothing holds no documents"):
        packer.next_contexts(2)
    with pytest.raises(ValueError, match=r"ctx_len: 2 leaves no room"):
        ContextPacker(DocumentSource("x", lambda start: iter(["a"])), tok, 2, cycle=True)
