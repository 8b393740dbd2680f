"""Training past one device with torch.distributed (launched with torchrun).

- **Data parallel**: flashsae's SAEs are plain nn.Modules, so torch's DistributedDataParallel wraps them
  (dense gradients); :func:`reduce_gradients` averages gradients over the replicas once per step and
  also handles row-sparse gradients (SparseAdam), which DDP's hooks never see.
- **Latent sharded (tensor parallel)**: :class:`ShardedTopKSAE` splits the latents over T ranks (n / T
  rows of W_enc, b_enc, W_dec each): local fused top-k, a global top-k over the T * k candidates per
  row (all_gather), decoder partial sums all-reduced. :class:`DeadLatents` keeps the dead-latent
  counters sharded. :func:`save_sharded` / :func:`load_sharded` write and read one file per shard and
  reload on any number of shards (:func:`consolidate`: one single-device SAE).
- Both combine: :func:`init_layout` arranges the world as data-parallel replicas of T shards.

``python -m flashsae.distributed.train`` trains a latent-sharded / data-parallel TopK SAE from a
``flashsae cache`` directory under torchrun (see its docstring for the launch commands).
"""

from .checkpoint import consolidate, load_optimizer_sharded, load_sharded, read_index, save_sharded
from .data_parallel import reduce_gradients
from .layout import Layout, init_from_environment, init_layout, shard_range, single_process
from .tensor_parallel import DeadLatents, ShardedTopKSAE

__all__ = [
    "DeadLatents",
    "Layout",
    "ShardedTopKSAE",
    "consolidate",
    "init_from_environment",
    "init_layout",
    "load_optimizer_sharded",
    "load_sharded",
    "read_index",
    "reduce_gradients",
    "save_sharded",
    "shard_range",
    "single_process",
]
