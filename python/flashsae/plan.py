"""``flashsae plan``: how much memory a TopK SAE training step needs, flashsae vs a dense PyTorch SAE.

    flashsae plan --d 4096 --n 16M --k 64 --batch 8192            (sizes: plain integers, or k/M/G = 2^10/2^20/2^30)
    flashsae plan --d 4096 --n 2^22 --k 64 --batch 8192 --gpu h100 --state-dtype float32

For each of the two it prints the memory per component and the peak of one training step (forward,
backward, optimizer step), whether that fits the GPU, and the widest SAE (n) that does:

- **weights**: W_enc, W_dec [n, d], b_enc [n], b_dec [d] (+ a float32 master copy with --master-weights).
- **gradients**: flashsae with sparse_adam keeps row-sparse gradients: the m touched rows of each matrix,
  m = min(n, batch * k + AuxK rows), plus b_enc's dense [n]; dense PyTorch (and flashsae with --optimizer
  adam) hold full [n, d] gradients.
- **optimizer**: Adam's two moments per parameter (flashsae: --state-dtype; torch keeps them in the
  parameter dtype) and sparse_adam's int64 last-update step per row. ``--moments row`` keeps one float32
  second moment per row of W_enc / W_dec; ``--moments row-int8`` also an int8 first moment with a
  float32 scale per row (1 byte per weight; flashsae.optim.SparseAdam's moments).
- **activations**: what a step allocates besides gradients. flashsae: the batch, the latents, x_hat, the
  fused encoder's scratch (Triton: a [batch, chunks, next_pow2(k)] int64 candidate list; CPU: one
  [batch, tile] float32 tile); never [batch, n]. The backward holds at most two [m, d] blocks: the
  decoder's gathered rows + dW_dec, then dW_dec + dW_enc (the encoder gathers no rows, and the
  gathered decoder rows are freed before dW_enc exists), which the gradients term counts. Dense PyTorch:
  3 [batch, n] tensors at once (pre-activations kept for relu, the dense latent matrix kept for the
  decoder GEMM, and the gradient in flight), 4 with AuxK.
- **buffer**: flashsae train's shuffle buffer on the device: (buffer_tokens + one model chunk) x d.

Cross-layer transcoders (``--architecture clt --n-layers L``, n latents per layer, inputs and targets
of width d): weights L [n, d] encoders and decoders W_dec_i [n, (L - i) d] (L (L + 1) / 2 [n, d] blocks)
with biases; sparse_adam's moments and per-row steps for all of them; gradients: the rows are updated
during backward a chunk at a time (flashsae train's default for a CLT), so one chunk (4M elements) plus
the dense biases; activations: the [B, L, d] inputs and targets, each layer's contiguous input, the
latents, every layer's decode to its targets (B x L (L + 1) / 2 x d, and its gradient in backward), the
predictions and one layer's encoder scratch. Dense baseline: the same math in plain PyTorch with torch
Adam, 2 L + 1 [batch, n] tensors alive. The buffer holds inputs and targets (2 L sites).

``peak`` is not the sum: the activations' peak (forward, early backward) and the gradients' peak
(end of backward, optimizer step) overlap only in part. Per phase, with R = weights + optimizer + buffer:
flashsae: R + max(forward activations, backward activations + gradients); dense:
R + batch + max(3 [batch, n] + dW_dec, 1 [batch, n] + dW_enc + dW_dec) (the autograd order of the
dense SAE: measured, see tests/test_plan.py). Multi-GPU: --tensor-parallel P gives the per-device
memory of a latent-sharded flashsae SAE (n / P latents per device, flashsae.distributed); the dense
baseline is single-device.

The model is checked against measured peak memory on CPU at small sizes (tests/test_plan.py; peak RSS
with glibc's mmap threshold fixed so freed tensors leave the resident set, as a GPU allocator's
max_memory_allocated would count them); the CUDA caching allocator and cuBLAS workspaces add what
--reserve stands for.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

from ._checks import positive_int
from .cli_args import field_docs, parse_bytes, parse_count

# the CPU encoder's pre-activation tile and the row-sparse encoder backward's W_enc chunk (elements)
from .ops._row_grads import DB_DEC_CHUNK_ELEMENTS, EAGER_CHUNK_ELEMENTS
from .ops.topk_encode import TILE_ELEMENTS as CPU_TILE_ELEMENTS

#: Usable device memory of common GPUs (nvidia-smi's total, MiB).
GPUS: dict[str, int] = {
    "h200": 143771,
    "h100": 81559,
    "a100-80gb": 81920,
    "a100-40gb": 40960,
    "l40s": 46068,
    "a10g": 23028,
    "rtx4090": 24564,
}
#: Streaming multiprocessors (the Triton encoder sizes its candidate chunks by them); H100/H200: 132.
DEFAULT_SMS = 132
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
#: Model chunk the shuffle buffer holds on top of buffer_tokens (flashsae train: 32 contexts x 128 tokens).
CHUNK_TOKENS = 4096
GiB = 1 << 30
#: Architectures the plan models.
ARCHITECTURES = ("topk", "clt")
#: SparseAdam's moment layouts (flashsae.optim.sparse_adam.MOMENTS).
MOMENTS = ("elementwise", "row", "row-int8")


def _human(count: int) -> str:
    for suffix, size in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if count >= size:
            value = count / size
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.1f}{suffix}"
    return str(count)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:,.2f} GiB" if nbytes < 10 * GiB else f"{nbytes / GiB:,.1f} GiB"


def _next_pow2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


# ------------------------------------------------------------------------------------------ config


@dataclass
class PlanConfig:
    """One training setting to plan (every field is a ``flashsae plan`` flag)."""

    d: int = 4096
    """Input width d."""
    n: int = 1 << 24
    """Dictionary size n (latents)."""
    k: int = 64
    """Active latents per token."""
    batch: int = 8192
    """Tokens per training step (per device)."""
    dtype: str = "bfloat16"
    """Dtype of weights and activations: float32, bfloat16 or float16 (the same for both SAEs)."""
    optimizer: str = "sparse_adam"
    """flashsae's optimizer: sparse_adam (row-sparse gradients) or adam (torch's, dense gradients)."""
    state_dtype: str | None = None
    """Dtype of flashsae's Adam moments (sparse_adam): None = the weights' dtype, float32 or bfloat16."""
    master_weights: bool = False
    """flashsae keeps a float32 master copy of 16-bit weights (sparse_adam)."""
    moments: str = "elementwise"
    """Layout of sparse_adam's moments for W_enc / W_dec: elementwise (Adam), row (one second moment per
    row) or row-int8 (that, and an int8 first moment with a scale per row)."""
    aux_k: int | None = None
    """AuxK slots per token (None: d / 2, as TopKSAE); used when dead_fraction > 0."""
    dead_fraction: float = 0.0
    """Fraction of latents that are dead (AuxK on when > 0): sets how many rows AuxK touches."""
    buffer_tokens: int = 32768
    """flashsae train's shuffle buffer (tokens, on the device); 0 when activations come otherwise."""
    device: str = "cuda"
    """cuda (the Triton encoder, which auto uses on GPUs; the CUDA backend's chunked encoder adds a
    [batch, chunk] score buffer) or cpu (the CPU kernels): only flashsae's scratch differs."""
    gpu: str = "h200"
    """GPU whose memory to fit: one of GPUS, or any name when memory is given."""
    memory: int | None = None
    """Device memory in bytes (overrides gpu); the CLI takes units, e.g. 80GiB or 141GB."""
    reserve: int = 2 * GiB
    """Bytes kept free for the CUDA context, cuBLAS workspaces and allocator fragmentation."""
    tensor_parallel: int = 1
    """Latent shards (flashsae.distributed): each device holds n / P latents; the dense SAE is not sharded."""
    sms: int = DEFAULT_SMS
    """Streaming multiprocessors of the GPU (the Triton encoder's candidate chunks scale with them)."""
    architecture: str = "topk"
    """topk (a TopK SAE) or clt (a cross-layer transcoder: n_layers layers of n latents each, inputs
    and targets of width d, trained as flashsae train does: sparse_adam updating rows during backward)."""
    n_layers: int = 1
    """Layers L of a clt (L encoders [n, d], decoders W_dec_i [n, (L - i) d]); 1 for topk."""

    def __post_init__(self) -> None:
        for name in ("d", "n", "k", "batch", "tensor_parallel", "sms", "n_layers"):
            positive_int(name, getattr(self, name))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture == "topk" and self.n_layers != 1:
            raise ValueError(f"n_layers: a topk SAE has one layer, got {self.n_layers} (use architecture clt)")
        if self.architecture == "clt":
            for name, value, plain in (
                ("optimizer", self.optimizer, "sparse_adam"), ("moments", self.moments, "elementwise"),
                ("master_weights", self.master_weights, False), ("tensor_parallel", self.tensor_parallel, 1),
            ):  # fmt: skip
                if value != plain:
                    raise ValueError(
                        f"{name}: the clt model covers {name} {plain} only (flashsae train's), got {value!r}"
                    )
        if self.k > self.n:
            raise ValueError(f"k: expected k <= n ({self.n}), got {self.k}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")
        if self.optimizer not in ("sparse_adam", "adam"):
            raise ValueError(f"optimizer: expected sparse_adam or adam, got {self.optimizer!r}")
        if self.state_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"state_dtype: expected float32 or bfloat16, got {self.state_dtype!r}")
        if self.moments not in MOMENTS:
            raise ValueError(f"moments: expected one of {', '.join(MOMENTS)}, got {self.moments!r}")
        if self.moments != "elementwise" and self.optimizer != "sparse_adam":
            raise ValueError(f"moments: {self.moments} moments need optimizer sparse_adam")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d // 2, self.n))
        if not 0 <= self.dead_fraction <= 1:
            raise ValueError(f"dead_fraction: expected a number in [0, 1], got {self.dead_fraction!r}")
        if self.buffer_tokens < 0:
            raise ValueError(f"buffer_tokens: expected >= 0, got {self.buffer_tokens}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device: expected cuda or cpu, got {self.device!r}")
        if self.memory is None and self.gpu not in GPUS:
            raise ValueError(f"gpu: expected one of {', '.join(GPUS)} (or give memory), got {self.gpu!r}")
        if self.tensor_parallel > self.n:
            raise ValueError(f"tensor_parallel: expected at most n ({self.n}) shards, got {self.tensor_parallel}")

    @property
    def capacity(self) -> int:
        return self.memory if self.memory is not None else GPUS[self.gpu] << 20

    @property
    def usable(self) -> int:
        return max(0, self.capacity - self.reserve)


