"""flashsae: fast, memory-lean sparse autoencoders for LLM activations.

    sae = flashsae.create("topk", d_in=768, n_latents=24576, k=32)   # or flashsae.TopKSAE(768, 24576, 32)
    out = sae(x)                     # ForwardOutput(x_hat, latents, fvu, mse, auxk_loss, loss)
    out.loss.backward()              # sparse backward: no [batch, n_latents] tensor anywhere

Architectures (flashsae.create names): topk, batchtopk, matryoshka, jumprelu, relu, gated,
transcoder, clt (cross-layer transcoder), crosscoder. The ops behind them live in flashsae.ops (topk_encode, sparse_decode, sae_loss, and the
variable-count composites flashsae.ops.batch_topk / flashsae.ops.threshold_encode);
flashsae.synthetic generates activations from a known sparse dictionary.

Formats (flashsae.io): ``flashsae.load(path)`` reads native checkpoints and SAELens, sparsify,
dictionary_learning, OpenAI sparse_autoencoder and lm-saes / Llama Scope files (detected; a Hub id
org/repo works with huggingface_hub installed); ``flashsae.load_many(dir)`` reads every hookpoint of
a multi-SAE directory; ``sae.save(path, format="native" | "saelens" | "sparsify")`` writes.

Using SAEs in a model: flashsae.hooks (capture, splice, steer, ablate: context managers over any torch
model); flashsae.eval (evaluate: reconstruction, sparsity and downstream metrics; the HTML report).
Training: flashsae.train (the streaming trainer behind ``flashsae train``).
"""

import importlib
from typing import Any

from . import hooks, io, modules, ops, synthetic
from ._backend import BACKENDS, available_backends
from ._version import __version__
from .errors import BackendUnavailableError, CheckpointCorruptError
from .io import FormatError, load_many
from .modules import *  # noqa: F403 - every architecture, its config, create / load / register (modules.__all__)
from .outputs import ForwardOutput, SparseLatents

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CheckpointCorruptError",
    "FormatError",
    "ForwardOutput",
    "SparseLatents",
    "__version__",
    "available_backends",
    "eval",
    "hooks",
    "io",
    "load_many",
    "ops",
    "synthetic",
    "train",
    *modules.__all__,
]

#: Subpackages imported on first attribute access: the trainer and the evaluation pull in the
#: training loop, metrics writers and transformers helpers, which using or loading an SAE never needs.
LAZY_SUBPACKAGES = ("distributed", "eval", "optim", "train")


def __getattr__(name: str) -> Any:
    if name in LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_SUBPACKAGES))
