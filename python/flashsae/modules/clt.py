"""CrossLayerTranscoder: one dictionary per layer that reads that layer's input site and writes to
the output sites of that layer and of every later one (a cross-layer transcoder, CLT: Ameisen et
al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language Models"; the replacement
model of attribution graphs, the layout circuit-tracer reads).

    latents_i = act(x_i W_enc_i^T + b_enc_i)                     x_i: layer i's input  [..., d_in]
    y_hat_j   = b_dec_j + sum_{i <= j} latents_i W_dec_i[:, j - i]  (+ x_j W_skip_j^T)
    loss      = mean_j fvu(y_j, y_hat_j) + auxk_alpha * auxk_loss   y_j: layer j's target [..., d_out]

``act`` is TopK (``activation="topk"``: the k largest of relu(pre) per row and layer, trained),
JumpReLU (``"jumprelu"``: pre where pre > threshold_i, per-latent thresholds held in buffers, as
circuit-tracer's JumpReLU CLTs and a TopK CLT exported with calibrated thresholds hold them) or ReLU
(``"relu"``: JumpReLU at threshold 0). The encoders read x_i itself (no decoder bias subtracted): b_dec
lives in the output space.

Every op is sparse. Encoder i is one :func:`~flashsae.ops.topk_encode` (JumpReLU / ReLU:
:func:`~flashsae.ops.threshold_encode`): the [batch, n] pre-activations are never written. Decoder i
is stored as ``W_dec_i`` [n, (L - i) * d_out]: latent-major, the contiguous memory of circuit-tracer's
[n, L - i, d_out] (:meth:`CrossLayerTranscoder.decoder` gives that view), so the latents of layer i
decode to all their target layers in one :func:`~flashsae.ops.sparse_decode` ([batch, (L - i) * d_out],
backward over the active rows only); the output of target j sums the j - i'th slice of each. No
[batch, L * n] tensor and no dense per-layer latent tensor exists in forward or backward, and with
:class:`flashsae.optim.SparseAdam` no [n, d] gradient either (each matrix is a 2-D parameter, so the
row-sparse gradient path applies as it does to an SAE).

Inputs are stacked by layer: ``x`` [..., L, d_in], ``y`` [..., L, d_out]; latents come back as
[..., L, k] (indices local to each layer's dictionary).

AuxK (TopK only, with ``dead_mask`` [L, n]): per layer the aux_k largest pre-activations among its
dead latents reconstruct, through that layer's decoder, the residual y - y_hat of every layer it
writes to (detached); normalized by that residual's variance, scaled by min(n_dead / aux_k, 1) as
in sparsify, averaged over the layers.

Initialization follows flashsae's (sparsify's) transcoder: unit-norm random encoder rows, zero
decoders and biases. Decoder rows are not renormalized in training (``unit_norm_decoder = False``);
:meth:`CrossLayerTranscoder.normalize_decoder_` rescales a latent's row (its decoder vectors to all
of its target layers together) on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .._checks import boolean, choice, non_negative, positive_int
from ..ops import sparse_decode, topk_encode
from ..ops._common import acc_dtype, row_blocks
from ..ops.batch_topk import batch_topk
from ..ops.threshold_encode import threshold_encode
from ..outputs import SparseLatents
from ..registry import register
from . import _shared, base
from .topk import TOPK_PRECISIONS
from .base import ConfigField, SAE, SAEConfig, sample_center, unit_rows

#: Values of CrossLayerTranscoderConfig.activation.
CLT_ACTIVATIONS = ("topk", "jumprelu", "relu")


@dataclass
class CrossLayerTranscoderConfig(SAEConfig):
    """Configuration of a :class:`CrossLayerTranscoder`. d_in is the width of each layer's input
    site, n_latents the dictionary size of each layer (L * n_latents latents in all)."""

    n_layers: int | None = None
    """Number of layers L (required): L encoders, L * (L + 1) / 2 decoder blocks."""
    d_out: int | None = None
    """Width of each layer's target site; None means d_in."""
    activation: str = "topk"
    """"topk" (trained with k and AuxK), "jumprelu" (per-latent thresholds in the buffers
    threshold_i, not trained: loaded from circuit-tracer files or calibrated from a TopK CLT) or
    "relu" (JumpReLU at threshold 0)."""
    k: int = 32
    """Active latents per row and layer (activation "topk"), 1 <= k <= n_latents."""
    aux_k: int | None = None
    """Size of each layer's AuxK selection among its dead latents; None means min(d_out // 2,
    n_latents). Used only when forward gets a dead_mask."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss in ``loss = mean fvu + auxk_alpha * auxk_loss`` (>= 0)."""
    skip: bool = False
    """A linear skip connection per layer, y_hat_j += x_j W_skip_j^T (W_skip_j [d_out, d_in])."""
    precision: str = "exact"
    """How the TopK encoders score latents, as TopKConfig.precision: "exact", "certified" (exact's
    results from bfloat16 GEMM scores and a proven bound), "fast" or "auto" (= certified)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_layers", self.n_layers)
        if self.d_out is None:
            self.d_out = self.d_in
        positive_int("d_out", self.d_out)
        choice("activation", self.activation, CLT_ACTIVATIONS)
        _shared.check_topk_fields(self, reconstruction_width=self.d_out)
        self.auxk_alpha = non_negative("auxk_alpha", self.auxk_alpha)
        boolean("skip", self.skip)
        choice("precision", self.precision, TOPK_PRECISIONS)


class CLTOutput(NamedTuple):
    """What :meth:`CrossLayerTranscoder.forward` returns: ForwardOutput's fields (same meaning; fvu
    and mse averaged over the layers) and the per-layer figures."""

    x_hat: torch.Tensor
    """[..., L, d_out] prediction of every layer's target."""
    latents: SparseLatents
    """[..., L, slots] per-layer latents (indices into that layer's dictionary; -1 = empty slot)."""
    fvu: torch.Tensor
    """Mean over the layers of each layer's fraction of variance unexplained."""
    mse: torch.Tensor
    """Mean squared error over batch, layers and features."""
    auxk_loss: torch.Tensor
    """AuxK loss averaged over the layers (0 without a dead_mask)."""
    loss: torch.Tensor
    """The training objective: fvu + auxk_alpha * auxk_loss."""
    fvu_per_layer: torch.Tensor
    """[L] each target layer's fraction of variance unexplained (detached)."""


