"""Text sources: documents from the built-in corpus, local files or a Hugging Face dataset,
tokenized and packed into fixed-length contexts.

Packing: documents are tokenized without special tokens and joined into one stream with the
tokenizer's end-of-text token (else its separator) between them; the stream is cut into pieces of
ctx_len minus the special tokens the tokenizer wraps a sequence in ([CLS] ... [SEP] for BERT, BOS
for Llama, none for GPT-2), and each piece is wrapped. The last context of a pass is padded.

The packer reads one part of the corpus (flashsae.train.split: train, eval or all documents): the
documents of the other part are skipped as they stream by, so the two parts never share a document.

The packer's position is three integers (pass, document, token within the document; the document
counts every document of the corpus, kept or skipped), so a run can be resumed exactly without
storing any text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model_loading import hub_offline
from .config import BUILTIN_CORPUS
from .split import CorpusPart, EmptyPartError

#: .txt files are cut into documents of about this many characters, at blank lines where possible
#: (so a 10 GB file is never tokenized as one string).
TXT_BLOCK_CHARS = 65536
TEXT_SUFFIXES = (".txt", ".jsonl")


def builtin_corpus() -> list[str]:
    """The English documentation that ships with CPython (pydoc_data.topics: 79 topics, ~465k
    characters, 128k MiniLM tokens), one document per topic in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise FileNotFoundError(
            "dataset: the built-in corpus needs pydoc_data.topics, which this Python installation lacks; "
            "pass --dataset with a text file or a Hugging Face dataset"
        ) from exc
    return [topics[name] for name in sorted(topics)]


def _txt_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            block.append(line)
            size += len(line)
            if size >= 16 * TXT_BLOCK_CHARS or (size >= TXT_BLOCK_CHARS and not line.strip()):
                yield "".join(block)
                block, size = [], 0
    if "".join(block).strip():
        yield "".join(block)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"dataset: {path}:{number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"dataset: {path}:{number} has no string field {text_field!r} (see --text-field)")
            yield record[text_field]


def _file_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for file in files:
        if file.suffix == ".jsonl":
            yield from _jsonl_documents(file, text_field)
        else:
            yield from _txt_documents(file)


def _is_saved_hf_dataset(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _import_datasets(dataset: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"dataset: {dataset!r} is a Hugging Face dataset, which needs the 'datasets' package: "
            "pip install 'flashsae[datasets]' (or pass 'pydoc', a .txt/.jsonl file or a directory of them)"
        ) from None
    return datasets


def _hf_column(dataset: Any, name: str, text_field: str) -> Any:
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_field not in columns:
        raise ValueError(f"dataset: {name} has no column {text_field!r} (columns: {columns}); see --text-field")
    return dataset


@dataclass(frozen=True)
class DocumentSource:
    """A restartable sequence of documents: ``open(start)`` iterates from document `start`."""

    description: str
    open: Callable[[int], Iterator[str]]


def document_source(dataset: str, *, text_field: str = "text", split: str = "train", config: str | None = None):
    """The documents of `dataset` (see TrainConfig.dataset); clear errors when it cannot be found."""
    if dataset == BUILTIN_CORPUS:
        corpus = builtin_corpus()
        return DocumentSource("pydoc_data.topics (Python's documentation)", lambda start: iter(corpus[start:]))
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"dataset: {path} should be a .txt or .jsonl file, got {path.suffix or 'no suffix'}")
        return DocumentSource(str(path), lambda start: _skip(_file_documents([path], text_field), start))
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            datasets = _import_datasets(dataset)
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"dataset_split: {path} has splits {sorted(loaded)}, not {split!r}")
                loaded = loaded[split]
            rows = _hf_column(loaded, str(path), text_field)
            return DocumentSource(str(path), lambda start: (rows[i][text_field] for i in range(start, len(rows))))
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"dataset: {path} holds no .txt or .jsonl files and is not a saved dataset")
        return DocumentSource(str(path), lambda start: _skip(_file_documents(files, text_field), start))
    if _looks_like_path(dataset):
        raise FileNotFoundError(f"dataset: {dataset} is neither a file nor a directory")
    datasets = _import_datasets(dataset)
    try:
        stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        hint = " (HF_HUB_OFFLINE is set: only datasets already in the local cache load)" if hub_offline() else ""
        raise FileNotFoundError(
            f"dataset: cannot load {dataset!r}{hint}: {type(exc).__name__}: {exc}. "
            "Pass 'pydoc', a local .txt/.jsonl file, a directory of them, or a dataset saved with save_to_disk."
        ) from exc
    _hf_column(stream, dataset, text_field)
    return DocumentSource(f"{dataset} ({split})", lambda start: (row[text_field] for row in stream.skip(start)))


