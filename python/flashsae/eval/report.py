"""``flashsae report RUN_DIR``: one self-contained HTML file about a training run.

The page holds: the run's facts; per SAE a table of metrics (those measured at the end of training
from summary.json and those measured now by :func:`flashsae.eval.evaluate`); training curves from
metrics.jsonl and the latent-density histogram as inline SVG; and latent cards with their
top-activating contexts (the token highlighted, its activation shown), drawn by the page's own script
from a JSON block in the page (grouped, or sorted by density, maximum activation or id). The cards
show the strongest latents and latents spread over the density range, each labelled with its group
(flashsae.eval.examples.choose_latents). No external resource: the file opens anywhere, offline.

The tokens evaluated for the report are read from the start of the eval part of the run's dataset
(the documents training held out; --part, --dataset), and the page says which. A latent is dead when
it fires on none of those tokens: the one dead figure of the page, in the table and the histogram.
The training curve of idle latents is another measure, named as such: latents that did not fire in
the last dead_tokens training tokens (the set AuxK trains).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from .._version import __version__
from ..model_loading import resolve_device
from ..modules import SAE, load
from ..train.split import DEFAULT_EVAL_FRACTION
from .data import load_eval_model
from .evaluate import EvalConfig, EvalResult, evaluate
from ..hooks.replacement import REPLACEABLE
from .runs import RunRecords, read_run, sae_directories, source_settings
from .sites import trained_sites
from .svg import histogram_chart, line_chart

REPORT_FILE = "report.html"

#: Training curves whose values are fractions or percentages: their axis starts at 0.
ZERO_BASED_CURVES = frozenset({"dead_pct"})

#: (key, label, explanation, kind) of the metrics table, in display order; kind: 'pct' shows a
#: fraction as a percentage.
METRIC_ROWS = (
    ("explained_variance", "Explained variance", "1 − FVU over all evaluated tokens", "num"),
    ("fvu", "FVU", "Σ‖x − x̂‖² / Σ‖x − x̄‖²", "num"),
    ("mse", "MSE", "mean over tokens and dimensions of (x − x̂)²", "num"),
    ("cossim", "Cosine similarity", "mean cos(x, x̂)", "num"),
    ("shrinkage", "Shrinkage ‖x̂‖/‖x‖", "mean ratio of norms (below 1: shrunk)", "num"),
    ("relative_reconstruction_bias", "Relative reconstruction bias", "Σ‖x̂‖² / Σ x·x̂", "num"),
    ("l0", "L0", "mean active latents per token", "num"),
    ("l1", "L1", "mean sum of latent activations per token", "num"),
    ("dead_fraction", "Dead latents", "fired on none of the evaluated tokens", "pct"),
    ("dense_fraction", "Dense latents", "fire on more than the dense threshold of tokens", "pct"),
    ("ce_clean", "CE clean", "next-token cross-entropy of the model (nats)", "num"),
    ("ce_spliced", "CE spliced", "with the SAE's reconstruction in place", "num"),
    ("ce_ablation", "CE zero-ablation", "with the hookpoint zeroed", "num"),
    ("ce_loss_recovered", "CE loss recovered", "(CE ablation − CE spliced) / (CE ablation − CE clean)", "num"),
    ("kl_spliced", "KL spliced", "KL(clean ‖ spliced) of next-token distributions", "num"),
    ("kl_ablation", "KL zero-ablation", "KL(clean ‖ ablated)", "num"),
    ("embedding_cosine", "Pooled embedding cosine", "cos(clean, spliced) of the mean-pooled last hidden state", "num"),
    ("embedding_cosine_ablation", "Pooled cosine, zero-ablation", "cos(clean, ablated)", "num"),
    ("embedding_cosine_recovered", "Pooled cosine recovered", "(cos spliced − cos ablated) / (1 − cos ablated)", "num"),
)
TRAINING_CURVES = (
    ("explained_variance", "Explained variance"),
    ("l0", "L0 (active latents per token)"),
    ("dead_pct", "Idle latents in training (%)"),
    ("loss", "Training loss"),
)


@dataclass
class ReportSection:
    """One SAE of the run and its evaluation."""

    hookpoint: str
    path: Path
    sae: SAE
    evaluation: EvalResult
    cards: bool = True
    """Whether the section shows latent cards (a CLT's whole-unit section does not: its layers do)."""


def _format(value: Any, kind: str = "num") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return escape(str(value))
    if not math.isfinite(value):
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element ('<' escaped, so no '</script>' or '<!--' can occur)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def _facts(run: RunRecords, sections: list[ReportSection], settings: dict[str, Any]) -> str:
    summary, config = run.summary, run.config
    first = sections[0].sae.metadata if sections else {}
    rows = [
        ("Run directory", str(run.run_dir)),
        ("Model", first.get("model", config.get("model", "?"))),
        ("Trained on", first.get("dataset", config.get("dataset", "?"))),
        ("Architecture", ", ".join(sorted({s.sae.architecture for s in sections})) or "?"),
        ("Tokens trained (per SAE)", f"{summary['tokens']:,}" if "tokens" in summary else "?"),
        ("Optimizer steps", f"{summary['step']:,}" if "step" in summary else "?"),
        ("Training time", f"{summary['elapsed_s']:.1f} s" if "elapsed_s" in summary else "?"),
    ]
    if summary.get("interrupted"):
        rows.append(("Status", "interrupted (resume with flashsae train --resume)"))
    rows.append(("Report evaluated on", f"{settings['tokens']:,} tokens: {settings['data']}"))
    held_out = summary.get("evaluation") or {}
    if held_out:
        rows.append(("End-of-training metrics on", f"{held_out['tokens']:,} tokens: {held_out['split']}"))
    cells = "".join(f"<tr><th>{escape(name)}</th><td>{escape(str(value))}</td></tr>" for name, value in rows)
    return f'<table class="facts">{cells}</table>'


def _metrics_table(section: ReportSection, run: RunRecords) -> str:
    measured = section.evaluation.metrics
    trained = (
        (run.summary.get("metrics") or {}).get(section.hookpoint) or section.sae.metadata.get("final_metrics") or {}
    )
    rows = []
    for key, label, explanation, kind in METRIC_ROWS:
        if key not in measured:
            continue
        rows.append(
            f'<tr data-metric="{key}"><th title="{escape(explanation)}">{escape(label)}</th>'
            f"<td>{_format(measured[key], kind)}</td></tr>"
        )
    body = "".join(rows)
    table = f'<table class="metrics"><caption>Measured for this report ({section.evaluation.tokens:,} tokens)'
    table += f"</caption>{body}</table>"
    # the dead figure of the page is the report's own (above); the trainer's counts idle latents
    labels = {"explained_variance": "Explained variance", "fvu": "FVU", "l0": "L0"}
    cells = "".join(
        f"<tr><th>{escape(labels[key])}</th><td>{_format(value)}</td></tr>"
        for key, value in trained.items()
        if key in labels
    )
    if cells:
        held_out = run.summary.get("evaluation") or {}
        where = f"{held_out['tokens']:,} held-out tokens" if held_out else "held-out tokens"
        table += f'<table class="metrics"><caption>At the end of training ({where})</caption>{cells}</table>'
    return table


def _dead_definition(evaluation: EvalResult) -> str:
    return (
        f"Dead latents: fire on none of the {evaluation.tokens:,} evaluated tokens "
        f"({_format(evaluation.metrics.get('dead_fraction', math.nan), 'pct')} here)."
    )


def _histogram(section: ReportSection) -> str:
    histogram = section.evaluation.histogram
    n = len(section.evaluation.density)  # a CLT's whole-unit section: all its layers' latents
    note = f"dead: {histogram.dead} of {n} latents ({_format(histogram.dead / n, 'pct')})"
    return histogram_chart(
        histogram.edges,
        histogram.counts,
        title="Latent density",
        x_label="log10(fraction of tokens on which the latent fires)",
        y_label="latents",
        note=note,
    )


def _training_curves(run: RunRecords, hookpoints: list[str]) -> str:
    if not run.records:
        return '<p class="empty">No training records (metrics.jsonl is missing or empty).</p>'
    charts = []
    for metric, label in TRAINING_CURVES:
        series = {hookpoint: run.curve(hookpoint, metric) for hookpoint in hookpoints}
        if any(series.values()):
            chart = line_chart(
                series, title=label, x_label="tokens", y_label=label, y_from_zero=metric in ZERO_BASED_CURVES
            )
            charts.append(f"<figure>{chart}</figure>")
    dead_tokens = run.summary.get("dead_tokens") or run.config.get("dead_tokens")
    window = f"{dead_tokens:,}" if isinstance(dead_tokens, int) else "dead_tokens"
    note = (
        f'<p class="note">Idle latents in training: no firing in the last {window} training tokens (the latents '
        "AuxK trains). Not the dead-latent figure of the tables below, which counts latents that fire on none of "
        "the tokens evaluated for this report.</p>"
    )
    return f'<div class="charts">{"".join(charts)}</div>{note}'


def _cards(number: int, evaluation: EvalResult) -> str:
    return (
        f"<h3>Latents: the strongest, and a spread over the density range</h3>"
        f'<p class="note">{_dead_definition(evaluation)} Each card names its group: the strongest '
        "latents (highest activation on these tokens), or the density bucket it was drawn from.</p>"
        f'<div class="controls"><label>Order <select class="sort" data-section="{number}">'
        '<option value="group">by group</option><option value="density">by density</option>'
        '<option value="max_activation">by max activation</option>'
        '<option value="latent">by latent id</option></select></label></div>'
        f'<div class="latent-grid" data-section="{number}" data-expected="{len(evaluation.latents)}"></div>'
    )


def _layers_note(evaluation: EvalResult) -> str:
    return (
        f'<p class="note">{_dead_definition(evaluation)} The reconstruction and sparsity figures are the mean '
        f"over the {len(evaluation.sites)} layers below; the downstream ones have every layer spliced at once "
        "(the replacement model). Each layer's section has its own latent cards (ids within that layer).</p>"
    )


def render_report(run: RunRecords, sections: list[ReportSection], settings: dict[str, Any]) -> str:
    """The report page (a str of HTML). settings: 'tokens' and 'data' (the tokens in words) of the
    evaluation."""
    hookpoints = [section.hookpoint for section in sections]
    blocks = []
    data: dict[str, Any] = {"sections": []}
    for number, section in enumerate(sections):
        sae = section.sae
        evaluation = section.evaluation
        shape = f"{sae.architecture}, d_in={sae.d_in}, n_latents={sae.n_latents:,}"
        if sae.architecture in REPLACEABLE:
            shape += " per layer" if sae.architecture == "clt" else ""
        if getattr(sae.config, "k", None) is not None:
            shape += f", k={sae.config.k}"
        if evaluation.sites:
            shape += f"; {len(evaluation.sites)} layers, all spliced at once for the downstream metrics"
        elif section.hookpoint != evaluation.hookpoint:  # one layer (site) of a CLT or crosscoder
            target = f" -> {evaluation.target_hookpoint}" if evaluation.target_hookpoint else ""
            shape += f"; reads {evaluation.hookpoint}{target}"
        data["sections"].append(
            {"hookpoint": section.hookpoint, "latents": [latent.to_dict() for latent in evaluation.latents]}
        )
        blocks.append(
            f'<section class="sae" id="sae-{number}" data-hookpoint="{escape(section.hookpoint)}">'
            f"<h2>{escape(section.hookpoint)}</h2>"
            f'<p class="shape">{escape(shape)} &middot; <code>{escape(str(section.path))}</code></p>'
            f'<div class="columns"><div>{_metrics_table(section, run)}</div>'
            f"<figure>{_histogram(section)}</figure></div>"
            + (_cards(number, evaluation) if section.cards else _layers_note(evaluation))
            + "</section>"
        )
    title = f"flashsae report: {run.run_dir.name}"
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<header><h1>{escape(title)}</h1>",
            f'<p class="generated">Generated {datetime.now():%Y-%m-%d %H:%M} by flashsae {__version__}</p></header>',
            '<noscript><p class="empty">The latent cards are drawn by this page\'s script; enable JavaScript to see '
            "them.</p></noscript>",
            f"<section><h2>Run</h2>{_facts(run, sections, settings)}</section>",
            f"<section><h2>Training curves</h2>{_training_curves(run, hookpoints)}</section>",
            *blocks,
            f'<script type="application/json" id="flashsae-data">{_script_json(data)}</script>',
            f"<script>{SCRIPT}</script></body></html>",
        ]
    )