@register
class CrossLayerTranscoder(SAE):
    """A cross-layer transcoder (module docstring).

    ``CrossLayerTranscoder(n_layers, d_in, n_latents, k=32, ...)`` or
    ``flashsae.create("clt", n_layers=L, d_in=d, n_latents=n, k=k)``; options as in
    :class:`CrossLayerTranscoderConfig`; dtype, device, backend as for :class:`~flashsae.TopKSAE`.

    Parameters per layer i: ``W_enc_i`` [n, d_in], ``b_enc_i`` [n], ``W_dec_i`` [n, (L - i) * d_out]
    (view [n, L - i, d_out] by :meth:`decoder`), ``b_dec_i`` [d_out], with skip ``W_skip_i``
    [d_out, d_in]; buffers ``threshold_i`` [n] (JumpReLU / ReLU) -- circuit-tracer's tensor names.

    A training loop passes inputs and targets stacked by layer: ``out = clt(x, y, dead_mask=...)``.
    """

    architecture = "clt"
    config_class = CrossLayerTranscoderConfig
    config: CrossLayerTranscoderConfig
    #: Decoder rows are free (as in circuit-tracer's CLTs): TopK needs no norm constraint, and a
    #: trainer with SparseAdam can then update rows during backward (update_in_backward).
    unit_norm_decoder = False
    #: A batch names nearly every row of every matrix (B * k slots over n latents per layer): with
    #: SparseAdam the trainer updates each chunk of rows during backward, so no L * n * d gradient exists.
    update_in_backward = True

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        n_latents: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        **options,
    ) -> None:
        config = CrossLayerTranscoderConfig(d_in=d_in, n_latents=n_latents, n_layers=n_layers, **options)
        super().__init__(config, dtype=dtype, device=device, backend=backend)
        self._build()

    n_layers = ConfigField()
    d_out = ConfigField()
    k = ConfigField()
    aux_k = ConfigField()
    activation = ConfigField()

    # ------------------------------------------------------------------------------ parameters

    def init_weights_(self) -> None:
        """Unit-norm random encoder rows; zero decoders, biases (and skips); zero thresholds."""
        n, d_in, d_out, L = self.n_latents, self.d_in, self.d_out, self.n_layers
        dtype, device = self._init_dtype, self._init_device
        for i in range(L):
            W_enc = torch.empty(n, d_in, dtype=dtype, device=device)
            for rows in row_blocks(n, d_in, base.INIT_CHUNK_ELEMENTS):
                W_enc[rows] = unit_rows(torch.randn(rows.stop - rows.start, d_in, dtype=torch.float32, device=device))
            self.register_parameter(f"W_enc_{i}", nn.Parameter(W_enc))
            self.register_parameter(f"b_enc_{i}", nn.Parameter(torch.zeros(n, dtype=dtype, device=device)))
            width = (L - i) * d_out
            self.register_parameter(f"W_dec_{i}", nn.Parameter(torch.zeros(n, width, dtype=dtype, device=device)))
            self.register_parameter(f"b_dec_{i}", nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device)))
            if self.config.skip:
                W_skip = torch.zeros(d_out, d_in, dtype=dtype, device=device)
                self.register_parameter(f"W_skip_{i}", nn.Parameter(W_skip))
            if self.activation != "topk":
                self.register_buffer(f"threshold_{i}", torch.zeros(n, dtype=dtype, device=device))
        # threshold_encode's first-attempt slots per layer: grows to twice the largest count seen
        self._candidates = [min(n, 4 * self.k)] * L

    def encoder(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc_i [n, d_in], b_enc_i [n]) of layer i."""
        return getattr(self, f"W_enc_{i}"), getattr(self, f"b_enc_{i}")

    def decoder(self, i: int) -> torch.Tensor:
        """W_dec_i as [n, L - i, d_out] (circuit-tracer's layout; a view of the stored matrix)."""
        return getattr(self, f"W_dec_{i}").view(self.n_latents, self.n_layers - i, self.d_out)

    def decoder_matrices(self) -> list[nn.Parameter]:
        """The L decoder matrices W_dec_i [n, (L - i) * d_out], one row per latent."""
        return [getattr(self, f"W_dec_{i}") for i in range(self.n_layers)]

    def threshold(self, i: int) -> torch.Tensor:
        """threshold_i [n] of a JumpReLU / ReLU CLT."""
        if self.activation == "topk":
            raise ValueError("activation: a TopK CLT has no thresholds (see flashsae.io.circuit_tracer)")
        return getattr(self, f"threshold_{i}")

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec_0.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec_0.device

    @property
    def W_dec(self) -> torch.Tensor:  # the SAE interface's single decoder does not exist here
        raise AttributeError("W_dec: a CLT has one decoder per layer: decoder(i) or decoder_matrices()")

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Rescales every latent's decoder row (all its target layers together) to unit L2 norm."""
        for W in self.decoder_matrices():
            norms = W.to(acc_dtype(W.dtype)).norm(dim=1, keepdim=True)
            W.div_(torch.where(norms < eps, torch.ones_like(norms), norms).to(W.dtype))

    @torch.no_grad()
    def remove_decoder_parallel_grads_(self) -> None:
        """Removes from each dense W_dec_i.grad its component along the decoder rows."""
        for W in self.decoder_matrices():
            if W.grad is None:
                continue
            rows = W.to(acc_dtype(W.dtype))
            along = torch.linalg.vecdot(W.grad.to(rows.dtype), rows) / torch.linalg.vecdot(rows, rows).clamp_min(1e-12)
            W.grad.sub_((along.unsqueeze(1) * rows).to(W.grad.dtype))

    @torch.no_grad()
    def fold_activation_scale_(self, scales: dict[str, list[float]]) -> None:
        """Makes a CLT trained on inputs x_i * s_i and targets y_j * t_j take and predict raw
        activations: W_enc_i * s_i, the slices W_dec_i[:, j - i] / t_j, b_dec_j / t_j, W_skip_j * s_j / t_j
        (latent values and thresholds unchanged). scales: {"inputs": [s_i], "targets": [t_j]}."""
        inputs, targets = scales["inputs"], scales["targets"]
        for i in range(self.n_layers):
            getattr(self, f"W_enc_{i}").mul_(inputs[i])
            decoder = self.decoder(i)
            for j in range(i, self.n_layers):
                decoder[:, j - i].div_(targets[j])
            getattr(self, f"b_dec_{i}").div_(targets[i])
            if self.config.skip:
                getattr(self, f"W_skip_{i}").mul_(inputs[i] / targets[i])

    @torch.no_grad()
    def init_b_dec_(self, y: torch.Tensor, method: str = "geometric_median") -> None:
        """Sets each b_dec_j from a sample of the targets y [..., L, d_out]: per layer its geometric
        median (default) or mean."""
        stacked = self._stacked(y, "y", self.d_out, "d_out")
        for j in range(self.n_layers):
            getattr(self, f"b_dec_{j}").copy_(sample_center(stacked[:, j], method).to(self.dtype))

    @torch.no_grad()
    def to_jumprelu(self, x: torch.Tensor) -> CrossLayerTranscoder:
        """A JumpReLU CLT with this TopK CLT's weights and thresholds calibrated on a sample of
        inputs x [..., L, d_in]: threshold_i (one value for all of layer i's latents) lies halfway
        between the smallest of the rows * k largest activations of layer i over the sample
        (BatchTopK's cut, Bussmann et al. 2024) and the next smaller one, so on the sample the
        JumpReLU CLT keeps exactly those: a mean of k latents per row and layer, the batch's top
        activations instead of each row's top k. circuit-tracer's
        layout (flashsae.io.circuit_tracer) holds JumpReLU CLTs, not TopK ones."""
        if self.activation != "topk":
            raise ValueError(f"activation: to_jumprelu converts a TopK CLT, this one is {self.activation!r}")
        rows = self._stacked(x, "x", self.d_in, "d_in")
        fields = {**self.config.to_dict(), "activation": "jumprelu"}
        converted = type(self).from_config(
            self.config_class(**fields), dtype=self.dtype, device=self.device, backend=self.backend
        )
        converted.load_state_dict(self.state_dict(), strict=False)
        converted.metadata = dict(self.metadata)
        for i in range(self.n_layers):
            W_enc, b_enc = self.encoder(i)
            x_i = rows[:, i].contiguous()
            values = batch_topk(x_i, W_enc, b_enc, self.k, backend=self.backend).values
            selected = values[values > 0]
            if not selected.numel():
                continue  # nothing fires on the sample: threshold 0 (ReLU) for this layer
            cut = selected.min()
            # the largest activation left out: among each row's top (m + 1), m = most selected in a row
            slots = min(self.n_latents, values.shape[1] + 1)
            candidates = topk_encode(x_i, W_enc, b_enc, slots, backend=self.backend)[0]
            left_out = candidates[candidates < cut]
            below = left_out.max().clamp_min(0) if left_out.numel() else cut.new_zeros(())
            # halfway between: the JumpReLU keeps exactly the selected activations on the sample,
            # with the gap (not one rounding) between the threshold and either side
            converted.threshold(i).fill_(float((cut + below) / 2))
        return converted

    # --------------------------------------------------------------------------------- pieces

    def _stacked(self, x: torch.Tensor, name: str, width: int, width_name: str) -> torch.Tensor:
        """x [..., L, width] as [rows, L, width] in the CLT's dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        L = self.n_layers
        if x.dim() < 2 or x.shape[-2:] != (L, width):
            raise ValueError(f"{name}: expected shape [..., n_layers={L}, {width_name}={width}], got {list(x.shape)}")
        return x.reshape(-1, L, width).to(self.dtype)

    def _encode_layer(
        self, x_i: torch.Tensor, i: int, dead: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(values, indices, aux or None) of layer i's rows x_i [rows, d_in]."""
        W_enc, b_enc = self.encoder(i)
        if self.activation == "topk":
            aux_k = self.aux_k if dead is not None else 0
            precision = "certified" if self.config.precision == "auto" else self.config.precision
            encoded = topk_encode(
                x_i, W_enc, b_enc, self.k, dead_mask=dead, aux_k=aux_k, backend=self.backend, precision=precision
            )
            return encoded[0], encoded[1], (encoded[2], encoded[3]) if aux_k else None
        values, indices = threshold_encode(
            x_i, W_enc, b_enc, self.threshold(i), candidates=self._candidates[i], backend=self.backend
        )
        self._candidates[i] = _shared.next_candidates(self._candidates[i], values, self.n_latents)
        return values, indices, None

    def _decode_layers(
        self,
        latents: list[tuple[torch.Tensor, torch.Tensor]],
        x: torch.Tensor | None,
        aux: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(y_hat [rows, L, d_out], aux decodes) from each layer's (values, indices) [rows, slots]: one
        sparse_decode per source layer to all its targets, then per target the sum of its slices.
        With `aux` (AuxK latents per layer), the aux rows decode in the same sparse_decode as the
        main ones (stacked below them), so each decoder is read once per step: what an optimizer
        updating rows during backward needs. Returns each layer's aux decode [rows, (L - i) * d_out]."""
        L = self.n_layers
        decoded, aux_decoded = [], []
        for i, ((values, indices), W) in enumerate(zip(latents, self.decoder_matrices(), strict=True)):
            rows = values.shape[0]
            if aux is not None:
                values, indices = _stack_slots((values, indices), aux[i])
            out = sparse_decode(values.contiguous(), indices.contiguous(), W, None, backend=self.backend)
            if aux is None:
                decoded.append(out)
            else:
                # split, not two slices: its backward concatenates the two gradients instead of
                # zero-filling a full [2 rows, (L - i) d] tensor for each and adding them
                main, extra = out.split([rows, out.shape[0] - rows])
                decoded.append(main)
                aux_decoded.append(extra)
        b_dec = torch.stack([getattr(self, f"b_dec_{j}") for j in range(L)])
        y_hat = _target_sums(b_dec, decoded)
        if self.config.skip:
            skips = [x[:, j] @ getattr(self, f"W_skip_{j}").T for j in range(L)]
            y_hat = y_hat + torch.stack(skips, dim=1)
        return y_hat, aux_decoded if aux is not None else None

    # ------------------------------------------------------------------------------ interface

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """Every layer's latents of x [..., L, d_in]: values and int32 indices [..., L, slots]
        (slots = k for TopK; the largest per-row count, padded with (0, -1), for JumpReLU / ReLU)."""
        rows = self._stacked(x, "x", self.d_in, "d_in")
        per_layer = [self._encode_layer(rows[:, i].contiguous(), i, None)[:2] for i in range(self.n_layers)]
        return _stack_latents(per_layer, x.shape[:-2])

    def decode(self, latents: SparseLatents, x: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat [..., L, d_out] from latents [..., L, slots]; a skip CLT also needs x [..., L, d_in]."""
        values, indices = latents
        L = self.n_layers
        if values.dim() < 2 or values.shape[-2] != L or indices.shape != values.shape:
            shape = list(values.shape)
            raise ValueError(f"latents: expected values and indices [..., n_layers={L}, slots], got {shape}")
        lead = values.shape[:-2]
        slots = values.shape[-1]
        flat_v, flat_i = values.reshape(-1, L, slots), indices.reshape(-1, L, slots)
        rows = None
        if self.config.skip:
            if x is None:
                raise ValueError("x: a skip CLT's decode needs the inputs x [..., n_layers, d_in] for x W_skip^T")
            rows = self._stacked(x, "x", self.d_in, "d_in")
        y_hat, _ = self._decode_layers([(flat_v[:, i], flat_i[:, i]) for i in range(L)], rows)
        return y_hat.reshape(*lead, L, self.d_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor, dead_mask: torch.Tensor | None = None) -> CLTOutput:
        """Encodes every layer of x [..., L, d_in], predicts y [..., L, d_out] and scores it (see
        :class:`CLTOutput`). dead_mask: optional bool [L, n_latents] (TopK), the latents counted as
        dead per layer; enables the AuxK loss."""
        rows = self._stacked(x, "x", self.d_in, "d_in")
        if not isinstance(y, torch.Tensor) or y.shape[:-2] != x.shape[:-2]:
            shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected shape {[*x.shape[:-2], self.n_layers, self.d_out]}, got {shape}")
        target = self._stacked(y, "y", self.d_out, "d_out")
        L = self.n_layers
        if dead_mask is not None:
            if self.activation != "topk":
                raise ValueError("dead_mask: AuxK needs activation 'topk'")
            dead_mask = _check_layer_mask(dead_mask, L, self.n_latents, self.device)
        encoded = [
            self._encode_layer(rows[:, i].contiguous(), i, None if dead_mask is None else dead_mask[i])
            for i in range(L)
        ]
        aux = [a for _, _, a in encoded] if dead_mask is not None else None
        y_hat, aux_decoded = self._decode_layers([(v, idx) for v, idx, _ in encoded], rows, aux)
        acc = acc_dtype(self.dtype)
        error = y_hat.to(acc) - target.to(acc)
        target_acc = target.to(acc)
        sse = error.pow(2).sum(dim=(0, 2))  # [L]
        variance = (target_acc - target_acc.mean(0)).pow(2).sum(dim=(0, 2))
        fvu_per_layer = sse / variance
        fvu = fvu_per_layer.mean()
        auxk_loss = fvu.new_zeros(())
        if dead_mask is not None:
            auxk_loss = self._auxk_loss(aux_decoded, error.detach(), dead_mask)
        lead = x.shape[:-2]
        return CLTOutput(
            x_hat=y_hat.reshape(*lead, L, self.d_out),
            latents=_stack_latents([(v, idx) for v, idx, _ in encoded], lead),
            fvu=fvu,
            mse=sse.sum() / target.numel(),
            auxk_loss=auxk_loss,
            loss=fvu + self.config.auxk_alpha * auxk_loss,
            fvu_per_layer=fvu_per_layer.detach(),
        )

    def _auxk_loss(self, aux_decoded: list[torch.Tensor], error: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the AuxK loss (module docstring); error = y_hat - y [rows, L, d_out]."""
        total = error.new_zeros(())
        rows = error.shape[0]
        for i, aux_hat in enumerate(aux_decoded):
            residual = (-error[:, i:]).reshape(rows, -1)  # y - y_hat of the layers latents_i write to
            variance = (residual - residual.mean(0)).pow(2).sum()
            sse = (aux_hat.to(residual.dtype) - residual).pow(2).sum()
            scale = (dead_mask[i].sum().to(total.dtype) / self.aux_k).clamp(max=1.0)
            total = total + sse / variance * scale
        return total / self.n_layers


class _TargetSums(torch.autograd.Function):
    """y_hat [..., L, d] from b_dec [L, d] and each source layer's decode decoded_i [..., (L - i) d]:
    y_hat[..., j, :] = b_dec[j] + sum_{i <= j} decoded_i[..., j - i, :] (decoded_i viewed [..., L - i, d]).

    Written as slices of each decoded_i summed per target (21 slices at L = 6), autograd's backward
    zero-fills a full-size [rows, (L - i) d] gradient per slice and adds them up: 91 [rows, d] blocks
    written twice at L = 6 where 21 are needed. Here the gradient of decoded_i is the slice
    grad[..., i:, :] itself, flattened (one copy), and the forward is L in-place adds."""

    generate_vmap_rule = True  # the forward is plain torch ops on the trailing dims: vmap-able

    @staticmethod
    def forward(b_dec: torch.Tensor, *decoded: torch.Tensor) -> torch.Tensor:
        L, d = b_dec.shape
        # a new tensor from decoded_0 (batched under vmap as the other decodes are; dtype promoted as
        # b_dec + decoded_i promotes: fp32 under autocast's bf16 decodes), then in-place adds
        out = decoded[0].unflatten(-1, (L, d)) + b_dec
        for i in range(1, L):
            out[..., i:, :] += decoded[i].unflatten(-1, (L - i, d))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.lead = output.dim() - 2
        ctx.dtypes = [t.dtype for t in inputs]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        L = grad.shape[-2]
        db_dec = grad.sum(dim=tuple(range(ctx.lead))) if ctx.lead else grad
        parts = (grad[..., i:, :].flatten(-2) for i in range(L))
        return tuple(g.to(dtype) for g, dtype in zip((db_dec, *parts), ctx.dtypes, strict=True))


def _target_sums(b_dec: torch.Tensor, decoded: list[torch.Tensor]) -> torch.Tensor:
    """_TargetSums.apply: y_hat [..., L, d] of the stacked biases and the per-layer decodes."""
    return _TargetSums.apply(b_dec, *decoded)


def _check_layer_mask(mask: object, L: int, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"dead_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (L, n) or mask.device != device:
        raise ValueError(
            f"dead_mask: expected a bool tensor [n_layers={L}, n_latents={n}] on {device}, got "
            f"{mask.dtype} {list(mask.shape)} on {mask.device}"
        )
    return mask


def _stack_slots(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two padded latent sets [rows, s1] and [rows, s2] stacked as [2 rows, max(s1, s2)] (empty slots
    (0, -1) fill the narrower one)."""
    slots = max(first[0].shape[1], second[0].shape[1])
    values, indices = [], []
    for v, idx in (first, second):
        pad = slots - v.shape[1]
        values.append(torch.nn.functional.pad(v, (0, pad)) if pad else v)
        indices.append(torch.nn.functional.pad(idx, (0, pad), value=-1) if pad else idx)
    return torch.cat(values), torch.cat(indices)


def _stack_latents(per_layer: list[tuple[torch.Tensor, torch.Tensor]], lead: torch.Size) -> SparseLatents:
    """Per-layer (values, indices) [rows, slots_i] as SparseLatents [..., L, max slots], shorter
    layers padded with empty slots (0, -1)."""
    slots = max(v.shape[1] for v, _ in per_layer)
    values, indices = [], []
    for v, idx in per_layer:
        pad = slots - v.shape[1]
        if pad:
            v = torch.nn.functional.pad(v, (0, pad))
            idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
        values.append(v)
        indices.append(idx)
    L = len(per_layer)
    return SparseLatents(
        torch.stack(values, dim=1).reshape(*lead, L, slots), torch.stack(indices, dim=1).reshape(*lead, L, slots)
    )
