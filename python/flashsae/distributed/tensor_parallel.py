"""ShardedTopKSAE: a TopK SAE whose latents are split across the ranks of a tensor-parallel group.

Each of the T ranks holds a contiguous block of n / T latents: its rows of W_enc, b_enc and W_dec;
b_dec is replicated. Per step and batch x (the same x on the T ranks of a replica):

1. local fused top-k: ``topk_encode`` over this rank's latents (no [batch, n] anywhere, as on one
   device), giving k candidates per row (k_local = min(k, rows held));
2. global top-k: the T * k candidate (value, global index) pairs of every row are all-gathered
   (``B * T * k`` values, not [B, n]) and a stable descending sort keeps the top k. Each rank's list is
   sorted with ties to the lower index and ranks hold ascending latent blocks, so the stable sort of
   the concatenation breaks ties toward the lower global index: the exact selection of a single-device
   ``topk_encode``;
3. decoder partial sums: each rank decodes the selected slots that are its own (the others masked to
   index -1) and the partial reconstructions are all-reduced (``b_dec`` added by shard 0 only). The
   loss is computed identically on every rank; the all-reduce's backward is the identity (every rank's
   partial receives the full gradient of the replicated loss), so each rank's gradients are those of
   its own rows;
4. AuxK the same way over the dead latents: local top-aux_k among this shard's dead latents, global
   top-aux_k over the gathered candidates, partial e_hat all-reduced; the AuxK scale uses the global
   number of dead latents (one scalar all-reduce). Dead-latent statistics stay sharded
   (:class:`DeadLatents`).

Gradients after backward: W_enc, b_enc, W_dec are complete for this shard; b_dec's is partial (its
encoder term, -sum_i db_enc_i W_enc_i, runs over this shard's latents only), so
:func:`flashsae.distributed.reduce_gradients` sums it over the shards before the optimizer step, and
averages everything over the data-parallel replicas. Row-sparse gradients (SparseAdam) work per shard
as on one device.

Multi-TopK (a second selection of 4k) and the foreign-format options (apply_b_dec_to_input=False,
input_norm) are not supported here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_latents
from ..modules.base import SAE, ConfigField
from ..modules.topk import TopKConfig, TopKSAE
from ..ops import sparse_decode, topk_encode
from ..ops._common import acc_dtype
from ..outputs import ForwardOutput, SparseLatents
from .layout import Layout, all_gather_cat, all_reduce_, group_size, shard_range


class _SumOverShards(torch.autograd.Function):
    """Forward: all_reduce(sum) of the shards' partial sums. Backward: the identity (the loss is
    computed identically on every shard, so each partial gets the full gradient)."""

    @staticmethod
    def forward(partial: torch.Tensor, group: object | None) -> torch.Tensor:
        total = partial.clone()
        all_reduce_(total, group)
        return total

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pass  # the backward is the identity: nothing to keep

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ShardedTopKSAE(SAE):
    """A TopK SAE (Gao et al. 2024) whose latents are sharded over a tensor-parallel group.

    Args:
        config: the whole SAE's :class:`~flashsae.modules.topk.TopKConfig` (n_latents is the global n).
        layout: this rank's :class:`~flashsae.distributed.Layout`.
        dtype, device, backend: as for TopKSAE.
        seed: initialization seed; shard t draws its rows from a generator seeded with (seed, t), so
            a run is reproducible for a given world layout. To start from a given SAE instead, use
            :meth:`from_full` (same weights as the single-device SAE, for any number of shards).

    Parameters: ``W_enc`` [n_local, d], ``b_enc`` [n_local], ``W_dec`` [n_local, d] (this shard's rows,
    latents ``start .. end - 1``), ``b_dec`` [d] (replicated). ``forward`` returns the single-device
    TopKSAE's :class:`~flashsae.outputs.ForwardOutput`, with global latent indices; its latents are
    detached (gradients flow through the losses).
    """

    architecture = ""  # not in the registry: saved with flashsae.distributed.save_sharded
    config_class = TopKConfig
    config: TopKConfig

    def __init__(
        self,
        config: TopKConfig,
        layout: Layout,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(config, dtype=dtype, device=device, backend=backend)
        if config.multi_topk:
            raise ValueError("config: multi_topk is not supported by ShardedTopKSAE")
        if not config.apply_b_dec_to_input or config.input_norm != "none":
            raise ValueError(
                "config: ShardedTopKSAE encodes x - b_dec without input normalization (Gao et al.); "
                f"got apply_b_dec_to_input={config.apply_b_dec_to_input}, input_norm={config.input_norm!r}"
            )
        if config.precision == "fast":
            # the global top-k merges the shards' exact scores; every other precision returns them
            raise ValueError("config: precision='fast' is not supported by ShardedTopKSAE")
        if config.n_latents < layout.tensor_parallel:
            raise ValueError(
                f"config: n_latents ({config.n_latents}) must be at least the number of shards "
                f"({layout.tensor_parallel})"
            )
        self.layout = layout
        self.start, self.end = layout.shard(config.n_latents)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + layout.tp_rank)
        decoder = torch.randn(self.n_local, config.d_in, generator=generator, dtype=torch.float32)
        decoder /= decoder.norm(dim=1, keepdim=True)
        dtype, device = self._init_dtype, self._init_device
        self.W_enc = nn.Parameter(decoder.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.n_local, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(decoder.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in, dtype=dtype, device=device))

    @classmethod
    def from_full(cls, sae: TopKSAE, layout: Layout, *, backend: str | None = None) -> ShardedTopKSAE:
        """This rank's shard of a single-device TopKSAE (same weights: the sharded SAE computes the same
        function and, trained on the same data, the same updates)."""
        sharded = cls(sae.config, layout, dtype=sae.dtype, device=sae.device, backend=backend)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec"):
                getattr(sharded, name).copy_(getattr(sae, name)[sharded.start : sharded.end])
            sharded.b_dec.copy_(sae.b_dec)
        sharded.metadata = dict(sae.metadata)
        return sharded

    @property
    def n_local(self) -> int:
        return self.end - self.start

    k = ConfigField()
    aux_k = ConfigField()

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every shard holds whole, whose gradients are partial sums over the shards."""
        return [self.b_dec]

    def extra_repr(self) -> str:
        shard = f"shard {self.layout.tp_rank}/{self.layout.tensor_parallel}"
        return f"{super().extra_repr()}, {shard}: latents [{self.start}, {self.end})"

    def save(self, path) -> None:  # type: ignore[override]
        raise NotImplementedError("ShardedTopKSAE: use flashsae.distributed.save_sharded (every rank calls it)")

    # ------------------------------------------------------------------------------ selection

    def _slots(self, wanted: int) -> tuple[int, int]:
        """(slots this shard selects locally, slots every shard contributes to the gather): the widest
        shard's min(wanted, rows) so that all_gather sees one shape."""
        widest = -(-self.config.n_latents // self.layout.tensor_parallel)
        return min(wanted, self.n_local), min(wanted, widest)

    def _global_top(
        self, values: torch.Tensor, local_idx: torch.Tensor, count: int, padded: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top `count` of every shard's candidates (local [B, k_local], index -1 = empty slot).
        Returns (values, global int32 indices) [B, count] (empty: 0, -1) and the [B, k_local] mask of
        this shard's candidates that were selected."""
        rows, local = values.shape
        acc = acc_dtype(values.dtype)
        key = values.detach().to(acc).masked_fill(local_idx < 0, float("-inf"))
        ids = torch.where(local_idx >= 0, local_idx.to(torch.int64) + self.start, -1)
        if padded > local:
            key = torch.cat([key, key.new_full((rows, padded - local), float("-inf"))], 1)
            ids = torch.cat([ids, ids.new_full((rows, padded - local), -1)], 1)
        group = self.layout.tp_group
        keys, all_ids = all_gather_cat(key, group, dim=1), all_gather_cat(ids, group, dim=1)
        order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :count]
        top_keys, top_ids = keys.gather(1, order), all_ids.gather(1, order)
        empty = top_keys == float("-inf")
        position = order - self.layout.tp_rank * padded
        mine = (position >= 0) & (position < local) & ~empty
        hits = torch.zeros(rows, local, dtype=torch.int32, device=values.device)
        hits.scatter_add_(1, position.clamp(0, local - 1), mine.to(torch.int32))
        selected = (top_keys.masked_fill(empty, 0.0).to(values.dtype), top_ids.masked_fill(empty, -1).to(torch.int32))
        return *selected, hits > 0

    def _decode_mine(self, values, local_idx, mine, with_bias: bool) -> torch.Tensor:
        """This shard's part of a reconstruction from its selected slots, summed over the shards."""
        own_values = torch.where(mine, values, torch.zeros_like(values))
        own_idx = torch.where(mine, local_idx, torch.full_like(local_idx, -1))
        bias = self.b_dec if with_bias and self.layout.tp_rank == 0 else None
        partial = sparse_decode(own_values.contiguous(), own_idx.contiguous(), self.W_dec, bias, backend=self.backend)
        return _SumOverShards.apply(partial, self.layout.tp_group)

    # ------------------------------------------------------------------------------- interface

    def encode(self, x: torch.Tensor) -> SparseLatents:
        """The global top-k latents of x [..., d_in] (global int32 indices), as TopKSAE.encode."""
        rows = self._rows(x)
        local, padded = self._slots(self.k)
        values, idx = topk_encode(
            rows, self.W_enc, self.b_enc, local, self.b_dec, backend=self.backend, precision=self.config.precision
        )
        top_values, top_idx, _ = self._global_top(values, idx, self.k, padded)
        lead = x.shape[:-1]
        return SparseLatents(top_values.reshape(*lead, self.k), top_idx.reshape(*lead, self.k))

    def decode(self, latents: SparseLatents) -> torch.Tensor:
        """x_hat [..., d_in] from global latents (every shard decodes its own rows; summed)."""
        values, indices = check_latents(latents)
        lead, slots = values.shape[:-1], values.shape[-1]
        values = values.reshape(-1, slots).to(self.dtype)
        indices = indices.reshape(-1, slots).to(torch.int64)
        mine = (indices >= self.start) & (indices < self.end)
        local_idx = torch.where(mine, indices - self.start, -1).to(torch.int32)
        return self._decode_mine(values, local_idx, mine, with_bias=True).reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """As TopKSAE.forward on the whole SAE. dead_mask: optional [n_local] bool, this shard's dead
        latents (see :class:`DeadLatents`); every shard passes one or none."""
        cfg = self.config
        rows = self._rows(x)
        use_aux = dead_mask is not None
        local, padded = self._slots(cfg.k)
        aux_local, aux_padded = self._slots(cfg.aux_k)
        encoded = topk_encode(
            rows, self.W_enc, self.b_enc, local, self.b_dec, dead_mask=dead_mask,
            aux_k=aux_local if use_aux else 0, backend=self.backend, precision=cfg.precision,
        )  # fmt: skip
        values, idx = encoded[:2]
        top_values, top_idx, mine = self._global_top(values, idx, cfg.k, padded)
        self.last_fired = idx[mine & (values > 0)].long()  # this shard's latents that fired (dead-latent stats)
        x_hat = self._decode_mine(values, idx, mine, with_bias=True)
        acc = acc_dtype(rows.dtype)
        x_acc = rows.to(acc)
        total_variance = (x_acc - x_acc.mean(0)).pow(2).sum()
        residual = x_hat.to(acc) - x_acc
        sse = residual.pow(2).sum()
        fvu = sse / total_variance
        auxk_loss = sse.new_zeros(())
        if use_aux:
            aux_values, aux_idx = encoded[2:]
            _, _, aux_mine = self._global_top(aux_values, aux_idx, cfg.aux_k, aux_padded)
            e_hat = self._decode_mine(aux_values, aux_idx, aux_mine, with_bias=False)
            auxk = (e_hat.to(acc) + residual.detach()).pow(2).sum() / total_variance
            dead = dead_mask.sum().to(acc).reshape(1)
            all_reduce_(dead, self.layout.tp_group)
            auxk_loss = auxk * (dead[0] / cfg.aux_k).clamp(max=1.0)  # sparsify's scale, as TopKSAE
        lead = x.shape[:-1]
        return ForwardOutput(
            x_hat=x_hat.reshape(*lead, self.d_in),
            latents=SparseLatents(top_values.reshape(*lead, cfg.k), top_idx.reshape(*lead, cfg.k)),
            fvu=fvu,
            mse=sse / rows.numel(),
            auxk_loss=auxk_loss,
            loss=fvu + cfg.auxk_alpha * auxk_loss,
        )

    # ---------------------------------------------------------------------------------- gather

    @torch.no_grad()
    def gather_full(self, dst: int = 0) -> TopKSAE | None:
        """The whole SAE as a single-device TopKSAE on rank `dst` of the tensor-parallel group (None
        on the others); every shard calls it. Holds all n latents in one process: for moderate n, or
        use save_sharded + consolidate."""
        group = self.layout.tp_group
        parts: dict[str, list[torch.Tensor]] = {}
        for name in ("W_enc", "b_enc", "W_dec"):
            local = getattr(self, name).detach()
            if group_size(group) == 1:
                parts[name] = [local]
                continue
            widest = -(-self.config.n_latents // self.layout.tensor_parallel)
            padded = local.new_zeros((widest, *local.shape[1:]))
            padded[: local.shape[0]] = local
            gathered = [torch.empty_like(padded) for _ in range(group_size(group))]
            dist.all_gather(gathered, padded, group=group)
            bounds = (shard_range(self.config.n_latents, self.layout.tensor_parallel, t) for t in range(len(gathered)))
            sizes = [stop - begin for begin, stop in bounds]
            parts[name] = [g[:size] for g, size in zip(gathered, sizes, strict=True)]
        if self.layout.tp_rank != dst:
            return None
        sae = TopKSAE.from_config(self.config, dtype=self.dtype, device=self.device, backend=self.backend)
        for name, chunks in parts.items():
            getattr(sae, name).copy_(torch.cat(chunks))
        sae.b_dec.copy_(self.b_dec)
        sae.metadata = dict(self.metadata)
        return sae


class DeadLatents:
    """Tokens since each of this shard's latents last fired, kept identical on the data-parallel
    replicas of the shard (a latent fired if it fired on any replica's batch).

    ``update(fired, tokens)`` after each step (fired: this shard's local latent ids that fired in the
    local batch, e.g. ``sae.last_fired``; tokens: the local batch size); ``dead_mask(threshold)`` gives
    the [n_local] mask ShardedTopKSAE.forward takes; ``dead_fraction()`` the global share of dead latents.
    """

    def __init__(self, n_local: int, layout: Layout, device: torch.device | str | None = None) -> None:
        self.layout = layout
        self.since_fired = torch.zeros(n_local, dtype=torch.int64, device=device)

    def update(self, fired: torch.Tensor, tokens: int) -> None:
        hit = torch.zeros_like(self.since_fired, dtype=torch.int32)
        hit[fired] = 1
        all_reduce_(hit, self.layout.dp_group, op=dist.ReduceOp.MAX if dist.is_available() else None)
        self.since_fired += tokens * self.layout.dp_size
        self.since_fired[hit.bool()] = 0

    def dead_mask(self, threshold: int) -> torch.Tensor:
        return self.since_fired >= threshold

    def dead_fraction(self, threshold: int) -> float:
        counts = torch.tensor(
            [float(self.dead_mask(threshold).sum()), float(self.since_fired.numel())], dtype=torch.float64
        ).to(self.since_fired.device)
        all_reduce_(counts, self.layout.tp_group)
        return float(counts[0] / counts[1])
