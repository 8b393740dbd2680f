"""How ranks are arranged: data parallel x latent-sharded (tensor parallel), and the collectives on them.

With world size W and T latent shards (``tensor_parallel``), there are D = W / T data-parallel replicas.
Rank r is shard ``r % T`` of replica ``r // T``: the T ranks of one replica are consecutive (one node's
GPUs, where the per-step all_gather / all_reduce of the shards is cheapest over NVLink), and the D
ranks holding the same shard form its data-parallel group.

Every collective here is a no-op on a group of one, so the same code runs single-process, data
parallel, latent sharded, or both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._checks import positive_int


def shard_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n rows are cut into `parts` contiguous blocks, the first
    n % parts blocks one row longer."""
    if not 0 <= index < parts:
        raise ValueError(f"index: expected 0 <= index < {parts}, got {index}")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Layout:
    """This rank's place in the data-parallel x tensor-parallel grid."""

    world_size: int
    rank: int
    tensor_parallel: int
    """Latent shards per replica (T)."""
    tp_rank: int
    """Which shard this rank holds (0 .. T - 1)."""
    dp_size: int
    """Data-parallel replicas (D = world_size / T)."""
    dp_rank: int
    tp_group: object | None = None
    """Process group of the T shards of this replica (None when T == 1)."""
    dp_group: object | None = None
    """Process group of the D replicas of this shard (None when D == 1)."""

    def shard(self, n: int) -> tuple[int, int]:
        """[start, end) of the latents this rank holds."""
        return shard_range(n, self.tensor_parallel, self.tp_rank)

    @property
    def writes_shards(self) -> bool:
        """Replica 0 writes the sharded checkpoints (the other replicas hold the same values)."""
        return self.dp_rank == 0


def single_process() -> Layout:
    return Layout(world_size=1, rank=0, tensor_parallel=1, tp_rank=0, dp_size=1, dp_rank=0)


def init_layout(tensor_parallel: int = 1) -> Layout:
    """The layout of this rank (torch.distributed must be initialized when the world has more than one
    rank; creates the process groups, a collective call every rank makes in the same order)."""
    positive_int("tensor_parallel", tensor_parallel)
    if not dist.is_available() or not dist.is_initialized():
        if tensor_parallel != 1:
            raise ValueError(
                "tensor_parallel: torch.distributed is not initialized; launch with torchrun and call "
                "torch.distributed.init_process_group first"
            )
        return single_process()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tensor_parallel:
        raise ValueError(f"tensor_parallel: {tensor_parallel} does not divide the world size {world}")
    replicas = world // tensor_parallel
    tp_group = dp_group = None
    for replica in range(replicas):  # every rank creates every group, in the same order
        group = dist.new_group([replica * tensor_parallel + t for t in range(tensor_parallel)])
        if replica == rank // tensor_parallel and tensor_parallel > 1:
            tp_group = group
    for shard in range(tensor_parallel):
        group = dist.new_group([replica * tensor_parallel + shard for replica in range(replicas)])
        if shard == rank % tensor_parallel and replicas > 1:
            dp_group = group
    return Layout(
        world_size=world,
        rank=rank,
        tensor_parallel=tensor_parallel,
        tp_rank=rank % tensor_parallel,
        dp_size=replicas,
        dp_rank=rank // tensor_parallel,
        tp_group=tp_group,
        dp_group=dp_group,
    )


def init_from_environment(tensor_parallel: int = 1, backend: str | None = None) -> Layout:
    """Initializes torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...) when
    it is there, and returns the layout; a plain ``python`` launch is a world of one. Backend: nccl for
    CUDA (LOCAL_RANK picks the GPU), gloo otherwise."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return init_layout(tensor_parallel)


# ------------------------------------------------------------------------------------- collectives


def group_size(group: object | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(tensor: torch.Tensor, group: object | None, op=None) -> torch.Tensor:
    """In-place all_reduce (sum by default); no-op on a group of one."""
    if group is not None and group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def all_gather_cat(tensor: torch.Tensor, group: object | None, dim: int = 0) -> torch.Tensor:
    """The tensors of every rank of the group (same shape on each), concatenated along `dim` in rank order."""
    size = group_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_gather_ragged(tensor: torch.Tensor, group: object | None) -> list[torch.Tensor]:
    """Every rank's tensor (same trailing shape, any length along dim 0), in rank order: the lengths
    are gathered first and the tensors padded to the longest (gloo and nccl gather equal shapes)."""
    size = group_size(group)
    if size == 1:
        return [tensor]
    length = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    lengths = all_gather_cat(length, group).tolist()
    longest = max(lengths)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_cat(padded.unsqueeze(0), group)
    return [gathered[i, :length] for i, length in enumerate(lengths)]
