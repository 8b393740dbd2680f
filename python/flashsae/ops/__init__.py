"""flashsae ops: one module per op, each with a float64-checkable torch reference, backends
(cpu / cuda / triton / torch), a torch.library custom op with fake and autograd registrations, and
the public functional form below. Backend choice: see flashsae._backend.

batch_topk and threshold_encode return data-dependent shapes (padded [batch, m] latents), so they
are plain functions composed of topk_encode (and its sparse backward) rather than custom ops.

sparse_adam_ is the fused row-sparse Adam step of flashsae.optim.SparseAdam (an in-place custom op,
no autograd), sparse_adam_rowwise_ its 1-byte-per-weight form (row-wise second moment, int8 first
moment: SparseAdam(moments="row-int8")); _row_grads is the opt-in channel that hands the ops'
row-sparse gradients to them."""

from .batch_topk import BatchTopKOutput, batch_topk, batch_topk_reference
from .sae_loss import SaeLossOutput, sae_loss, sae_loss_reference
from .sparse_adam import sparse_adam_, sparse_adam_reference
from .sparse_adam_rowwise import sparse_adam_rowwise_, sparse_adam_rowwise_reference
from .sparse_decode import sparse_decode, sparse_decode_reference
from .threshold_encode import threshold_encode, threshold_encode_reference
from .topk_encode import topk_encode, topk_encode_reference, topk_encode_stats

__all__ = [
    "BatchTopKOutput",
    "SaeLossOutput",
    "batch_topk",
    "batch_topk_reference",
    "sae_loss",
    "sae_loss_reference",
    "sparse_adam_",
    "sparse_adam_reference",
    "sparse_adam_rowwise_",
    "sparse_adam_rowwise_reference",
    "sparse_decode",
    "sparse_decode_reference",
    "threshold_encode",
    "threshold_encode_reference",
    "topk_encode",
    "topk_encode_reference",
    "topk_encode_stats",
]
