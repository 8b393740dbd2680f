"""SAE modules: plain torch.nn.Modules on flashsae's sparse kernels."""

from .topk import TopKSAE, geometric_median

__all__ = ["TopKSAE", "geometric_median"]
