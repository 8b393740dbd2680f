"""evaluate(): an SAE on a model's activations, with its reconstruction, sparsity and downstream
metrics, in one pass over the data (definitions: :mod:`.metrics` and :mod:`.downstream`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import boolean, fraction, non_negative_int, positive_int
from ..hookpoints import resolve_hookpoint
from ..hooks import ablate, capture, splice
from ..hooks._base import check_model, check_sae, decode
from ..hooks.replacement import REPLACEABLE
from ..modules import SAE
from ..train.split import DEFAULT_EVAL_FRACTION, CorpusPart
from .data import TokenBatch, token_batches
from .downstream import DOWNSTREAM_KINDS, CausalLMStats, EmbeddingStats, model_kind
from .examples import LATENT_SELECTIONS, LatentExamples, TopExamples, choose_latents
from .metrics import DensityHistogram, ReconstructionStats, density_histogram


@dataclass
class EvalConfig:
    """Settings of :func:`evaluate` (keyword arguments) and ``flashsae eval``."""

    n_tokens: int = 32768
    """Tokens to evaluate (fewer if the data runs out): real tokens, special tokens excluded unless
    exclude_special_tokens is False."""
    target_hookpoint: str | list[str] | None = None
    """For a transcoder: the hookpoint it predicts (its input is `hookpoint`); for a cross-layer
    transcoder: its target sites (module paths or globs, one module per layer). None: the SAE
    reconstructs `hookpoint` itself."""
    ctx_len: int = 128
    """Tokens per context when the data is text (packed as flashsae train packs it)."""
    batch_size: int = 8
    """Contexts per model forward pass."""
    downstream: str = "auto"
    """Downstream metrics: 'causal_lm' (CE loss recovered, KL; needs logits), 'embedding' (cosine
    of the pooled last hidden state), 'none', or 'auto' (causal_lm for a transformers causal LM,
    embedding for another transformers model, none otherwise). With 'none' each forward stops
    after the hookpoint."""
    exclude_special_tokens: bool = True
    """Leave special tokens ([CLS], [SEP], BOS, EOS...) out of the metrics, and out of the splice,
    as flashsae train leaves them out of training (their norms are outliers). Needs the tokenizer."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of the tokens counts as dense."""
    histogram_bins: int = 40
    """Bins of the log10 latent-density histogram."""
    top_latents: int = 0
    """Collect top-activating examples of this many latents, chosen by latent_selection (0: none)."""
    latent_selection: str = "spread"
    """Which latents get examples: spread (a quarter the strongest by maximum activation, the rest
    spread over decade buckets of density; see flashsae.eval.examples) or busiest (the most
    frequently firing)."""
    examples_per_latent: int = 5
    """Top-activating examples kept per latent when top_latents > 0."""
    text_field: str = "text"
    """Field holding the text in JSONL records and Hugging Face datasets."""
    dataset_split: str = "train"
    """Split of a Hugging Face dataset."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset."""
    part: str = "eval"
    """Which documents of a dataset given by name are evaluated: eval (the part flashsae train held
    out), train or all (flashsae.train.split). Texts and token ids given directly are used as given."""
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    """The share of documents in the eval part: the eval_fraction the SAE was trained with."""
    progress: bool = False
    """Show a progress bar (tokens)."""

    def __post_init__(self) -> None:
        positive_int("n_tokens", self.n_tokens)
        target = self.target_hookpoint
        if isinstance(target, (list, tuple)):
            if not target or not all(isinstance(t, str) and t for t in target):
                raise ValueError(f"target_hookpoint: expected module paths, got {self.target_hookpoint!r}")
            self.target_hookpoint = list(target)
        elif target is not None and (not isinstance(target, str) or not target):
            raise ValueError(f"target_hookpoint: expected a module path or None, got {self.target_hookpoint!r}")
        positive_int("ctx_len", self.ctx_len)
        if self.ctx_len < 2:
            raise ValueError(f"ctx_len: expected at least 2 tokens, got {self.ctx_len}")
        positive_int("batch_size", self.batch_size)
        if self.downstream not in DOWNSTREAM_KINDS:
            raise ValueError(f"downstream: expected one of {', '.join(DOWNSTREAM_KINDS)}, got {self.downstream!r}")
        for name in ("exclude_special_tokens", "progress"):
            boolean(name, getattr(self, name))
        fraction("dense_threshold", self.dense_threshold, low_open=True)
        positive_int("histogram_bins", self.histogram_bins)
        non_negative_int("top_latents", self.top_latents)
        if self.latent_selection not in LATENT_SELECTIONS:
            raise ValueError(
                f"latent_selection: expected one of {', '.join(LATENT_SELECTIONS)}, got {self.latent_selection!r}"
            )
        positive_int("examples_per_latent", self.examples_per_latent)
        CorpusPart(self.part, self.eval_fraction)  # checks both

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    """What :func:`evaluate` measured."""

    hookpoint: str
    """The module path the SAE reads (resolved on the model)."""
    target_hookpoint: str | None
    """The module path a transcoder predicts (None for an SAE)."""
    architecture: str
    """The SAE's registered architecture name."""
    tokens: int
    """Tokens evaluated."""
    downstream: str
    """Which downstream metrics were measured: causal_lm, embedding or none."""
    metrics: dict[str, float]
    """Scalar metrics by name (see flashsae.eval.metrics and flashsae.eval.downstream)."""
    density: torch.Tensor
    """[n_latents] float64 (CPU): fraction of the tokens on which each latent fired."""
    histogram: DensityHistogram
    """log10 latent-density histogram of the latents that fired; dead ones counted apart."""
    latents: list[LatentExamples] = field(default_factory=list)
    """With top_latents > 0: the chosen latents (see latent_selection), each with its group and its
    top-activating examples."""
    config: dict[str, Any] = field(default_factory=dict)
    """The EvalConfig it ran with."""
    data: str = ""
    """The tokens evaluated in words: for a dataset, its name and part (e.g. 'pydoc, eval part (10%
    of documents, by text hash)'); else what was given."""
    sites: list[EvalResult] = field(default_factory=list)
    """A cross-layer transcoder's layers (a crosscoder's sites), each evaluated as an SAE: its input
    (hookpoint), its target, reconstruction metrics of that target, its own latents' sparsity,
    density and examples (flashsae.eval.sites). Empty for an SAE."""
    site_labels: list[str] = field(default_factory=list)
    """Names of `sites` as flashsae train records them: layer0, layer1, ... (CLT), site0, ... (crosscoder)."""

    def to_dict(self, *, density: bool = False) -> dict[str, Any]:
        """JSON-ready; the per-latent density list only when asked (n_latents floats)."""
        record: dict[str, Any] = {
            "hookpoint": self.hookpoint,
            "target_hookpoint": self.target_hookpoint,
            "architecture": self.architecture,
            "tokens": self.tokens,
            "downstream": self.downstream,
            "metrics": {name: _json_float(value) for name, value in self.metrics.items()},
            "histogram": self.histogram.to_dict(),
            "latents": [latent.to_dict() for latent in self.latents],
            "config": self.config,
            "data": self.data,
        }
        if self.sites:
            record["sites"] = [
                {"site": label, **site.to_dict(density=density)}
                for label, site in zip(self.site_labels, self.sites, strict=True)
            ]
        if density:
            record["density"] = self.density.tolist()
        return record


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode (BatchTopK's inference threshold, no dropout) for the duration, then restored."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def _max_positions(model: nn.Module) -> int | None:
    """The longest sequence a transformers model takes (absolute position embeddings), if it says."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def evaluate(
    sae: SAE,
    model: nn.Module,
    hookpoint: str | list[str],
    data: Any,
    n_tokens: int = EvalConfig.n_tokens,
    *,
    tokenizer: Any = None,
    **options: Any,
) -> EvalResult:
    """Evaluates `sae` at `hookpoint` of `model` on `data`.

        result = flashsae.eval.evaluate(sae, model, "transformer.h.3", "pydoc", n_tokens=65536, tokenizer=tok)
        result.metrics["explained_variance"], result.metrics["ce_loss_recovered"]

    Args:
        sae: any flashsae SAE (padded variable-count latents included) or a transcoder (then pass
            target_hookpoint, unless it predicts its own input).
        model: a torch model, usually a transformers one (a causal LM for the CE metrics: load it
            with AutoModelForCausalLM, or with :func:`flashsae.eval.data.load_eval_model`).
        hookpoint: module path (the base model's prefix is optional). For a cross-layer transcoder
            (its targets in target_hookpoint) or a crosscoder: its input sites, module paths or
            globs; evaluated by :func:`flashsae.eval.sites.evaluate_sites` (per-layer metrics in
            ``result.sites``, downstream with the whole replacement model spliced).
        data: text or tokens, see :func:`flashsae.eval.data.token_batches`.
        n_tokens: tokens to evaluate.
        tokenizer: needed for text data and to recognize special tokens.
        options: fields of :class:`EvalConfig`.

    The SAE and the model are put in eval mode for the run and restored after; everything runs
    under ``torch.inference_mode``. Definitions of every metric: :mod:`flashsae.eval.metrics` and
    :mod:`flashsae.eval.downstream` (SAELens' where they overlap).
    """
    check_sae("sae", sae)
    check_model(model)
    config = EvalConfig(n_tokens=n_tokens, **options)
    if sae.architecture in REPLACEABLE:
        # imported here: flashsae.eval.sites builds on this module's helpers
        from .sites import evaluate_sites

        return evaluate_sites(sae, model, hookpoint, data, config, tokenizer)
    if not isinstance(hookpoint, str) or isinstance(config.target_hookpoint, list):
        raise ValueError(
            f"hookpoint: a {sae.architecture} reads one module; lists of sites are for a clt or a crosscoder"
        )
    in_path = resolve_hookpoint(model, hookpoint)
    out_path = None
    if config.target_hookpoint is not None:
        out_path = resolve_hookpoint(model, config.target_hookpoint, "target_hookpoint")
    kind = model_kind(model) if config.downstream == "auto" else config.downstream
    positions = _max_positions(model)
    texts = isinstance(data, (list, tuple)) and bool(data) and all(isinstance(t, str) for t in data)
    is_text = isinstance(data, str) or texts
    if positions is not None and config.ctx_len > positions and is_text:
        raise ValueError(f"ctx_len: {config.ctx_len} is more than the {positions} positions the model takes")
    device = _device_of(model)
    batches = token_batches(
        data,
        tokenizer=tokenizer,
        n_tokens=config.n_tokens,
        ctx_len=config.ctx_len,
        batch_size=config.batch_size,
        exclude_special_tokens=config.exclude_special_tokens,
        device=device,
        text_field=config.text_field,
        dataset_split=config.dataset_split,
        dataset_config=config.dataset_config,
        part=config.part,
        eval_fraction=config.eval_fraction,
    )
    stats = ReconstructionStats(sae.n_latents, sae.device)
    downstream = {"causal_lm": CausalLMStats, "embedding": EmbeddingStats}.get(kind, lambda: None)()
    collector = TopExamples(sae.n_latents, config.examples_per_latent, sae.device) if config.top_latents else None
    read = [in_path] if out_path is None else [in_path, out_path]
    splice_key = in_path if out_path is None else (in_path, out_path)
    bar = tqdm(total=config.n_tokens, unit="tok", disable=not config.progress, dynamic_ncols=True)
    with _eval_mode(sae, model), torch.inference_mode():
        try:
            for batch in batches:
                _evaluate_batch(sae, model, batch, read, splice_key, kind, stats, downstream, collector)
                bar.update(int(batch.keep.sum()))
        finally:
            bar.close()
    if stats.tokens == 0:
        raise ValueError("data: yields no tokens to evaluate (besides padding and special tokens)")
    metrics = stats.finalize(config.dense_threshold)
    if downstream is not None:
        metrics.update(downstream.finalize())
    density = stats.density().cpu()
    latents: list[LatentExamples] = []
    if collector is not None:
        chosen = choose_latents(density, collector.max_activation(), config.top_latents, config.latent_selection)
        latents = collector.examples(chosen, density, tokenizer)
    return EvalResult(
        hookpoint=in_path,
        target_hookpoint=out_path,
        architecture=sae.architecture,
        tokens=stats.tokens,
        downstream=kind,
        metrics=metrics,
        density=density,
        histogram=density_histogram(density, stats.tokens, config.histogram_bins),
        latents=latents,
        config=config.to_dict(),
        data=_describe_data(data, config),
    )


def _describe_data(data: Any, config: EvalConfig) -> str:
    if isinstance(data, str):
        return f"{data}, {CorpusPart(config.part, config.eval_fraction).describe()}"
    if isinstance(data, torch.Tensor):
        return f"token ids {list(data.shape)}"
    if isinstance(data, (list, tuple)):
        return f"{len(data)} texts"
    return "the given batches"


def _evaluate_batch(
    sae: SAE,
    model: nn.Module,
    batch: TokenBatch,
    read: list[str],
    splice_key: str | tuple[str, str],
    kind: str,
    stats: ReconstructionStats,
    downstream: CausalLMStats | EmbeddingStats | None,
    collector: TopExamples | None,
) -> None:
    keep = batch.keep
    if not bool(keep.any()):
        return
    # a clean forward that records the hookpoint(s); without downstream metrics it stops there
    with capture(model, read, stop=downstream is None) as acts:
        clean = model(**batch.inputs)
    x = acts[read[0]][keep.to(acts[read[0]].device)].to(sae.device)
    target = x if len(read) == 1 else acts[read[1]][keep.to(acts[read[1]].device)].to(sae.device)
    latents = sae.encode(x)
    reconstruction = decode(sae, latents, x)
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"target_hookpoint: the SAE predicts width {reconstruction.shape[-1]}, "
            f"but {read[-1]} has width {target.shape[-1]}"
        )
    stats.update(target, reconstruction, latents)
    if collector is not None:
        offset = collector.add_batch(batch.input_ids, batch.attention_mask)
        token_ids = offset + keep.flatten().nonzero().squeeze(-1)
        collector.update(latents, token_ids)
    if downstream is None:
        return
    with splice(model, {splice_key: sae}, mask=keep):
        spliced = model(**batch.inputs)
    with ablate(model, read[-1], mask=keep):
        ablated = model(**batch.inputs)
    outputs = {"clean": clean, "spliced": spliced, "ablation": ablated}
    downstream.update(outputs, batch)