@dataclass
class MemoryEstimate:
    """Bytes per component of one training step on one device."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffer: int
    peak: int
    """The step's peak (per phase, see the module docstring): at most the sum of the components."""


# ---------------------------------------------------------------------------------------- the model


def _aux_slots(cfg: PlanConfig) -> int:
    return cfg.aux_k if cfg.dead_fraction > 0 else 0


def _clt_elements(cfg: PlanConfig, n: int) -> int:
    """Parameters of a CLT: L encoders [n, d] + b_enc [n], decoders W_dec_i [n, (L - i) d] (L (L + 1) / 2
    blocks of [n, d] in all), b_dec_i [d]."""
    L, d = cfg.n_layers, cfg.d
    return L * n * d + n * d * L * (L + 1) // 2 + L * n + L * d


def clt_memory(cfg: PlanConfig, n: int | None = None) -> MemoryEstimate:
    """Memory of a flashsae CLT training step (sparse_adam updating rows during backward; module
    docstring, "Cross-layer transcoders")."""
    n = cfg.n if n is None else n
    L, d, B, k, p = cfg.n_layers, cfg.d, cfg.batch, cfg.k, DTYPE_BYTES[cfg.dtype]
    blocks = L * (L + 1) // 2
    elements = _clt_elements(cfg, n)
    weights = elements * p
    buffer = (cfg.buffer_tokens + CHUNK_TOKENS) * 2 * L * d * p if cfg.buffer_tokens else 0  # inputs and targets
    s = DTYPE_BYTES[cfg.state_dtype or cfg.dtype]
    optimizer = 2 * elements * s + 8 * L * (2 * n + n // math.gcd(n, 1024) + 1)  # moments, int64 step per row
    # updated during backward: no gradient beyond one chunk of rows (b_enc / b_dec stay dense)
    gradients = min(n * L * d, EAGER_CHUNK_ELEMENTS) * p + L * (n + d) * p
    slots = k + _aux_slots(cfg)
    layer = B * d * p  # one [B, d] activation
    if cfg.device == "cpu":
        tile = min(n, max(256, (CPU_TILE_ELEMENTS // B) // 64 * 64))
        scratch = B * tile * 4 + B * d * 4 + B * slots * 8  # one layer's encoder at a time
    else:
        chunks = max(1, math.ceil(2 * cfg.sms / math.ceil(B / 64)))
        scratch = B * chunks * max(16, _next_pow2(slots)) * 8 + n * 4
    # inputs and targets, each layer's contiguous input (kept for the encoder's backward), the latents
    kept = 3 * L * layer + L * B * slots * (p + 4)
    decoded = blocks * layer  # every layer's decode to all its targets, [B, (L - i) d]
    forward = kept + decoded + 2 * L * layer + 2 * L * B * d * 4 + scratch  # y_hat (list + stack), float32 loss
    backward = kept + 2 * decoded + L * layer + gradients  # the decodes' gradients, y_hat's
    peak = weights + optimizer + buffer + max(forward, backward)
    return MemoryEstimate(weights, gradients, optimizer, max(forward, backward - gradients), buffer, peak)


def dense_clt_memory(cfg: PlanConfig, n: int | None = None) -> MemoryEstimate:
    """Memory of a plain PyTorch CLT of the same math with torch's Adam: dense gradients, per layer the
    [batch, n] pre-activations and dense latents kept for backward, one more in flight."""
    n = cfg.n if n is None else n
    L, d, B, p = cfg.n_layers, cfg.d, cfg.batch, DTYPE_BYTES[cfg.dtype]
    elements = _clt_elements(cfg, n)
    weights = gradients = elements * p
    optimizer = 2 * elements * p
    buffer = (cfg.buffer_tokens + CHUNK_TOKENS) * 2 * L * d * p if cfg.buffer_tokens else 0
    wide = (2 * L + 1) * B * n * p
    batch_io = 2 * L * B * d * p
    step = batch_io + max(wide + n * L * d * p, B * n * p + gradients)
    return MemoryEstimate(weights, gradients, optimizer, wide + batch_io, buffer, weights + optimizer + buffer + step)


def flashsae_memory(cfg: PlanConfig, n: int | None = None) -> MemoryEstimate:
    """Per-device memory of a flashsae TopK SAE (or CLT) training step (see the module docstring)."""
    if cfg.architecture == "clt":
        return clt_memory(cfg, n)
    n_total = cfg.n if n is None else n
    n = math.ceil(n_total / cfg.tensor_parallel)  # latents on this device
    d, B, k, p = cfg.d, cfg.batch, cfg.k, DTYPE_BYTES[cfg.dtype]
    aux = _aux_slots(cfg)
    elements = 2 * n * d + n + d
    weights = elements * p + (elements * 4 if cfg.master_weights and p == 2 and cfg.optimizer == "sparse_adam" else 0)
    buffer = (cfg.buffer_tokens + CHUNK_TOKENS) * d * p if cfg.buffer_tokens else 0
    if cfg.optimizer == "sparse_adam":
        s = DTYPE_BYTES[cfg.state_dtype or cfg.dtype]
        b_enc_rows = n // math.gcd(n, 1024)
        steps = 8 * (2 * n + b_enc_rows + 1)  # the int64 last step of every row
        if cfg.moments == "elementwise":
            optimizer = 2 * elements * s + steps
        else:  # W_enc / W_dec: first moment (int8 + a float32 row scale, or s bytes), float32 v per row
            first = n * d + 4 * n if cfg.moments == "row-int8" else n * d * s
            optimizer = 2 * (first + 4 * n) + 2 * (n + d) * s + steps
        touched = min(n, B * k + min(math.ceil(cfg.dead_fraction * n), B * aux))
        gradients = 2 * touched * d * p + n * p + d * p
    else:  # torch's Adam: dense gradients, moments in the parameter dtype
        touched = 0
        optimizer = 2 * elements * p
        gradients = elements * p
    slots = k + aux
    batch_io = B * d * p + B * slots * (p + 4)  # the batch and its latents (values, int32 indices)
    if cfg.device == "cpu":
        tile = min(n, max(256, (CPU_TILE_ELEMENTS // B) // 64 * 64))
        # the float32 tile, centered x and running top-k heaps; 16-bit weights are upcast tile by tile
        scratch = B * tile * 4 + B * d * 4 + B * slots * 8 + (tile * d * 4 if p != 4 else 0)
    else:
        chunks = max(1, math.ceil(2 * cfg.sms / math.ceil(B / 64)))
        scratch = B * chunks * max(16, _next_pow2(k)) * 8 + n * 4  # candidate lists, fp32 encoder bias
        if aux and aux <= 128:  # a second candidate list, fused
            scratch += B * chunks * max(16, _next_pow2(aux)) * 8
        elif aux:  # larger aux_k: the torch tiles over a gathered W_enc[dead] (ops/topk_encode.py)
            scratch += math.ceil(cfg.dead_fraction * n) * d * p
    if cfg.tensor_parallel > 1:  # gathered candidates of every shard, the all-reduced partial x_hat
        scratch += B * cfg.tensor_parallel * slots * (p + 8) + B * d * 4
    reconstruction = B * d * p + B * d * 4  # x_hat, and the loss's float32 centered batch
    forward = batch_io + scratch + reconstruction
    # the encoder's db_dec sums a chunk of gathered W_enc rows at a time (+ a float32 copy of 16-bit rows)
    db_dec_chunk = min(touched or n, max(1, DB_DEC_CHUNK_ELEMENTS // d)) * d * (p + (4 if p != 4 else 0))
    backward = batch_io + reconstruction + 16 * B * slots + gradients + db_dec_chunk
    peak = weights + optimizer + buffer + max(forward, backward)
    activations = max(forward, backward - gradients)
    return MemoryEstimate(weights, gradients, optimizer, activations, buffer, peak)


def dense_memory(cfg: PlanConfig, n: int | None = None) -> MemoryEstimate:
    """Memory of the dense PyTorch TopK SAE (flashsae.bench.DenseTopKSAE + torch's fused Adam), or of
    the dense CLT for architecture clt."""
    if cfg.architecture == "clt":
        return dense_clt_memory(cfg, n)
    n = cfg.n if n is None else n
    d, B, p = cfg.d, cfg.batch, DTYPE_BYTES[cfg.dtype]
    elements = 2 * n * d + n + d
    weights = gradients = elements * p
    optimizer = 2 * elements * p
    buffer = (cfg.buffer_tokens + CHUNK_TOKENS) * d * p if cfg.buffer_tokens else 0
    wide = (4 if _aux_slots(cfg) else 3) * B * n * p  # [batch, n] tensors alive at once
    batch_io = B * d * p
    activations = wide + batch_io
    step = batch_io + max(wide + n * d * p, B * n * p + gradients)
    return MemoryEstimate(weights, gradients, optimizer, activations, buffer, weights + optimizer + buffer + step)


def widest(estimate, cfg: PlanConfig, budget: int) -> int:
    """The largest n (a multiple of 1024, times tensor_parallel for a sharded flashsae SAE) whose peak
    fits `budget`; 0 if none."""
    step = 1024 * (cfg.tensor_parallel if estimate is flashsae_memory else 1)
    if estimate(cfg, max(cfg.k, step)).peak > budget:
        return 0
    low, high = 1, 2
    while estimate(cfg, high * step).peak <= budget:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if estimate(cfg, middle * step).peak <= budget:
            low = middle
        else:
            high = middle
    return low * step


def plan(cfg: PlanConfig) -> dict[str, Any]:
    """The plan as a dict: config, the two estimates, fit verdicts and the widest n of each."""
    ours, theirs = flashsae_memory(cfg), dense_memory(cfg)
    widest_ours, widest_theirs = widest(flashsae_memory, cfg, cfg.usable), widest(dense_memory, cfg, cfg.usable)
    return {
        "config": asdict(cfg),
        "capacity_bytes": cfg.capacity,
        "usable_bytes": cfg.usable,
        "flashsae": asdict(ours),
        "dense": asdict(theirs),
        "flashsae_fits": ours.peak <= cfg.usable,
        "dense_fits": theirs.peak <= cfg.usable,
        "widest_flashsae": widest_ours,
        "widest_dense": widest_theirs,
        "width_ratio": widest_ours / widest_theirs if widest_theirs else math.inf,
    }


def format_plan(result: dict[str, Any]) -> str:
    cfg = PlanConfig(**result["config"])
    ours, theirs = MemoryEstimate(**result["flashsae"]), MemoryEstimate(**result["dense"])
    state = cfg.state_dtype or cfg.dtype
    aux = "AuxK off (no dead latents)"
    if cfg.dead_fraction:
        aux = f"AuxK on ({cfg.aux_k} slots, {cfg.dead_fraction:.0%} dead)"
    device = f"{cfg.gpu.upper()} " if cfg.memory is None else ""
    tp = f", {cfg.tensor_parallel} latent shards (per device)" if cfg.tensor_parallel > 1 else ""
    layout = {"elementwise": f"{state} moments", "row": f"{state} first moment, row-wise second moment",
              "row-int8": "int8 first moment, row-wise second moment"}[cfg.moments]  # fmt: skip
    optimizer = (
        f"sparse_adam, {layout}{', float32 master weights' if cfg.master_weights else ''}, row-sparse gradients"
        if cfg.optimizer == "sparse_adam"
        else "torch Adam, dense gradients"
    )
    what = "TopK SAE" if cfg.architecture == "topk" else f"CLT of {cfg.n_layers} layers (n per layer)"
    if cfg.architecture == "clt":
        optimizer += " updated during backward (one chunk of rows at a time)"
    lines = [
        f"flashsae plan: {what} d={cfg.d}, n={cfg.n:,} ({_human(cfg.n)}), k={cfg.k}, batch={cfg.batch}, "
        f"{cfg.dtype}{tp}",
        f"  flashsae: {optimizer}; dense PyTorch: [batch, n] activations, torch Adam ({cfg.dtype} moments)",
        f"  {aux}; shuffle buffer {cfg.buffer_tokens:,} tokens; flashsae kernels for {cfg.device}",
        "",
        f"{'component':<14}{'flashsae':>16}{'dense PyTorch':>18}",
    ]
    for name in ("weights", "gradients", "optimizer", "activations", "buffer", "peak"):
        lines.append(f"{name:<14}{_gib(getattr(ours, name)):>16}{_gib(getattr(theirs, name)):>18}")
    lines.append("")
    usable = result["usable_bytes"]
    verdict = {True: "fits", False: "does NOT fit"}
    lines.append(
        f"{device}({_gib(result['capacity_bytes'])}, {_gib(cfg.reserve)} reserved, {_gib(usable)} usable): "
        f"flashsae {verdict[result['flashsae_fits']]} ({_gib(ours.peak)}), "
        f"dense PyTorch {verdict[result['dense_fits']]} ({_gib(theirs.peak)})"
    )
    w_ours, w_theirs = result["widest_flashsae"], result["widest_dense"]
    ratio = f": {result['width_ratio']:.2f}x wider" if w_theirs else ""
    shards = f" on {cfg.tensor_parallel} devices" if cfg.tensor_parallel > 1 else ""
    lines.append(
        f"widest n that fits: flashsae{shards} {w_ours:,} ({_human(w_ours)}), "
        f"dense PyTorch on one device {w_theirs:,} ({_human(w_theirs)}){ratio}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI

_FLAG_TYPES = {"n": parse_count, "d": parse_count, "batch": parse_count, "buffer_tokens": parse_count, "k": parse_count}


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``plan`` subcommand (flags: the fields of PlanConfig) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "plan",
        help="memory of a TopK SAE training step: flashsae vs dense PyTorch, and whether it fits a GPU",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = PlanConfig()
    docs = _field_docs()
    for f in fields(PlanConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if f.name == "master_weights":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=False, help=help_text)
        elif f.name == "architecture":
            parser.add_argument(flag, default=default, choices=ARCHITECTURES, help=help_text)
        elif f.name in ("memory", "reserve"):
            parser.add_argument(flag, type=parse_bytes, default=default, help=help_text)
        elif f.name == "dead_fraction":
            parser.add_argument(flag, type=float, default=default, help=help_text)
        elif f.name in ("aux_k", "tensor_parallel", "sms", "n_layers"):
            parser.add_argument(flag, type=int, default=default, help=help_text)
        elif f.name in _FLAG_TYPES:
            parser.add_argument(flag, type=_FLAG_TYPES[f.name], default=default, help=help_text)
        else:
            parser.add_argument(flag, default=default, help=help_text)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _field_docs() -> dict[str, str]:
    return field_docs(PlanConfig)


def run_plan(args: argparse.Namespace) -> int:
    """Runs ``flashsae plan`` from parsed arguments; returns the exit status."""
    try:
        cfg = PlanConfig(**{f.name: getattr(args, f.name) for f in fields(PlanConfig)})
    except ValueError as exc:
        print(f"flashsae plan: error: {exc}", file=sys.stderr)
        return 2
    result = plan(cfg)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m flashsae.plan [plan] --d ...``: the plan subcommand on its own, parsed exactly as
    ``flashsae plan`` parses it (add_plan_parser on an argparse subparsers object)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "plan":
        argv.insert(0, "plan")
    parser = argparse.ArgumentParser(prog="flashsae")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return run_plan(parser.parse_args(argv))


# ------------------------------------------------------------------------------------ measurement


@dataclass
class MeasureConfig:
    """One measured training run (flashsae or the dense baseline), in a fresh process."""

    provider: str
    """flashsae (TopKSAE + SparseAdam), dense (DenseTopKSAE + torch's fused Adam) or clt (a
    CrossLayerTranscoder of n_layers layers, n latents each + SparseAdam updating rows during backward,
    as flashsae train runs it)."""
    d: int
    n: int
    k: int
    batch: int
    dtype: str = "float32"
    state_dtype: str | None = None
    master_weights: bool = False
    moments: str = "elementwise"
    dead_fraction: float = 0.0
    device: str = "cpu"
    steps: int = 2
    threads: int | None = None
    n_layers: int = 1


def _measure_here(cfg: MeasureConfig) -> dict[str, int]:
    """Peak memory of `steps` training steps, from before the model exists (run in a fresh process)."""
    import torch

    from .bench import DenseTopKSAE, PeakMemory
    from .modules import CrossLayerTranscoder, TopKSAE
    from .optim import SparseAdam

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)

    L = cfg.n_layers

    def build(n: int):
        if cfg.provider == "clt":
            clt = CrossLayerTranscoder(L, cfg.d, n, k=cfg.k, dtype=dtype, device=device)
            optimizer = SparseAdam(clt.parameters(), lr=1e-4, state_dtype=cfg.state_dtype, update_in_backward=True)
            return clt, optimizer
        if cfg.provider == "dense":
            sae = DenseTopKSAE(cfg.d, n, cfg.k, dtype=dtype, device=device)
            return sae, torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        sae = TopKSAE(cfg.d, n, cfg.k, dtype=dtype, device=device)
        optimizer = SparseAdam(
            sae.parameters(),
            lr=1e-4,
            state_dtype=cfg.state_dtype,
            master_weights=cfg.master_weights,
            moments=cfg.moments,
        )
        return sae, optimizer

    def train(sae, optimizer, x, dead, steps):
        args = (x[:, :L], x[:, L:]) if cfg.provider == "clt" else (x,)  # a CLT's inputs and targets
        if dead is not None and cfg.provider == "clt":
            dead = dead.view(1, -1).expand(L, -1).contiguous()  # the same dead latents in every layer
        for _ in range(steps):
            sae(*args, dead_mask=dead).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # warm-up on a small model: pages in the kernels' code, so the measurement is data only
    generator = torch.Generator().manual_seed(0)
    small_n = max(4 * cfg.k, 1024)
    shape = (cfg.batch, 2 * L, cfg.d) if cfg.provider == "clt" else (cfg.batch, cfg.d)
    x = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    sae, optimizer = build(small_n)
    train(sae, optimizer, x, (torch.rand(small_n, generator=generator) < 0.5).to(device), 2)
    del sae, optimizer, x
    gc.collect()
    memory = PeakMemory(device)
    memory.reset()
    start = memory.current()
    x = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    dead = (torch.rand(cfg.n, generator=generator) < cfg.dead_fraction).to(device) if cfg.dead_fraction else None
    sae, optimizer = build(cfg.n)
    train(sae, optimizer, x, dead, cfg.steps)
    return {"peak_bytes": memory.peak() - start, "resident_bytes": memory.current() - start}


def measure(cfg: MeasureConfig, timeout: float = 900) -> dict[str, int]:
    """Measured peak memory of a training run in a fresh Python process: CPU peak RSS (VmHWM) or
    torch.cuda.max_memory_allocated (flashsae.bench.PeakMemory). On CPU glibc's mmap threshold
    is fixed at 64 KiB so that freed tensors leave the resident set (the default dynamic threshold
    keeps freed blocks of up to 32 MiB in the heap), as a GPU's allocated-bytes count would not hold them."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "flashsae.plan", "--measure-worker", json.dumps(asdict(cfg))]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement of {cfg} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-worker":
        print(json.dumps(_measure_here(MeasureConfig(**json.loads(sys.argv[2])))))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
