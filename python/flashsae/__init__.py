"""flashsae: fast, memory-lean sparse autoencoders for LLM activations.

    sae = flashsae.create("topk", d_in=768, n_latents=24576, k=32)   # or flashsae.TopKSAE(768, 24576, 32)
    out = sae(x)                     # ForwardOutput(x_hat, latents, fvu, mse, auxk_loss, loss)
    out.loss.backward()              # sparse backward: no [batch, n_latents] tensor anywhere

The ops behind it live in flashsae.ops (topk_encode, sparse_decode, sae_loss).
"""

from . import ops
from ._backend import BACKENDS, available_backends
from .errors import BackendUnavailableError
from .modules import REGISTRY, SAE, TopKConfig, TopKSAE, create, load
from .outputs import ForwardOutput, SparseLatents

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "SAE",
    "BackendUnavailableError",
    "ForwardOutput",
    "SparseLatents",
    "TopKConfig",
    "TopKSAE",
    "__version__",
    "available_backends",
    "create",
    "load",
    "ops",
]
