"""SAE modules: plain torch.nn.Modules on flashsae's sparse kernels, built by name through a
registry (flashsae.create / flashsae.load)."""

from .base import REGISTRY, SAE, SAEConfig, create, geometric_median, load, register
from .topk import TopKConfig, TopKSAE

__all__ = [
    "REGISTRY",
    "SAE",
    "SAEConfig",
    "TopKConfig",
    "TopKSAE",
    "create",
    "geometric_median",
    "load",
    "register",
]
