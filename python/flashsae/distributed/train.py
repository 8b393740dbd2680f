"""``python -m flashsae.distributed.train``: a latent-sharded and/or data-parallel TopK SAE, under torchrun.

Activations come from a ``flashsae cache`` directory (every rank reads its own rows, memory-mapped), so
the language model runs once, not once per GPU::

    flashsae cache --model meta-llama/Llama-3.1-8B --hookpoints model.layers.16 --out acts --cache-tokens 200000000
    # one node, 8 GPUs, latents sharded 8 ways (n / 8 latents per GPU):
    torchrun --nproc-per-node 8 -m flashsae.distributed.train --activations acts --tensor-parallel 8 \\
        --n-latents 16M --k 64 --batch-size 8192 --optimizer sparse_adam --out runs/wide
    # two nodes: 2 data-parallel replicas of 8 shards (run on each node, same rendezvous endpoint):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m flashsae.distributed.train --activations acts --tensor-parallel 8 --n-latents 16M ... --out runs/wide
    # continue a run (any world size: the checkpoint is resharded on load):
    torchrun --nproc-per-node 8 -m flashsae.distributed.train --out runs/wide --resume --activations acts ...

Flags: those of ``flashsae train`` (the same TrainConfig: --n-latents, --k, --batch-size, --train-tokens,
--lr, the schedule, Adam's betas, --optimizer, --optimizer-state-dtype, --dead-tokens, ...; sizes take
k/M/G = 2^10/2^20/2^30), plus ``--tensor-parallel T`` (latent shards per replica; the world size over T
is the number of data-parallel replicas) and ``--param-dtype`` (float32 or bfloat16 weights).
``--batch-size`` is the global batch: each replica takes batch_size / replicas rows of it, so a run's
result does not depend on how many replicas share it (gradients are averaged).

Per step: the batch's rows for this replica, the sharded forward (ShardedTopKSAE: local fused top-k,
global top-k over the gathered candidates, all-reduced decoder partials, AuxK over sharded dead-latent
counters), backward, :func:`reduce_gradients`, the unit-norm decoder step, Adam / SparseAdam.
Checkpoints (``<out>/checkpoint``, sharded, atomic) every --checkpoint-every steps and at the end; the
trained SAE is written sharded to ``<out>/sae`` with the activation scale folded in (read it with
``flashsae.distributed.load_sharded`` on any world size, or ``consolidate`` into one TopKSAE).
Rank 0 prints progress and writes ``<out>/metrics.jsonl``. Device: cuda (LOCAL_RANK's GPU, nccl) when
available, else cpu (gloo).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..cli_args import add_config_flags
from ..modules.topk import TopKConfig
from ..train.cache import CachedActivations
from ..train.config import TrainConfig
from ..train.step import flush_optimizer, make_optimizer, optimizer_step
from ..train.trainer import INIT_SAMPLE_TOKENS, fold_activation_scale_
from .checkpoint import load_optimizer_sharded, load_sharded, read_index, save_sharded
from .data_parallel import reduce_gradients
from .layout import Layout, all_reduce_, init_from_environment
from .tensor_parallel import DeadLatents, ShardedTopKSAE

CHECKPOINT = "checkpoint"
SAE_DIR = "sae"
METRICS = "metrics.jsonl"


def _log(layout: Layout, message: str) -> None:
    if layout.rank == 0:
        print(message, flush=True)


class DistributedTrainer:
    """The loop described in the module docstring; ``train()`` runs it to the end."""

    def __init__(self, config: TrainConfig, layout: Layout, *, param_dtype: torch.dtype = torch.float32) -> None:
        if config.activations is None:
            raise ValueError(
                "activations: the distributed trainer reads a flashsae cache (make one with flashsae cache)"
            )
        if config.architecture != "topk":
            raise ValueError(f"architecture: the distributed trainer trains topk SAEs, got {config.architecture!r}")
        self.config, self.layout = config, layout
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.out = Path(config.out or "flashsae-runs/distributed")
        if config.batch_size % layout.dp_size:
            raise ValueError(f"batch_size: {config.batch_size} does not split over {layout.dp_size} replicas")
        self.local_batch = config.batch_size // layout.dp_size
        self.source = CachedActivations(
            config.activations, hookpoints=config.hookpoints, batch_size=self.local_batch, seed=config.seed,
            device=self.device,
        )  # fmt: skip
        if len(self.source.hookpoints) != 1:
            raise ValueError(
                f"hookpoints: the cache holds {', '.join(self.source.hookpoints)}; choose one with --hookpoints"
            )
        self.hookpoint = self.source.hookpoints[0]
        d = self.source.widths[self.hookpoint]
        options = {"d_in": d, "n_latents": config.n_latents or config.expansion_factor * d}
        options["k"] = config.resolved_k()
        sae_config = TopKConfig(**(options | config.sae_options))
        self.step = 0
        if config.resume:
            self.sae, since_fired = load_sharded(
                self.out / CHECKPOINT, layout, device=self.device, dtype=param_dtype, verify=config.verify
            )
            extra = read_index(self.out / CHECKPOINT)["extra"]
            self.step, self.scale = int(extra["step"]), float(extra["scale"])
        else:
            if (self.out / CHECKPOINT).exists():
                raise FileExistsError(f"out: {self.out} already holds a run; pass --resume to continue it")
            torch.manual_seed(config.seed)
            self.sae = ShardedTopKSAE(sae_config, layout, dtype=param_dtype, device=self.device, seed=config.seed)
            sample = self.source.peek(INIT_SAMPLE_TOKENS)[self.hookpoint].float()
            mean_norm = sample.norm(dim=1).mean().item()
            self.scale = math.sqrt(d) / mean_norm if config.normalize_activations else 1.0
            if config.b_dec_init != "zeros":
                self.sae.init_b_dec_(sample * self.scale, method=config.b_dec_init)
                if layout.world_size > 1:  # one b_dec for every rank, whatever the hardware's rounding
                    dist.broadcast(self.sae.b_dec.data, src=0)
            since_fired = None
        self.base_lr = config.resolved_lr(self.sae.n_latents)
        self.optimizer = make_optimizer(self.sae.parameters(), config, self.base_lr)
        if config.resume:
            load_optimizer_sharded(self.out / CHECKPOINT, self.sae, self.optimizer)
        self.dead = DeadLatents(self.sae.n_local, layout, device=self.device)
        if since_fired is not None:
            self.dead.since_fired.copy_(since_fired)
        self.dead_tokens = config.resolved_dead_tokens()

    def train_step(self) -> dict[str, float]:
        config, layout, sae = self.config, self.layout, self.sae
        # this replica's rows of the global batch: the stream position is a function of the step
        self.source.served = self.step * config.batch_size + layout.dp_rank * self.local_batch
        x = self.source.next_batch()[self.hookpoint].to(sae.dtype) * self.scale
        dead = self.dead.dead_mask(self.dead_tokens)
        any_dead = dead.any().to(torch.int32).reshape(1)
        all_reduce_(any_dead, layout.tp_group, op=dist.ReduceOp.MAX)  # every shard takes the same path
        out = sae(x, dead_mask=dead if bool(any_dead) else None)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"training diverged: loss {out.loss.item()} at step {self.step}; lower --lr")
        out.loss.backward()
        reduce_gradients(sae, layout)
        optimizer_step(sae, self.optimizer, self.base_lr * config.lr_factor(self.step))
        self.dead.update(sae.last_fired, self.local_batch)
        self.step += 1
        figures = torch.tensor([out.loss.item(), out.fvu.item()], dtype=torch.float64, device=self.device)
        all_reduce_(figures, layout.dp_group)
        figures /= layout.dp_size
        return {"loss": float(figures[0]), "fvu": float(figures[1])}

    def save_checkpoint(self) -> None:
        save_sharded(
            self.out / CHECKPOINT, self.sae, self.optimizer, since_fired=self.dead.since_fired,
            extra={"step": self.step, "scale": self.scale, "config": self.config.to_dict()},
        )  # fmt: skip

    def train(self) -> Path:
        config, layout = self.config, self.layout
        total = config.steps
        every = config.resolved_checkpoint_every()
        if layout.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = open(self.out / METRICS, "a" if config.resume else "w")  # noqa: SIM115
        _log(
            layout,
            f"flashsae.distributed.train: {self.sae.n_latents:,} latents x d={self.sae.d_in}, k={self.sae.k}, "
            f"{layout.dp_size} replica(s) x {layout.tensor_parallel} shard(s), global batch {config.batch_size}, "
            f"{config.optimizer}, steps {self.step} -> {total}",
        )
        started = time.perf_counter()
        first = self.step
        try:
            while self.step < total:
                figures = self.train_step()
                if self.step % config.log_every == 0 or self.step == total:
                    record: dict[str, Any] = {"step": self.step, "tokens": self.step * config.batch_size, **figures}
                    record["dead_pct"] = 100 * self.dead.dead_fraction(self.dead_tokens)
                    elapsed = time.perf_counter() - started
                    record["tokens_per_s"] = (self.step - first) * config.batch_size / elapsed if elapsed else 0.0
                    if layout.rank == 0:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    _log(
                        layout,
                        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                    )
                if every and self.step % every == 0 and self.step < total:
                    self.save_checkpoint()
            self.save_checkpoint()
        finally:
            if layout.rank == 0:
                metrics.close()
        flush_optimizer(self.sae, self.optimizer)  # dense Adam's weights for every row, after the checkpoint
        fold_activation_scale_(self.sae, self.scale)  # the saved SAE takes raw activations
        self.sae.metadata = {
            "hookpoint": self.hookpoint,
            "activation_scale": self.scale,
            "activation_scale_folded": True,
            "steps": self.step,
            "trained_tokens": self.step * config.batch_size,
            "train_config": config.to_dict(),
        }
        path = save_sharded(self.out / SAE_DIR, self.sae)
        _log(layout, f"saved the sharded SAE to {path} (flashsae.distributed.consolidate({str(path)!r}) for one file)")
        return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flashsae.distributed.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add_config_flags(parser, TrainConfig)
    parser.add_argument("--tensor-parallel", type=int, default=1, help="latent shards per replica (default: 1)")
    parser.add_argument(
        "--param-dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype (default: float32)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    tensor_parallel = args.pop("tensor_parallel")
    param_dtype = getattr(torch, args.pop("param_dtype"))
    if "sae_options" in args:
        args["sae_options"] = dict(args["sae_options"])
    args.setdefault("device", "auto")
    try:
        config = TrainConfig(**args)
        layout = init_from_environment(tensor_parallel)
        DistributedTrainer(config, layout, param_dtype=param_dtype).train()
    except (ValueError, TypeError, OSError) as exc:
        print(f"flashsae.distributed.train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
