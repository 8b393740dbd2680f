"""TopKSAE: the TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", arXiv:2406.04093), on flashsae's sparse kernels.

    latents = TopK_k(relu((x - b_dec) W_enc^T + b_enc))          (topk_encode: no [batch, n] tensor)
    x_hat   = b_dec + sum_j latents.values[j] W_dec[latents.indices[j]]   (sae_loss / sparse_decode)

Every op in forward and backward runs sparse: the only O(n_latents * d) work per step is the
encoder GEMM (tile by tile) and writing the dense parameter gradients torch's optimizers expect.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import _backend
from ..io.native import load_checkpoint, save_checkpoint
from ..ops import sae_loss, sparse_decode, topk_encode
from ..outputs import ForwardOutput, SparseLatents

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def geometric_median(points: torch.Tensor, *, max_iter: int = 100, rtol: float = 1e-6) -> torch.Tensor:
    """Geometric median of the rows of `points` [m, d] by Weiszfeld's iteration, started at the mean
    (float64 math). More robust to outlier activations than the mean (Bricken et al. 2023)."""
    pts = points.detach().to(torch.float64)
    guess = pts.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (pts - guess).norm(dim=1).clamp_min(1e-12)
        new = (weights.unsqueeze(1) * pts).sum(0) / weights.sum()
        moved = (new - guess).norm()
        guess = new
        if moved <= rtol * guess.norm().clamp_min(1e-12):
            break
    return guess


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder as a plain ``nn.Module``.

    Args:
        d_in: input width d.
        n_latents: dictionary size n.
        k: active latents per input row, 1 <= k <= n_latents.
        aux_k: size of the AuxK selection among dead latents when ``forward`` gets a dead_mask;
            default ``min(d_in // 2, n_latents)`` (at least 1), as in sparsify.
        dtype, device: of the parameters (float32 default; bfloat16, float16, float64 work).
        backend: kernel backend for every op ("auto" default; see flashsae._backend).

    Parameters: ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d] (one row per latent in both
    matrices), ``b_dec`` [d]. Initialization follows Gao et al.: decoder rows random with unit norm,
    encoder = decoder (tied at init), zero biases; call :meth:`init_b_dec_` on a data sample.
    In training, call :meth:`remove_decoder_parallel_grads_` before the optimizer step and
    :meth:`normalize_decoder_` after it to keep decoder rows at unit norm.
    """

    architecture = "topk"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        aux_k: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.d_in = _positive_int("d_in", d_in)
        self.n_latents = _positive_int("n_latents", n_latents)
        self.k = _positive_int("k", k)
        if k > n_latents:
            raise ValueError(f"k: expected 1 <= k <= n_latents ({n_latents}), got {k}")
        self.aux_k = max(1, min(d_in // 2, n_latents)) if aux_k is None else _positive_int("aux_k", aux_k)
        if self.aux_k > n_latents:
            raise ValueError(f"aux_k: expected 1 <= aux_k <= n_latents ({n_latents}), got {aux_k}")
        self.backend = None if backend is None else _backend.requested_backend(backend)
        dtype = dtype or torch.float32
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"dtype: expected one of {', '.join(_DTYPE_NAMES.values())}, got {dtype}")

        decoder = torch.randn(n_latents, d_in, dtype=torch.float32, device=device)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(decoder.clone().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(decoder.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, aux_k={self.aux_k}, dtype={self.dtype}"

    # ----------------------------------------------------------------------------- forward pieces

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] as contiguous [rows, d_in] rows in the SAE's dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            raise ValueError(f"x: expected shape [..., d_in={self.d_in}], got {list(x.shape)}")
        return x.reshape(-1, self.d_in).to(self.dtype).contiguous()

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The top-k latents of x [..., d_in]: values and int32 indices, each [..., k]."""
        values, indices = topk_encode(self._rows(x), self.W_enc, self.b_enc, self.k, self.b_dec, backend=self.backend)
        lead = x.shape[:-1]
        return SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))

    def decode(self, latents: SparseLatents) -> torch.Tensor:
        """x_hat [..., d_in] from latents ([..., k] values and indices)."""
        values, indices = latents
        lead = values.shape[:-1]
        k = values.shape[-1]
        x_hat = sparse_decode(
            values.reshape(-1, k).contiguous(),
            indices.reshape(-1, k).contiguous(),
            self.W_dec,
            self.b_dec,
            backend=self.backend,
        )
        return x_hat.reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encodes, decodes and scores x [..., d_in] (see :class:`~flashsae.outputs.ForwardOutput`).

        dead_mask: optional [n_latents] bool, latents counted as dead (e.g. no activation in the
        last 10M tokens); enables the AuxK loss over the aux_k most active of them.
        """
        rows = self._rows(x)
        aux_k = self.aux_k if dead_mask is not None else 0
        encoded = topk_encode(
            rows, self.W_enc, self.b_enc, self.k, self.b_dec, dead_mask=dead_mask, aux_k=aux_k, backend=self.backend
        )
        values, indices = encoded[:2]
        aux = encoded[2:] if aux_k else (None, None)
        loss = sae_loss(rows, values, indices, self.W_dec, self.b_dec, *aux, backend=self.backend)
        auxk_loss = loss.auxk_loss
        if aux_k:
            # sparsify's scale: fewer dead latents than aux slots get proportionally less weight
            scale = (dead_mask.sum().to(auxk_loss.dtype) / aux_k).clamp(max=1.0)
            auxk_loss = auxk_loss * scale
        lead = x.shape[:-1]
        return ForwardOutput(
            x_hat=loss.x_hat.reshape(*lead, self.d_in),
            latents=SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k)),
            fvu=loss.fvu,
            mse=loss.mse,
            auxk_loss=auxk_loss,
        )

    # -------------------------------------------------------------------------- training helpers

    @torch.no_grad()
    def init_b_dec_(self, x: torch.Tensor, method: str = "geometric_median") -> None:
        """Sets b_dec from a data sample x [..., d_in]: its geometric median (default) or mean."""
        rows = self._rows(x)
        if method == "geometric_median":
            center = geometric_median(rows)
        elif method == "mean":
            center = rows.to(torch.float64).mean(0)
        else:
            raise ValueError(f"method: expected 'geometric_median' or 'mean', got {method!r}")
        self.b_dec.copy_(center.to(self.dtype))

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Rescales every decoder row to unit L2 norm (rows of norm < eps are left as they are)."""
        norms = self.W_dec.float().norm(dim=1, keepdim=True)
        self.W_dec.div_(torch.where(norms < eps, torch.ones_like(norms), norms).to(self.dtype))

    @torch.no_grad()
    def remove_decoder_parallel_grads_(self) -> None:
        """Removes from W_dec.grad its component along each decoder row, so a step followed by
        normalize_decoder_ moves rows along the unit sphere (Bricken et al. 2023). No-op without grad."""
        grad = self.W_dec.grad
        if grad is None:
            return
        rows = self.W_dec.float()
        along = torch.linalg.vecdot(grad.float(), rows) / torch.linalg.vecdot(rows, rows).clamp_min(1e-12)
        grad.sub_((along.unsqueeze(1) * rows).to(grad.dtype))

    # ----------------------------------------------------------------------------------- save/load

    def config(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "aux_k": self.aux_k,
            "dtype": _DTYPE_NAMES[self.dtype],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the native checkpoint (cfg.json + sae.safetensors) to the directory `path`, atomically."""
        save_checkpoint(path, self.config(), dict(self.state_dict()))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> TopKSAE:
        """Loads a checkpoint written by :meth:`save` (dtype: as saved unless given)."""
        config, tensors = load_checkpoint(path)
        if config.get("architecture") != cls.architecture:
            raise ValueError(f"path: {path} holds a {config.get('architecture')!r} SAE, not {cls.architecture!r}")
        saved_dtype = getattr(torch, config["dtype"])
        sae = cls(
            config["d_in"], config["n_latents"], config["k"], aux_k=config["aux_k"],
            dtype=dtype or saved_dtype, device=device, backend=backend,
        )  # fmt: skip
        missing = set(sae.state_dict()) ^ set(tensors)
        if missing:
            raise ValueError(f"path: {path} weights do not match a TopKSAE (differing tensors: {sorted(missing)})")
        sae.load_state_dict(tensors)
        return sae