def _looks_like_path(name: str) -> bool:
    """Hub dataset names are 'name' or 'owner/name'; anything else that does not exist is a missing path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or name.endswith(TEXT_SUFFIXES)
    )


def _skip(iterator: Iterator[str], count: int) -> Iterator[str]:
    for _ in range(count):
        if next(iterator, None) is None:
            return iter(())
    return iterator


class Tokenization:
    """How a tokenizer wraps and separates sequences, found by probing it (works with any
    transformers version and tokenizer class)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        for start in range(len(wrapped) - len(bare) + 1):
            if wrapped[start : start + len(bare)] == bare:
                self.prefix, self.suffix = wrapped[:start], wrapped[start + len(bare) :]
                break
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.separator: list[int] = [] if separator is None else [separator]
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (separator if separator is not None else 0)
        # [UNK] stands for real (unknown) words, so it is content; the others are structure
        special = set(getattr(tokenizer, "all_special_ids", []) or []) - {tokenizer.unk_token_id}
        self.special_ids = torch.tensor(sorted(special | set(self.prefix) | set(self.suffix) | set(self.separator)))

    def encode(self, text: str) -> list[int]:
        # verbose=False: documents are longer than model_max_length by design (they are packed)
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


class ContextPacker:
    """Packs the documents of one part of a DocumentSource into contexts [ctx_len] (input_ids +
    attention_mask).

    ``cycle=True`` restarts the documents when they run out (a pass is an epoch); otherwise the
    packer ends after one pass. State: (passes, next document, next token in it).
    """

    def __init__(
        self,
        documents: DocumentSource,
        tokenization: Tokenization,
        ctx_len: int,
        *,
        cycle: bool,
        part: CorpusPart | None = None,
    ) -> None:
        self.documents = documents
        self.part = part if part is not None else CorpusPart()
        self.tok = tokenization
        self.ctx_len = ctx_len
        self.content_len = ctx_len - len(tokenization.prefix) - len(tokenization.suffix)
        if self.content_len < 1:
            raise ValueError(f"ctx_len: {ctx_len} leaves no room next to the tokenizer's special tokens")
        self.cycle = cycle
        self.passes = 0
        self.doc_index = 0
        self.token_offset = 0
        self._iter: Iterator[str] | None = None
        self._tokens: list[int] = []  # the current document's tokens (+ separator), from _doc_start
        self.exhausted = False
        self._kept_this_pass = 0  # documents of the part read in this pass since doc_index 0
        self._pass_from_start = True

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "doc_index": self.doc_index, "token_offset": self.token_offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.passes, self.doc_index, self.token_offset = state["passes"], state["doc_index"], state["token_offset"]
        self._iter, self._tokens, self.exhausted = None, [], False
        self._kept_this_pass, self._pass_from_start = 0, self.doc_index == 0 and self.token_offset == 0

    def _load_document(self) -> bool:
        """Makes self._tokens the next document of the part from doc_index on (moving doc_index past
        the other part's documents); False at the end of a pass."""
        if self._iter is None:
            self._iter = self.documents.open(self.doc_index)
        while True:
            text = next(self._iter, None)
            if text is None:
                return False
            if self.part.keeps(text):
                break
            self.doc_index += 1
        self._kept_this_pass += 1
        self._tokens = self.tok.encode(text) + self.tok.separator
        return True

    def _next_piece(self) -> list[int] | None:
        """Up to content_len tokens of the stream; a shorter piece ends a pass; None: nothing left."""
        piece: list[int] = []
        while len(piece) < self.content_len:
            if not self._tokens and not self._load_document():
                break
            take = self._tokens[self.token_offset : self.token_offset + self.content_len - len(piece)]
            piece += take
            self.token_offset += len(take)
            if self.token_offset >= len(self._tokens):
                self.doc_index += 1
                self.token_offset = 0
                self._tokens = []
        return piece or None

    def _end_pass(self) -> None:
        """Called when the documents ran dry: starts the next pass (or ends a non-cycling packer)."""
        self._iter, self._tokens = None, []
        if self.doc_index == 0:
            raise ValueError(f"dataset: {self.documents.description} holds no documents")
        if self._pass_from_start and self._kept_this_pass == 0:
            raise EmptyPartError(
                f"dataset: the {self.part.describe()} of {self.documents.description} holds none of its "
                f"{self.doc_index} documents; choose another eval_fraction or a corpus with more documents"
            )
        self._kept_this_pass, self._pass_from_start = 0, True
        self.passes += 1
        self.doc_index = self.token_offset = 0
        self.exhausted = not self.cycle

    def next_contexts(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Up to `count` contexts as (input_ids, attention_mask), each [m, ctx_len] int64. The end
        of a pass ends a chunk early (its last context padded); None once a non-cycling packer is done."""
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        while len(rows) < count and not self.exhausted:
            piece = self._next_piece()
            if piece is not None:
                ids = self.tok.prefix + piece + self.tok.suffix
                padding = self.ctx_len - len(ids)
                rows.append(ids + [self.tok.pad_id] * padding)
                masks.append([1] * len(ids) + [0] * padding)
                if len(piece) == self.content_len:
                    continue
            # the documents ran dry (inside this piece or right before it): the pass is over
            self._end_pass()
            if rows:
                break
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
