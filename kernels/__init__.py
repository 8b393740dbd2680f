"""flashsae.kernels: the Triton backend's kernels (this folder is ``kernels/`` in the source tree).

One module per op, named after it; ``_launch`` holds what their launchers share. Launchers take
validated, contiguous tensors and preallocated outputs; the op modules in ``flashsae.ops`` validate,
allocate (``flashsae._native.new_output``) and dispatch. Importing this package imports triton
and decides, once, between compiled and interpreted kernels (``TRITON_INTERPRET``).
"""

from . import sae_loss, sparse_adam, sparse_adam_rowwise, sparse_rows, topk_encode
from ._launch import INTERPRETED

__all__ = ["INTERPRETED", "sae_loss", "sparse_adam", "sparse_adam_rowwise", "sparse_rows", "topk_encode"]
