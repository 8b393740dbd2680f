"""Return types of the SAE modules."""

from typing import NamedTuple

import torch


class SparseLatents(NamedTuple):
    """The k active latents of each input row, sorted by value descending.

    ``values[..., j]`` is the activation of latent ``indices[..., j]``; the leading shape is the
    input's. Indices are int32 (the kernels' type); use :meth:`to_dense` for a [..., n_latents] view
    (which is exactly the tensor flashsae otherwise never builds).

    Padded layout (architectures whose active count varies per row: BatchTopK, Matryoshka,
    JumpReLU, ReLU-L1, Gated): the last dimension is m, the largest count of any row in the batch,
    and a row's unused slots come last with value 0 and index -1. Every op that takes latents
    (sparse_decode, sae_loss, decode) skips index -1.
    """

    values: torch.Tensor
    """[..., k] activations (>= 0), in the SAE's dtype; 0 in empty slots."""
    indices: torch.Tensor
    """[..., k] int32 latent ids in [0, n_latents), or -1 for an empty slot."""

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """The dense [..., n_latents] activations (zeros except the active latents)."""
        dense = self.values.new_zeros(*self.values.shape[:-1], n_latents + 1)
        # empty slots (index -1) land in the extra last column, which is dropped
        slots = torch.where(self.indices < 0, n_latents, self.indices.long())
        return dense.scatter_(-1, slots, self.values)[..., :n_latents]


class ForwardOutput(NamedTuple):
    """What an SAE's ``forward`` returns: the reconstruction, the latents and the losses.

    All losses are scalars in float32 (float64 for a float64 SAE), averaged over the batch.
    """

    x_hat: torch.Tensor
    """[..., d_in] reconstruction of the input, in the SAE's dtype."""
    latents: SparseLatents
    """The active latents of each row."""
    fvu: torch.Tensor
    """Fraction of variance unexplained: sum |x_hat - x|^2 / sum |x - mean(x)|^2 over the batch
    (0 is perfect; 1 is no better than predicting the batch mean). The usual training objective."""
    mse: torch.Tensor
    """Mean squared error over batch and features."""
    auxk_loss: torch.Tensor
    """AuxK loss (Gao et al. 2024): how well the aux_k most active dead latents reconstruct the
    residual x - x_hat, normalized like fvu and scaled by min(n_dead / aux_k, 1). Zero when no
    dead_mask was passed or no latent is dead, and for architectures without AuxK."""
    loss: torch.Tensor
    """The architecture's whole training objective: reconstruction plus its sparsity and auxiliary
    terms (TopK: ``fvu + auxk_alpha * auxk_loss``). Call ``loss.backward()``; one training loop
    serves every architecture."""
