"""The plain-PyTorch TopK SAEs flashsae is measured against (same parameters, init and math).

- :class:`DenseTopKSAE` (provider ``torch_dense``): dense [batch, n] pre-activations, torch.topk, a
  dense latent matrix built with scatter and a dense decoder GEMM (what most codebases write).
- :class:`SparsifyStyleTopKSAE` (provider ``torch_sparse``): sparsify-style eager code: sparsify's
  FusedEncoder (dense linear + relu + torch.topk forward, sparse backward with embedding_bag and
  index_add) and an embedding_bag decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modules import TopKSAE
from ..outputs import ForwardOutput, SparseLatents


class DenseTopKSAE(TopKSAE):
    """The dense PyTorch TopK SAE baseline: same parameters and math as TopKSAE, computed with
    [batch, n_latents] tensors and autograd (torch.topk ties are unordered, otherwise identical)."""

    def _dense_latents(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = F.relu((rows - self.b_dec) @ self.W_enc.T + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return pre, top.values, top.indices

    def _output(self, x, x_hat, values, indices, mse, fvu, auxk) -> ForwardOutput:
        lead = x.shape[:-1]
        latents = SparseLatents(values.reshape(*lead, self.k), indices.int().reshape(*lead, self.k))
        loss = fvu + self.config.auxk_alpha * auxk
        return ForwardOutput(x_hat.reshape(*lead, self.d_in), latents, fvu, mse, auxk, loss)

    def _losses(self, rows, x_hat, pre, dead_mask):
        total_variance = (rows - rows.mean(0)).pow(2).sum()
        sse = (x_hat - rows).pow(2).sum()
        auxk = sse.new_zeros(())
        if dead_mask is not None:
            aux = pre.masked_fill(~dead_mask, float("-inf")).topk(self.aux_k, dim=-1)
            aux_values = torch.where(aux.values == float("-inf"), 0.0, aux.values)
            e_hat = torch.zeros_like(pre).scatter(-1, aux.indices, aux_values) @ self.W_dec
            scale = (dead_mask.sum() / self.aux_k).clamp(max=1.0)
            auxk = scale * (e_hat - (rows - x_hat).detach()).pow(2).sum() / total_variance
        return sse / rows.numel(), sse / total_variance, auxk

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        rows = self._rows(x)
        pre, values, indices = self._dense_latents(rows)
        dense = torch.zeros_like(pre).scatter(-1, indices, values)
        x_hat = dense @ self.W_dec + self.b_dec
        return self._output(x, x_hat, values, indices, *self._losses(rows, x_hat, pre, dead_mask))


class SparsifyStyleEncoder(torch.autograd.Function):
    """sparsify's FusedEncoder, eager: dense forward (linear + relu + torch.topk, [batch, n] is
    built), sparse backward (embedding_bag for the input, index_add for weight and bias).

    Two differences from sparsify, so that it computes exactly flashsae's function: zero values get
    no gradient (relu' = 0), and a gradient on the returned pre-activations (AuxK's path) is
    propagated densely, recomputing them, instead of being dropped."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int):
        pre = F.relu(F.linear(x, weight, bias))
        values, indices = pre.topk(k, dim=-1)
        ctx.save_for_backward(x, weight, bias, values, indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return values, indices, pre

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_pre):
        x, weight, bias, values, indices = ctx.saved_tensors
        g = torch.zeros_like(values) if grad_values is None else grad_values * (values > 0)
        grad_x = F.embedding_bag(indices, weight, mode="sum", per_sample_weights=g)
        flat = indices.flatten()
        grad_w = torch.zeros_like(weight).index_add_(0, flat, (g.unsqueeze(2) * x.unsqueeze(1)).flatten(0, 1))
        grad_b = torch.zeros_like(bias).index_add_(0, flat, g.flatten())
        if grad_pre is not None:
            dense = grad_pre * (F.linear(x, weight, bias) > 0)
            grad_x = grad_x + dense @ weight
            grad_w = grad_w + dense.T @ x
            grad_b = grad_b + dense.sum(0)
        return grad_x, grad_w, grad_b, None


def embedding_bag_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sparsify's eager decoder: sum_j values[:, j] * W_dec[indices[:, j]] through embedding_bag."""
    return F.embedding_bag(indices.long(), W_dec, per_sample_weights=values, mode="sum")


class SparsifyStyleTopKSAE(DenseTopKSAE):
    """sparsify-style eager TopK SAE: SparsifyStyleEncoder and an embedding_bag decoder."""

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        rows = self._rows(x)
        values, indices, pre = SparsifyStyleEncoder.apply(rows - self.b_dec, self.W_enc, self.b_enc, self.k)
        x_hat = embedding_bag_decode(values, indices, self.W_dec) + self.b_dec
        return self._output(x, x_hat, values, indices, *self._losses(rows, x_hat, pre, dead_mask))
