"""flashsae ops: one module per op, each with a float64-checkable torch reference, backends
(cpu / cuda / triton / torch), a torch.library custom op with fake and autograd registrations, and
the public functional form below. Backend choice: see flashsae._backend."""

from .sae_loss import SaeLossOutput, sae_loss, sae_loss_reference
from .sparse_decode import sparse_decode, sparse_decode_reference
from .topk_encode import topk_encode, topk_encode_reference

__all__ = [
    "SaeLossOutput",
    "sae_loss",
    "sae_loss_reference",
    "sparse_decode",
    "sparse_decode_reference",
    "topk_encode",
    "topk_encode_reference",
]
