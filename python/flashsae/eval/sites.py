"""Evaluating a cross-layer transcoder or a crosscoder: every layer (site) as an SAE, and the
downstream metrics with the whole replacement model spliced (all layers together).

Per batch: one clean forward captures every input and target site; the CLT encodes each layer's
clean input and predicts each layer's clean target (``clt.decode(clt.encode(x), x)``: target j from
the clean latents of layers <= j), and each layer's reconstruction metrics are taken against its
target, its sparsity and density over its own dictionary (:mod:`flashsae.eval.metrics`, as for an
SAE; a crosscoder's sites share one dictionary, so their sparsity figures are the same). The
downstream forwards (:mod:`flashsae.eval.downstream`) are the replacement model
(:class:`flashsae.hooks.replacement`: every target predicted by the CLT from the inputs of the
spliced model as it runs, no error term) and the model with every target zero-ablated, both at the
evaluated tokens only.

The unit's own figures (``result.metrics``) are the mean over its layers of each reconstruction and
sparsity metric (each target counts alike, as in flashsae train's summary), plus the downstream ones;
``result.density`` concatenates the layers' densities (L * n_latents latents).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hookpoints import resolve_hookpoints
from ..hooks import ablate, capture
from ..hooks.replacement import replacement
from ..modules import SAE
from ..outputs import SparseLatents
from ..train.sites import plan_units
from .data import TokenBatch, token_batches
from .downstream import CausalLMStats, EmbeddingStats, model_kind
from .evaluate import EvalConfig, EvalResult, _describe_data, _device_of, _eval_mode, _max_positions
from .examples import TopExamples, choose_latents
from .metrics import ReconstructionStats, density_histogram


def _paths(model: nn.Module, patterns: str | Sequence[str] | None, argument: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{argument}: expected module paths or globs naming the sites, got {patterns!r}")
    return resolve_hookpoints(model, list(patterns))


def trained_sites(sae: SAE, model: nn.Module) -> tuple[list[str], list[str] | None]:
    """(input sites, target sites or None) of a CLT or crosscoder saved by flashsae train, resolved
    on `model` as the trainer paired them (its --hookpoints and --targets, flashsae.train.sites).
    ValueError when its metadata records none (one trained from an activation cache, or hand-made)."""
    trained = sae.metadata.get("train_config") or {}
    if not trained.get("hookpoints"):
        raise ValueError(f"hookpoint: the {sae.architecture} records no sites in its metadata; pass them (--hookpoint)")
    patterns = list(trained["hookpoints"]) + list(trained.get("targets") or [])
    prefix = getattr(model, "base_model_prefix", "") or ""
    units = plan_units(
        sae.architecture, resolve_hookpoints(model, patterns), trained["hookpoints"], trained.get("targets"), prefix
    )
    unit = next(iter(units.values()))
    return list(unit.inputs), list(unit.targets) if unit.targets else None


def site_labels(sae: SAE) -> list[str]:
    """layer0..layer{L-1} for a CLT, site0.. for a crosscoder (flashsae train's record names)."""
    if sae.architecture == "clt":
        return [f"layer{i}" for i in range(sae.n_layers)]
    return [f"site{i}" for i in range(sae.n_sites)]


def evaluate_sites(
    sae: SAE, model: nn.Module, inputs: str | Sequence[str], data: Any, config: EvalConfig, tokenizer: Any = None
) -> EvalResult:
    """Evaluates a CLT (inputs: its input sites; config.target_hookpoint: its targets) or a
    crosscoder (inputs: its sites) on `data` (module docstring); see :func:`flashsae.eval.evaluate`."""
    is_clt = sae.architecture == "clt"
    in_paths = _paths(model, inputs, "hookpoint")
    count = sae.n_layers if is_clt else sae.n_sites
    if len(in_paths) != count:
        raise ValueError(
            f"hookpoint: names {len(in_paths)} modules ({', '.join(in_paths)}); the {sae.architecture} has {count} "
            f"{'layers' if is_clt else 'sites'}"
        )
    if is_clt:
        if config.target_hookpoint is None:
            raise ValueError("target_hookpoint: a clt needs its target sites (the modules whose outputs it predicts)")
        out_paths = _paths(model, config.target_hookpoint, "target_hookpoint")
        if len(out_paths) != count:
            raise ValueError(
                f"target_hookpoint: names {len(out_paths)} modules ({', '.join(out_paths)}); the clt has {count} layers"
            )
    elif config.target_hookpoint is not None:
        raise ValueError("target_hookpoint: a crosscoder reconstructs its own sites; leave it None")
    else:
        out_paths = list(in_paths)
    kind = model_kind(model) if config.downstream == "auto" else config.downstream
    positions = _max_positions(model)
    is_text = isinstance(data, str) or (
        isinstance(data, (list, tuple)) and bool(data) and all(isinstance(t, str) for t in data)
    )
    if positions is not None and config.ctx_len > positions and is_text:
        raise ValueError(f"ctx_len: {config.ctx_len} is more than the {positions} positions the model takes")
    batches = token_batches(
        data,
        tokenizer=tokenizer,
        n_tokens=config.n_tokens,
        ctx_len=config.ctx_len,
        batch_size=config.batch_size,
        exclude_special_tokens=config.exclude_special_tokens,
        device=_device_of(model),
        text_field=config.text_field,
        dataset_split=config.dataset_split,
        dataset_config=config.dataset_config,
        part=config.part,
        eval_fraction=config.eval_fraction,
    )
    n = sae.n_latents
    stats = [ReconstructionStats(n, sae.device) for _ in range(count)]
    downstream = {"causal_lm": CausalLMStats, "embedding": EmbeddingStats}.get(kind, lambda: None)()
    dictionaries = count if is_clt else 1  # a crosscoder's sites share one dictionary
    collectors = (
        [TopExamples(n, config.examples_per_latent, sae.device) for _ in range(dictionaries)]
        if config.top_latents
        else []
    )
    run = _SiteRun(sae, model, in_paths, out_paths, is_clt)
    bar = tqdm(total=config.n_tokens, unit="tok", disable=not config.progress, dynamic_ncols=True)
    with _eval_mode(sae, model), torch.inference_mode():
        try:
            for batch in batches:
                run.batch(batch, stats, downstream, collectors)
                bar.update(int(batch.keep.sum()))
        finally:
            bar.close()
    if stats[0].tokens == 0:
        raise ValueError("data: yields no tokens to evaluate (besides padding and special tokens)")
    per_site = []
    for s, site_stats in enumerate(stats):
        metrics = site_stats.finalize(config.dense_threshold)
        density = site_stats.density().cpu()
        examples = []
        if collectors:
            collector = collectors[s if is_clt else 0]
            if is_clt or s == 0:
                top = collector.max_activation()
                chosen = choose_latents(density, top, config.top_latents, config.latent_selection)
                examples = collector.examples(chosen, density, tokenizer)
        per_site.append(
            EvalResult(
                hookpoint=in_paths[s],
                target_hookpoint=out_paths[s] if is_clt else None,
                architecture=sae.architecture,
                tokens=site_stats.tokens,
                downstream="none",
                metrics=metrics,
                density=density,
                histogram=density_histogram(density, site_stats.tokens, config.histogram_bins),
                latents=examples,
                config=config.to_dict(),
                data=_describe_data(data, config),
            )
        )
    metrics = {name: sum(site.metrics[name] for site in per_site) / count for name in per_site[0].metrics}
    if downstream is not None:
        metrics.update(downstream.finalize())
    density = torch.cat([site.density for site in per_site]) if is_clt else per_site[0].density
    tokens = stats[0].tokens
    return EvalResult(
        hookpoint=", ".join(in_paths),
        target_hookpoint=", ".join(out_paths) if is_clt else None,
        architecture=sae.architecture,
        tokens=tokens,
        downstream=kind,
        metrics=metrics,
        density=density,
        histogram=density_histogram(density, tokens, config.histogram_bins),
        config=config.to_dict(),
        data=_describe_data(data, config),
        sites=per_site,
        site_labels=site_labels(sae),
    )


class _SiteRun:
    """One batch of a multi-site evaluation: the clean forward and its statistics, then the
    replacement and ablation forwards."""

    def __init__(self, sae: SAE, model: nn.Module, inputs: list[str], targets: list[str], is_clt: bool) -> None:
        self.sae, self.model, self.inputs, self.targets, self.is_clt = sae, model, inputs, targets, is_clt
        self.read = list(dict.fromkeys(inputs + targets))

    def batch(
        self,
        batch: TokenBatch,
        stats: list[ReconstructionStats],
        downstream: CausalLMStats | EmbeddingStats | None,
        collectors: list[TopExamples],
    ) -> None:
        keep = batch.keep
        if not bool(keep.any()):
            return
        sae, model = self.sae, self.model
        with capture(model, self.read, stop=downstream is None) as acts:
            clean = model(**batch.inputs)

        def stacked(paths: list[str]) -> torch.Tensor:
            return torch.stack([acts[p][keep.to(acts[p].device)].to(sae.device) for p in paths], dim=1)

        x = stacked(self.inputs)
        width = sae.d_in
        if x.shape[-1] != width:
            raise ValueError(f"hookpoint: the sites give width {x.shape[-1]}, but the {sae.architecture} takes {width}")
        if self.is_clt:
            y = stacked(self.targets)
            if y.shape[-1] != sae.d_out:
                raise ValueError(
                    f"target_hookpoint: the targets give width {y.shape[-1]}, but the clt predicts {sae.d_out}"
                )
            latents = sae.encode(x)
            y_hat = sae.decode(latents, x)
            per_site = [SparseLatents(latents.values[:, i], latents.indices[:, i]) for i in range(len(stats))]
        else:
            y = x
            latents = sae.encode(x)
            y_hat = sae.decode(latents)
            per_site = [SparseLatents(*latents)] * len(stats)
        for s, site_stats in enumerate(stats):
            site_stats.update(y[:, s], y_hat[:, s], per_site[s])
        if collectors:
            token_ids = None
            for s, collector in enumerate(collectors):
                offset = collector.add_batch(batch.input_ids, batch.attention_mask)
                token_ids = offset + keep.flatten().nonzero().squeeze(-1)
                collector.update(per_site[s], token_ids)
        if downstream is None:
            return
        with replacement(model, sae, self.inputs, self.targets if self.is_clt else None, mask=keep) as replaced:
            spliced = replaced(**batch.inputs)
        with ablate(model, self.targets, mask=keep):
            ablated = model(**batch.inputs)
        downstream.update({"clean": clean, "spliced": spliced, "ablation": ablated}, batch)
