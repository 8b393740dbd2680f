"""Evaluating SAEs: reconstruction, sparsity and downstream metrics, and the HTML run report.

    from flashsae.eval import evaluate
    result = evaluate(sae, model, "transformer.h.3", "pydoc", n_tokens=65536, tokenizer=tokenizer)
    result.metrics          # {"explained_variance": ..., "l0": ..., "ce_loss_recovered": ..., ...}

Pieces, one concern each: :mod:`.metrics` (reconstruction / sparsity definitions), :mod:`.downstream`
(CE loss recovered, KL, pooled-embedding fidelity), :mod:`.data` (text or tokens -> batches; loading
a model with its LM head), :mod:`.examples` (top-activating contexts), :mod:`.evaluate` (the pass),
:mod:`.report` (``flashsae report``: one self-contained HTML file), :mod:`.cli` (``flashsae eval`` and
``flashsae report``).
"""

from .data import load_eval_model, token_batches
from .evaluate import EvalConfig, EvalResult, evaluate
from .examples import Example, LatentExamples
from .metrics import DensityHistogram

__all__ = [
    "DensityHistogram",
    "EvalConfig",
    "EvalResult",
    "Example",
    "LatentExamples",
    "evaluate",
    "load_eval_model",
    "token_batches",
]