def _write_atomic(path: Path, text: str) -> None:
    """Writes a sibling temporary file (created by open(), so the umask sets its mode as for any
    file) and renames it over `path`: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    n_tokens: int = 16384,
    top_latents: int = 24,
    latent_selection: str = "spread",
    examples_per_latent: int = 5,
    dataset: str | None = None,
    part: str = "eval",
    eval_fraction: float | None = None,
    device: str = "auto",
    model_dtype: str | None = None,
    batch_size: int = 8,
    downstream: str = "auto",
    progress: bool = False,
    verify: bool = True,
) -> Path:
    """Evaluates every SAE of the run at `run_dir` on n_tokens tokens of the `part` (default: the
    eval part, held out from training) of its dataset (or `dataset`) and writes the report to `out`
    (default RUN_DIR/report.html). Returns the path written. The model, eval_fraction and settings
    come from each SAE's metadata (see flashsae.eval.runs). verify: check each SAE's sha256 on load."""
    run_path = Path(run_dir)
    paths = sae_directories(run_path)
    if paths == [run_path]:  # a single SAE folder: its run is the folder around it, if any
        run = read_run(run_path.parent) if (run_path.parent / "metrics.jsonl").exists() else RunRecords(run_path)
    else:
        run = read_run(run_path)
    torch_device = resolve_device(device)
    models: dict[tuple[str, str], tuple[Any, Any]] = {}
    sections = []
    used_dataset = None
    for path in paths:
        sae = load(path, device=torch_device, verify=verify)
        settings = source_settings(sae.metadata)
        missing = [key for key in ("model", "hookpoint") if key not in settings]
        if missing:
            raise ValueError(f"run_dir: the SAE in {path} records no {' or '.join(missing)} in its metadata")
        dtype = model_dtype or settings.get("model_dtype", "auto")
        key = (settings["model"], dtype)
        if key not in models:
            models[key] = load_eval_model(
                settings["model"],
                device=torch_device,
                model_dtype=dtype,
                head="none" if downstream in ("none", "embedding") else "auto",
                trust_remote_code=bool(settings.get("trust_remote_code", False)),
            )
        model, tokenizer = models[key]
        used_dataset = dataset or settings.get("dataset", "pydoc")
        options = EvalConfig(
            n_tokens=n_tokens,
            ctx_len=int(settings.get("ctx_len", EvalConfig.ctx_len)),
            batch_size=batch_size,
            downstream=downstream,
            exclude_special_tokens=bool(settings.get("exclude_special_tokens", True)),
            top_latents=top_latents,
            latent_selection=latent_selection,
            examples_per_latent=examples_per_latent,
            text_field=settings.get("text_field", "text"),
            dataset_split=settings.get("dataset_split", "train"),
            dataset_config=settings.get("dataset_config"),
            part=part,
            eval_fraction=settings.get("eval_fraction", DEFAULT_EVAL_FRACTION)
            if eval_fraction is None
            else eval_fraction,
            progress=progress,
        ).to_dict()
        if sae.architecture in REPLACEABLE:  # a CLT / crosscoder: its sites as flashsae train paired them
            inputs, options["target_hookpoint"] = trained_sites(sae, model)
            result = evaluate(sae, model, inputs, used_dataset, tokenizer=tokenizer, **options)
            unit = settings["hookpoint"]
            sections.append(ReportSection(unit, path, sae, result, cards=False))
            for label, site in zip(result.site_labels, result.sites, strict=True):
                sections.append(ReportSection(f"{unit}/{label}", path, sae, site))
            continue
        result = evaluate(sae, model, settings["hookpoint"], used_dataset, tokenizer=tokenizer, **options)
        sections.append(ReportSection(settings["hookpoint"], path, sae, result))
    tokens = min(section.evaluation.tokens for section in sections)
    html = render_report(run, sections, {"tokens": tokens, "data": sections[0].evaluation.data})
    target = Path(out) if out is not None else (run_path / REPORT_FILE)
    _write_atomic(target, html)
    return target


STYLE = """
:root { --ink: #1d232b; --muted: #5c6670; --line: #d9dee3; --paper: #ffffff; --tint: #f4f6f8; --hit: #ffd166; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1180px; padding: 24px; font: 15px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, sans-serif; color: var(--ink); background: var(--paper); }
h1 { font-size: 1.6rem; margin: 0 0 4px; } h2 { font-size: 1.25rem; margin: 28px 0 8px; border-bottom: 1px solid
  var(--line); padding-bottom: 4px; } h3 { font-size: 1.05rem; margin: 20px 0 8px; }
.generated, .shape, .empty, .note { color: var(--muted); }
table { border-collapse: collapse; margin: 0 0 12px; }
th, td { text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid var(--line); font-weight: normal; }
th { color: var(--muted); } td { font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
.columns { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
figure { margin: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: var(--paper); max-width: 100%; height: auto; font-family: inherit; }
svg .plot-area { fill: var(--tint); } svg .grid { stroke: #ffffff; stroke-width: 1; }
svg .tick { font-size: 10px; fill: var(--muted); } svg .axis-label { font-size: 11px; fill: var(--muted); }
svg .chart-title { font-size: 13px; font-weight: 600; fill: var(--ink); }
svg .legend, svg .note { font-size: 10px; fill: var(--ink); } svg .bar { fill: #0072B2; }
.controls { margin: 0 0 10px; color: var(--muted); }
.latent-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
.latent-card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: var(--paper);
  min-width: 0; }
.latent-card h4 { margin: 0; font-size: 1rem; } .latent-card .group { margin: 2px 0 0; font-size: 0.8rem;
  color: #0072B2; } .latent-card .stats { margin: 2px 0 8px; color: var(--muted);
  font-size: 0.85rem; }
.examples { list-style: none; margin: 0; padding: 0; }
.example { display: flex; gap: 8px; align-items: baseline; padding: 4px 0; border-top: 1px solid var(--tint); }
.context { flex: 1; min-width: 0; font: 12.5px/1.6 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  white-space: pre-wrap; word-break: break-all; }
.context .tok { color: #3a444e; }
.context mark.hit { background: var(--hit); color: #000; border-radius: 3px; padding: 0 1px; font-weight: 600; }
.activation { font: 12px ui-monospace, monospace; color: var(--muted); white-space: nowrap; }
"""

SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("flashsae-data").textContent);
  function visible(text) { return text.replace(/\\n/g, "\\u21b5").replace(/\\t/g, "\\u21e5"); }
  function percent(x) { return x >= 0.0001 ? (100 * x).toPrecision(3) + "%" : (100 * x).toExponential(1) + "%"; }
  function card(latent) {
    var article = document.createElement("article");
    article.className = "latent-card";
    article.dataset.latent = String(latent.latent);
    var title = document.createElement("h4");
    title.textContent = "Latent " + latent.latent;
    var group = document.createElement("p");
    group.className = "group";
    group.textContent = latent.group;
    var stats = document.createElement("p");
    stats.className = "stats";
    stats.textContent = "fires on " + percent(latent.density) + " of tokens \\u00b7 max activation " +
      latent.max_activation.toPrecision(4);
    var list = document.createElement("ol");
    list.className = "examples";
    latent.examples.forEach(function (example) {
      var item = document.createElement("li");
      item.className = "example";
      var context = document.createElement("span");
      context.className = "context";
      example.tokens.forEach(function (token, index) {
        var span = document.createElement(index === example.highlight ? "mark" : "span");
        span.className = index === example.highlight ? "hit" : "tok";
        span.textContent = visible(token);
        if (index === example.highlight) { span.title = "activation " + example.activation.toPrecision(4); }
        context.appendChild(span);
      });
      var value = document.createElement("span");
      value.className = "activation";
      value.textContent = example.activation.toPrecision(4);
      item.appendChild(context);
      item.appendChild(value);
      list.appendChild(item);
    });
    article.appendChild(title);
    article.appendChild(group);
    article.appendChild(stats);
    article.appendChild(list);
    return article;
  }
  var orders = {
    group: function (a, b) { return a.order - b.order; },
    density: function (a, b) { return b.density - a.density || a.latent - b.latent; },
    max_activation: function (a, b) { return b.max_activation - a.max_activation || a.latent - b.latent; },
    latent: function (a, b) { return a.latent - b.latent; }
  };
  function render(grid, order) {
    var latents = data.sections[Number(grid.dataset.section)].latents.map(function (latent, index) {
      return Object.assign({order: index}, latent);
    }).sort(orders[order]);
    grid.replaceChildren.apply(grid, latents.map(card));
    if (!latents.length) {
      var empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = "No latent cards: none fired on the evaluated tokens, or none were asked for.";
      grid.appendChild(empty);
    }
  }
  document.querySelectorAll(".latent-grid").forEach(function (grid) {
    render(grid, "group");
    var select = document.querySelector('select.sort[data-section="' + grid.dataset.section + '"]');
    select.addEventListener("change", function () { render(grid, select.value); });
  });
  var cards = document.querySelectorAll(".latent-card");
  var shown = 0;
  cards.forEach(function (c) {
    var box = c.getBoundingClientRect();
    if (box.width > 0 && box.height > 0) { shown++; }
  });
  document.body.dataset.cardsRendered = String(cards.length);
  document.body.dataset.cardsVisible = String(shown);
})();
"""
