"""Optimizers for wide SAEs.

:class:`SparseAdam` updates only the rows of W_enc / W_dec whose latents fired (row-sparse gradients
from flashsae's ops, no [n, d] gradient), with an exact catch-up of the steps a row skipped, so that
it stays dense Adam's math; one fused kernel per backend (flashsae.ops.sparse_adam). With
``moments="row-int8"`` it keeps 1 byte of state per weight (flashsae.ops.sparse_adam_rowwise). :mod:`.rows`
holds the decoder-row helpers a unit-norm-decoder training loop needs with row-sparse gradients.
"""

from ..ops._row_grads import RowGrads, collect_row_grads, row_grads_of, stop_collecting
from .rows import normalize_rows_, remove_parallel_row_grads_
from .sparse_adam import SparseAdam

__all__ = [
    "RowGrads",
    "SparseAdam",
    "collect_row_grads",
    "normalize_rows_",
    "remove_parallel_row_grads_",
    "row_grads_of",
    "stop_collecting",
]
