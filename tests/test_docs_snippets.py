"""The README and the pages under docs/ say only what runs: every ```python block is executed as
written (a fresh namespace, in an empty working directory, offline), every relative link points at a
file of the repository (and, with a #fragment, at one of its headings), every repository path the
text names (`tests/test_plan.py`, `benchmarks/width_ratio.py`, in prose or in commands) exists, and
the README stays short.

Blocks fenced as ```bash or ```text are shown, not run. A python block that must not run carries
the line `<!-- snippet: not run (REASON) -->` right above its fence; the reason is required. A block
that needs an optional package (a client of docs/integrations.md) carries
`<!-- snippet: needs MODULE[, MODULE...] -->`: it runs where those modules are importable (the
`make test-integrations` venv) and is skipped, naming them, elsewhere; the clients' own warnings
(their deprecations) are shown there, not raised."""

from __future__ import annotations

import importlib.util
import linecache
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
NOT_RUN = re.compile(r"<!--\s*snippet:\s*not run\s*\((?P<reason>[^)]+)\)\s*-->")
NEEDS = re.compile(r"<!--\s*snippet:\s*needs\s+(?P<modules>[\w.]+(?:\s*,\s*[\w.]+)*)\s*-->")
LANGUAGES = {"python", "bash", "text"}
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
#: A path under one of the repository's top-level folders, named in prose or in a command; a path
#: with a placeholder (`benchmarks/results/<date>-<machine>/`) is not checked.
REPO_PATH = re.compile(r"(?<![\w./-])(?P<path>(?:benchmarks|tests|csrc|kernels|python|docs|\.ci)/[\w./*-]*)(?!<)")


@dataclass
class Block:
    page: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    code: str
    not_run_reason: str | None
    needs: tuple[str, ...] = ()
    """Modules the block imports that are optional (its `snippet: needs` marker)."""

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    opening: tuple[int, str, str] | None = None  # (index, indent, info)
    for index, line in enumerate(lines):
        match = FENCE.match(line)
        if match is None:
            continue
        if opening is None:
            opening = (index, match["indent"], match["info"].strip())
            continue
        start, indent, info = opening
        body = "\n".join(lines[start + 1 : index])
        previous = lines[start - 1] if start > 0 else ""
        marker = NOT_RUN.search(previous)
        needs = NEEDS.search(previous)
        modules = tuple(name.strip() for name in needs["modules"].split(",")) if needs else ()
        blocks.append(
            Block(page, start + 1, info, textwrap.dedent(body), marker["reason"] if marker else None, modules)
        )
        opening = None
    if opening is not None:
        raise AssertionError(f"{page.relative_to(ROOT)}:{opening[0] + 1}: code fence never closed")
    return blocks


def missing_modules(block: Block) -> list[str]:
    """The modules of the block's `needs` marker that cannot be imported here."""
    missing = []
    for name in block.needs:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in fenced_blocks(page)]


PYTHON_BLOCKS = [block for block in all_blocks() if block.language == "python"]


def test_the_pages_exist():
    names = {page.name for page in PAGES}
    for page in ("training", "architectures", "hooks-and-eval", "formats", "wide-and-distributed",
                 "backends-and-kernels", "benchmarks", "integrations"):  # fmt: skip
        assert f"{page}.md" in names, f"docs/{page}.md is missing"
    assert len(PYTHON_BLOCKS) >= 10, "the snippet extraction found too few python blocks"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES}"


@pytest.mark.parametrize("block", all_blocks(), ids=lambda block: block.name)
def test_every_block_names_its_language(block):
    assert block.language in LANGUAGES, (
        f"{block.name}: fence ```{block.language}: use one of {sorted(LANGUAGES)} so that it is clear what runs"
    )


def _headings(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _links(page: Path) -> list[tuple[int, str]]:
    found = []
    in_code = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            found += [(number, match["target"]) for match in LINK.finditer(line)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_resolve(page):
    for number, target in _links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{number}: link {target!r}"
        assert destination.is_relative_to(ROOT), f"{where} leaves the repository"
        assert destination.exists(), f"{where}: no such file"
        if fragment and destination.suffix == ".md":
            assert fragment in _headings(destination), f"{where}: no heading #{fragment} in {path or page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_named_paths_exist(page):
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        for match in REPO_PATH.finditer(line):
            path = match["path"].rstrip(".")
            where = f"{page.relative_to(ROOT)}:{number}"
            assert list(ROOT.glob(path)), f"{where}: names {path!r}, which is not in the repository"


@pytest.fixture
def one_thread():
    """The snippets are small: on one thread they run several times faster on a loaded shared
    machine than on competing OpenMP threads (same as tests/test_synthetic.py's training loops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.name)
def test_python_block_runs(block, tmp_path, monkeypatch, one_thread):
    if block.not_run_reason is not None:
        pytest.skip(f"marked not run: {block.not_run_reason}")
    missing = missing_modules(block)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed here; make test-integrations runs it)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace = {"__name__": "__snippet__"}
    # the source is readable as a file's would be (nnsight reads a trace's with-block back from it)
    linecache.cache[block.name] = (len(block.code), None, block.code.splitlines(keepends=True), block.name)
    with warnings.catch_warnings():
        if block.needs:  # the clients warn about their own deprecations on import and use
            warnings.simplefilter("default")
        exec(compile(block.code, block.name, "exec"), namespace)  # the snippet as a reader would paste it


def test_needs_marker(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- snippet: needs torch, flashsae_no_such_module.sub -->\n```python\nx = 1\n```\n\n"
        "<!-- snippet: needs torch -->\n```python\ny = 2\n```\n\n```python\nz = 3\n```\n"
    )
    first, second, third = fenced_blocks(page)
    assert first.needs == ("torch", "flashsae_no_such_module.sub") and second.needs == ("torch",)
    assert third.needs == () and third.not_run_reason is None
    assert missing_modules(first) == ["flashsae_no_such_module.sub"]
    assert missing_modules(second) == [] and missing_modules(third) == []
