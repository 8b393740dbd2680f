"""Which captured hookpoints each trained model reads: one hookpoint per SAE, or several sites per
model for the multi-site architectures, all captured by the same forward pass.

- SAEs (every single-site architecture): one unit per hookpoint, named after it.
- ``clt`` (CrossLayerTranscoder): one unit named "clt" whose inputs are the modules ``hookpoints``
  names and whose targets are those ``targets`` names, paired in model order (layer i's input with
  layer i's target), e.g. for MiniLM ``--hookpoints 'encoder.layer.*.attention.output' --targets
  'encoder.layer.*.output.dense'``: each layer's MLP input and its MLP output.
- ``crosscoder``: one unit named "crosscoder" over every hookpoint, in model order (two models'
  sites are not captured by one forward pass: a cache of each, see the docs).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hookpoints import _candidates, _match

#: Architectures trained on several sites at once, and the unit name each trains under.
MULTI_SITE = {"clt": "clt", "crosscoder": "crosscoder"}


@dataclass(frozen=True)
class Unit:
    """The sites one trained model reads: inputs (stacked [batch, S, d] for a multi-site model) and,
    for a CLT, the targets it predicts (paired with the inputs)."""

    inputs: tuple[str, ...]
    targets: tuple[str, ...] | None = None

    @property
    def sites(self) -> tuple[str, ...]:
        return self.inputs + (self.targets or ())


def select(names: list[str], patterns: list[str], prefix: str = "") -> list[str]:
    """The captured `names` that `patterns` (module paths or globs, as flashsae.hookpoints resolves
    them) name, in the order of `names`."""
    chosen: set[str] = set()
    for pattern in patterns:
        for candidate in _candidates(pattern, prefix, set(names)):
            matched = [n for n in names if _match(candidate, n)]
            if matched:
                chosen.update(matched)
                break
    return [n for n in names if n in chosen]


def plan_units(architecture: str, captured: list[str], hookpoints: list[str] | None, targets: list[str] | None,
               prefix: str = "") -> dict[str, Unit]:  # fmt: skip
    """{unit name: Unit} for the captured hookpoints (model order) of a run."""
    if architecture not in MULTI_SITE:
        return {name: Unit((name,)) for name in captured}
    if architecture == "crosscoder":
        if len(captured) < 2:
            raise ValueError(f"hookpoints: a crosscoder reads at least 2 sites, got {captured}")
        return {MULTI_SITE[architecture]: Unit(tuple(captured))}
    if not targets:
        raise ValueError("targets: a clt needs --targets, the modules whose outputs it predicts (one per input)")
    outputs = select(captured, targets, prefix)
    named = select(captured, hookpoints, prefix) if hookpoints else captured
    inputs = [name for name in named if name not in outputs]
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError(
            f"targets: a clt pairs each input with one target in model order; --hookpoints give {len(inputs)} "
            f"({', '.join(inputs)}), --targets give {len(outputs)} ({', '.join(outputs)})"
        )
    return {MULTI_SITE[architecture]: Unit(tuple(inputs), tuple(outputs))}
