"""``flashsae report``: one self-contained HTML file for a real (tiny) training run, loaded in a real
headless browser (Debian's chromium, which .ci/run installs): the page's script draws every latent
card, each with its top-activating contexts, the token highlighted and its activation; hostile token
text stays text. Plus the SVG helpers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import flashsae
from flashsae.eval import EvalResult, Example, LatentExamples
from flashsae.eval.examples import choose_latents, density_bucket
from flashsae.eval.metrics import density_histogram
from flashsae.eval.report import ReportSection, render_report
from flashsae.eval.runs import RunRecords, read_run
from flashsae.eval.svg import histogram_chart, line_chart, nice_ticks
from flashsae.train import TrainConfig, Trainer
from test_eval_cli import main
from train_helpers import tiny_gpt2

HOOKS = ["h.1", "h.2"]
TOP, EXAMPLES = 6, 3
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# what the probe of this machine kind found chromium needs here: no sandbox as root, no GPU, and no
# background networking (the network is closed; without these flags it retries connections)
BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        if os.environ.get("FLASHSAE_REQUIRE_BROWSER"):
            pytest.fail("FLASHSAE_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    return found


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM after the page loaded and its script ran, as chromium serializes it."""
    command = [browser(), *BROWSER_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"]
    done = subprocess.run(
        [*command, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.classes()):
                    found.append(child)
                found.extend(child.find_all(tag, cls))
        return found


class TreeBuilder(HTMLParser):
    """A small DOM from HTML text (the standard library has no HTML tree)."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    return builder.root


def visible(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5")


def precision4(value: float) -> str:
    """JavaScript's Number.prototype.toPrecision(4) for the values in these tests."""
    exponent = math.floor(math.log10(abs(value)))
    return f"{value:.{max(3 - exponent, 0)}f}" if -7 < exponent < 4 else f"{value:.3e}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run: two TopK SAEs trained for 12 steps on a tiny GPT-2 over Python's own docs."""
    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(
        model=str(tiny_gpt2()), hookpoints=HOOKS, dataset="pydoc", ctx_len=24, model_batch_size=8, device="cpu",
        k=6, batch_size=96, buffer_tokens=768, train_tokens=96 * 12, log_every=3, eval_tokens=192,
        checkpoint_every=0, progress=False, tensorboard=False, out=str(out),
    )  # fmt: skip
    Trainer(config).train()
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    target = run_dir / "report.html"
    argv = ["report", str(run_dir), "--n-tokens", "600", "--top-latents", str(TOP), "--examples", str(EXAMPLES)]
    assert main([*argv, "--no-progress"]) == 0
    return target


def page_data(html: str) -> dict:
    tree = parse(html)
    (script,) = [node for node in tree.find_all("script") if node.attrs.get("id") == "flashsae-data"]
    return json.loads(script.text())


def test_report_is_one_self_contained_file(report, run_dir):
    html = report.read_text(encoding="utf-8")
    assert report.parent == run_dir and report.stat().st_size < 400_000
    lowered = html.lower()
    # nothing to fetch: no external scripts, stylesheets, images or fonts
    for needle in ("<link", "src=", "@import", "url(", "http://", "https://"):
        assert needle not in lowered.replace('xmlns="http://www.w3.org/2000/svg"', ""), needle
    tree = parse(html)
    charts = tree.find_all("svg", "chart")
    titles = [chart.find_all("text", "chart-title")[0].text() for chart in charts]
    assert titles == [
        "Explained variance", "L0 (active latents per token)", "Idle latents in training (%)", "Training loss",
        "Latent density", "Latent density",
    ]  # fmt: skip
    # a percentage axis starts at 0, even when every value is 0 (it ran from -1 to 1)
    idle_ticks = [float(tick.text()) for tick in charts[2].find_all("text", "tick")[:3]]
    assert idle_ticks[0] == 0 and all(tick >= 0 for tick in idle_ticks)
    # every training curve has one line per hookpoint, with as many points as metrics.jsonl has records
    records = read_run(run_dir).records
    for chart in charts[:4]:
        lines = chart.find_all("polyline")
        assert [line.text() for line in lines] == HOOKS  # the hookpoints as the run records them
        assert all(len(line.attrs["points"].split()) == len(records) for line in lines)
    # the histogram's bars add up to the alive latents; the note counts the dead ones
    data = page_data(html)
    assert [section["hookpoint"] for section in data["sections"]] == HOOKS
    for section in data["sections"]:
        assert len(section["latents"]) == TOP
        assert all(1 <= len(latent["examples"]) <= EXAMPLES for latent in section["latents"])
    metric_rows = tree.find_all("tr")
    assert any(row.attrs.get("data-metric") == "ce_loss_recovered" for row in metric_rows)


def test_report_reads_the_held_out_part_and_says_so(report, run_dir):
    tree = parse(report.read_text(encoding="utf-8"))
    rows = tree.find_all("table", "facts")[0].find_all("tr")
    facts = {row.find_all("th")[0].text(): row.find_all("td")[0].text() for row in rows}
    summary = json.loads((run_dir / "summary.json").read_text())
    held_out = summary["evaluation"]
    assert facts["Report evaluated on"] == "600 tokens: pydoc, eval part (10% of documents, by text hash)"
    assert facts["End-of-training metrics on"] == f"{held_out['tokens']:,} tokens: {held_out['split']}"
    assert summary["evaluation"]["split"] == "eval part (10% of documents, by text hash)"


def test_one_dead_latent_figure(report):
    """The metrics table, the histogram's note and the cards' note give the same dead figure, under
    one definition; the end-of-training table (the trainer's idle counters) shows none."""
    tree = parse(report.read_text(encoding="utf-8"))
    for section in tree.find_all("section", "sae"):
        dead_row = [row for row in section.find_all("tr") if row.attrs.get("data-metric") == "dead_fraction"]
        figure = dead_row[0].find_all("td")[0].text()
        assert figure.endswith("%")
        (note,) = section.find_all("text", "note")
        assert note.text().endswith(f"latents ({figure})")
        dead, n = (int(word) for word in note.text().split()[1:4:2])
        assert f"{100 * dead / n:.2f}%" == figure
        assert f"fire on none of the 600 evaluated tokens ({figure} here)" in section.text()
        trained = [table for table in section.find_all("table", "metrics") if "end of training" in table.text()]
        assert trained and "Dead" not in trained[0].text() and "L0" in trained[0].text()


def test_latent_cards_render_in_a_real_browser(report, tmp_path):
    data = page_data(report.read_text(encoding="utf-8"))
    dom = parse(dump_dom(report, tmp_path / "profile"))
    (body,) = dom.find_all("body")
    expected = sum(len(section["latents"]) for section in data["sections"])
    # the page's script ran: it drew the cards and measured them laid out with a non-empty box
    assert body.attrs.get("data-cards-rendered") == str(expected) == body.attrs.get("data-cards-visible")
    grids = dom.find_all("div", "latent-grid")
    assert len(grids) == len(data["sections"])
    for grid, section in zip(grids, data["sections"], strict=True):
        cards = grid.find_all("article", "latent-card")
        latents = section["latents"]  # drawn in group order: the strongest, then density buckets
        assert [card.attrs["data-latent"] for card in cards] == [str(latent["latent"]) for latent in latents]
        groups = [latent["group"] for latent in latents]
        assert groups[: TOP // 4] == ["strongest"] * (TOP // 4)
        assert all(latent["group"] == density_bucket(latent["density"]) for latent in latents[TOP // 4 :])
        assert len(set(groups[TOP // 4 :])) >= 2, "the cards span more than one density decade"
        for card, latent in zip(cards, latents, strict=True):
            assert card.find_all("h4")[0].text() == f"Latent {latent['latent']}"
            assert card.find_all("p", "group")[0].text() == latent["group"]
            assert "fires on" in card.find_all("p", "stats")[0].text()
            items = card.find_all("li", "example")
            assert len(items) == len(latent["examples"]) >= 1
            for item, example in zip(items, latent["examples"], strict=True):
                (hit,) = item.find_all("mark", "hit")
                assert hit.text() == visible(example["tokens"][example["highlight"]])
                assert hit.attrs["title"] == f"activation {precision4(example['activation'])}"
                context = item.find_all("span", "context")[0]
                assert context.text() == "".join(visible(token) for token in example["tokens"])
                assert item.find_all("span", "activation")[0].text() == precision4(example["activation"])
    assert len(dom.find_all("svg")) == 6


def _section(tokens: list[str]) -> ReportSection:
    sae = flashsae.create("topk", d_in=8, n_latents=16, k=2)
    density = torch.zeros(16, dtype=torch.float64)
    density[3] = 0.25
    evaluation = EvalResult(
        hookpoint="layer<1>",
        target_hookpoint=None,
        architecture="topk",
        tokens=4,
        downstream="none",
        metrics={"explained_variance": 0.5, "l0": 2.0, "dead_fraction": 15 / 16},
        density=density,
        histogram=density_histogram(density, 4, bins=4),
        latents=[LatentExamples(3, 0.25, 1.5, [Example(1.5, tokens, 1)])],
    )
    return ReportSection("layer<1>", Path("sae"), sae, evaluation)


def test_hostile_token_text_stays_text(tmp_path):
    tokens = ["a</script><img src=x id=injected>", "<b id=bold>hit</b>", "\n& done"]
    page = tmp_path / "page.html"
    page.write_text(render_report(RunRecords(tmp_path), [_section(tokens)], {"tokens": 4, "data": "x"}))
    dom = parse(dump_dom(page, tmp_path / "profile"))
    assert not [node for node in dom.find_all() if node.attrs.get("id") in ("injected", "bold")]
    (card,) = dom.find_all("article", "latent-card")
    assert card.find_all("span", "context")[0].text() == "".join(visible(token) for token in tokens)
    assert card.find_all("mark", "hit")[0].text() == "<b id=bold>hit</b>"
    (section,) = dom.find_all("section", "sae")
    assert section.attrs["data-hookpoint"] == "layer<1>" and section.find_all("h2")[0].text() == "layer<1>"


def test_report_of_a_run_without_records(tmp_path):
    html = render_report(RunRecords(tmp_path), [_section(["x", "y"])], {"tokens": 4, "data": "x"})
    assert "No training records" in html and html.count("<svg") == 1


def test_svg_helpers():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(1024, 5120) == pytest.approx([1000 * i for i in range(2, 6)])
    assert nice_ticks(-3.7, 0) == pytest.approx([-3, -2, -1, 0])
    for low, high in [(0.5, 0.5), (1e-6, 3e-6), (-2.0, 7.5)]:
        ticks = nice_ticks(low, high)
        step = ticks[1] - ticks[0]
        assert 3 <= len(ticks) <= 11 and ticks == sorted(ticks)
        assert ticks[0] - step < low and ticks[-1] + step > high  # the ticks span the range
    assert "no data" in line_chart({"a": [(1.0, float("nan"))]}, title="t", x_label="x", y_label="y")
    chart = line_chart({"a": [(0, 1), (1, 2)], "b": [(0, 2)]}, title="t", x_label="x", y_label="y")
    assert chart.count("<polyline") == 2 and chart.count("<circle") == 1
    with pytest.raises(ValueError, match=r"edges: expected len\(counts\) \+ 1 = 3 edges, got 2"):
        histogram_chart([0, 1], [1, 2], title="t", x_label="x", y_label="y")
    bars = histogram_chart([0, 1, 2, 3], [1, 0, 4], title="t", x_label="x", y_label="y", note="n")
    assert bars.count('class="bar"') == 2


def test_line_chart_from_zero():
    flat = line_chart({"a": [(0, 0.0), (1, 0.0)]}, title="t", x_label="x", y_label="y", y_from_zero=True)
    ticks = [float(node.text()) for node in parse(flat).find_all("text", "tick")]
    assert min(ticks) == 0 and max(ticks) == 1  # not -1 to 1
    rising = line_chart({"a": [(0, 3.0), (1, 7.0)]}, title="t", x_label="x", y_label="y", y_from_zero=True)
    assert parse(rising).find_all("text", "tick")[0].text() == "0"


def test_choose_latents_spreads_over_density():
    n = 400
    density = torch.zeros(n, dtype=torch.float64)
    density[:100] = torch.logspace(-5, -0.5, 100, dtype=torch.float64)  # 100 alive latents over 4.5 decades
    strength = torch.full((n,), float("-inf"))
    strength[:100] = torch.rand(100, generator=torch.Generator().manual_seed(0))
    chosen = choose_latents(density, strength, 12)
    latents = [latent for latent, _ in chosen]
    assert len(set(latents)) == 12 and all(density[latent] > 0 for latent in latents)
    strongest = [latent for latent, group in chosen if group == "strongest"]
    assert strongest == sorted(range(100), key=lambda i: -float(strength[i]))[:3]
    spread = [(latent, group) for latent, group in chosen if group != "strongest"]
    assert all(group == density_bucket(float(density[latent])) for latent, group in spread)
    decades = {group for _, group in spread}
    assert len(decades) == 5  # every decade from 0.001%-0.01% to 10%-100% gets cards
    assert density_bucket(0.36) == "fires on 10%-100% of tokens"
    assert density_bucket(0.0002) == "fires on 0.01%-0.1% of tokens"
    busiest = choose_latents(density, strength, 5, "busiest")
    assert [latent for latent, _ in busiest] == [99, 98, 97, 96, 95]
    assert len(choose_latents(density, strength, 500)) == 100  # never a dead latent
    with pytest.raises(ValueError, match="latent_selection: expected one of spread, busiest"):
        choose_latents(density, strength, 3, "random")
