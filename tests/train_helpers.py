"""Tiny transformers models for the trainer tests, built offline from config classes.

Each is a real ``transformers`` model directory (config, weights, tokenizer) in a temporary folder:
a 3-layer BERT (d=32, [CLS] ... [SEP] around each sequence) and a 3-layer GPT-2 (d=24, no special
tokens around a sequence, <|endoftext|> between documents). The tokenizers are trained here on
Python's own documentation, so nothing touches the network.
"""

from __future__ import annotations

import os

# Nothing in these tests may reach the Hugging Face hub (huggingface_hub reads this on import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sparse autoencoders find features in activations.",
    "def f(x):\n    return x + 1\n",
    "Short.",
    "A longer document that spans several contexts " * 12,
]


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)][:20] + TEXTS


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials))
    # the trainer numbers its tokens in a different order in every process (its hash maps are seeded
    # per process), so the tiny model, and every result trained on it, differed from run to run: the
    # same tokens, renumbered specials first, then in sorted order
    trained = tok.get_vocab()
    order = specials + sorted(set(trained) - set(specials))
    tok.model = models.WordPiece(vocab={token: i for i, token in enumerate(order)}, unk_token="[UNK]")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _save_tiny_model(directory: Path, tokenizer: Any, model_class: Any, config: Any) -> Path:
    """A randomly initialized `model_class` (seed 0) and its tokenizer, saved to `directory`."""
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_bert(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    tokenizer = _wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return _save_tiny_model(directory, tokenizer, BertModel, config)


def make_tiny_gpt2(directory: Path) -> Path:
    from transformers import GPT2Config, GPT2Model

    tokenizer = _bpe_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=24, n_layer=3, n_head=2, n_positions=64,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return _save_tiny_model(directory, tokenizer, GPT2Model, config)


@pytest.fixture(scope="module")
def text(tmp_path_factory: Any) -> Path:
    """A JSONL corpus (write_text_files), written once per test module."""
    return write_text_files(tmp_path_factory.mktemp("text"))["jsonl"]


def tiny_train_config(tmp_path: Path, name: str, text: Path, **overrides: Any) -> Any:
    """A TrainConfig for a seconds-long CPU run on the tiny BERT: out = tmp_path / name; `overrides`
    replace any setting (hookpoints, k, optimizer, token counts, ...)."""
    from flashsae.train import TrainConfig

    settings = {
        "model": str(tiny_bert()),
        "dataset": str(text),
        "ctx_len": 16,
        "model_batch_size": 4,
        "device": "cpu",
        "buffer_tokens": 256,
        "dead_tokens": 128,  # small enough that AuxK is active during these runs
        "checkpoint_every": 0,
        "progress": False,
        "tensorboard": False,
        "out": str(tmp_path / name),
    }
    return TrainConfig(**(settings | overrides))


def write_text_files(directory: Path) -> dict[str, Path]:
    """A .txt file, a .jsonl file and a folder holding both (documents: TEXTS)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    txt = directory / "docs.txt"
    txt.write_text("\n\n".join(TEXTS))
    jsonl = directory / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return {"txt": txt, "jsonl": jsonl, "dir": directory}


@functools.cache
def _models_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="flashsae-tiny-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def tiny_bert() -> Path:
    """The tiny BERT's directory, built once per test session."""
    return make_tiny_bert(_models_root() / "bert")


@functools.cache
def tiny_gpt2() -> Path:
    """The tiny GPT-2's directory, built once per test session."""
    return make_tiny_gpt2(_models_root() / "gpt2")
