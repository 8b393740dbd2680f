"""Per-op benchmark cases: inputs, providers and the work each op must do (DESIGN.md §6).

Every case times one op stage (``fwd`` or ``fwd+bwd``) of one provider on one size:

- ``torch_dense``: the dense PyTorch computation ([batch, n] pre-activations / latents and
  autograd through them);
- ``torch_sparse``: sparsify-style eager code (benchmarking.SparsifyStyleEncoder: dense linear +
  torch.topk forward with an embedding_bag / index_add backward; embedding_bag decoder);
- ``flashsae-<backend>``: flashsae's op on each backend that has a kernel for the stage on the
  device (``cpu``, ``cuda``, ``triton`` and the ``torch`` fallback; never the Triton interpreter).

:func:`work` is the op's own cost, independent of the provider: the FLOPs and bytes any
implementation must spend (encoder: the GEMM; decoder and loss: the k gathered rows per token and
the dense [n, d] gradient torch's optimizers need). With the machine's peaks measured in the same
run (:func:`calibrate`), ``max(flop / peak_flops, bytes / peak_bandwidth) / time`` is the fraction of
the roofline floor a provider reaches (1.0 = at the machine's limit).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import _backend
from .benchmarking import SparsifyStyleEncoder
from .ops import sae_loss, sparse_decode, topk_encode

OPS = ("topk_encode", "sparse_decode", "sae_loss")
STAGES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINES = ("torch_dense", "torch_sparse")


@dataclass(frozen=True)
class OpCase:
    """One op stage at one size."""

    op: str
    stage: str
    d: int
    n: int
    k: int
    batch: int
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {OPS}, got {self.op!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {self.stage!r}")
        if not 1 <= self.k <= self.n:
            raise ValueError(f"k: expected 1 <= k <= n ({self.n}), got {self.k}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return f"{self.op}-{self.stage}-d{self.d}-n{self.n}-k{self.k}-b{self.batch}-{self.dtype}-{self.device}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def providers(case: OpCase) -> list[str]:
    """The baselines, then every flashsae backend with kernels for the stage (forward, and backward
    for fwd+bwd) on case.device and dtype. The Triton interpreter is a test harness, not a provider."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    backends = _backend.available_backends(case.op, device, dtype)
    if case.stage == "fwd+bwd":
        backward = _backend.available_backends(f"{case.op}_backward", device, dtype)
        backends = [b for b in backends if b in backward]
    if _backend.triton_interpreting():
        backends = [b for b in backends if b != "triton"]
    return [*BASELINES, *(f"flashsae-{b}" for b in backends)]


def work(case: OpCase) -> tuple[float, float]:
    """(FLOPs, bytes) the op stage must spend, whoever computes it."""
    B, n, d, k = case.batch, case.n, case.d, case.k
    s = torch.finfo(DTYPES[case.dtype]).bits // 8
    slots = B * k * (s + 4)  # values + int32 indices
    if case.op == "topk_encode":
        flop = 2.0 * B * n * d
        moved = s * (B * d + n * d + n) + slots
        if case.stage == "fwd+bwd":  # sparse dW_enc / db_enc: the k rows per token, one dense write
            flop += 2.0 * B * k * d
            moved += s * (n * d + n) + s * B * d
        return flop, float(moved)
    flop = 2.0 * B * k * d
    moved = s * B * k * d + s * B * d + slots  # gathered rows, x_hat
    if case.op == "sae_loss":
        moved += s * B * d  # reads x
    if case.stage == "fwd+bwd":  # d_values (row dots), dW_dec (scatter + dense write), db_dec
        flop += 4.0 * B * k * d
        moved += s * B * k * d + s * n * d + s * B * d
    return flop, float(moved)


# -------------------------------------------------------------------------------------- inputs


def make_inputs(case: OpCase, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs scaled like a real SAE (pre-activations ~ N(0, 1)); latents for the decoder and
    the loss are the encoder's real top-k, so their indices are distributed like a real SAE's."""
    g = torch.Generator().manual_seed(seed)
    dtype, device = DTYPES[case.dtype], torch.device(case.device)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    t = {
        "x": rand(case.batch, case.d),
        "W_enc": rand(case.n, case.d, scale=case.d**-0.5),
        "b_enc": rand(case.n, scale=0.1),
        "b_dec": rand(case.d, scale=0.1),
        "W_dec": rand(case.n, case.d, scale=case.d**-0.5),
    }
    if case.op != "topk_encode":
        t["values"], t["indices"] = topk_encode(t["x"], t["W_enc"], t["b_enc"], case.k, t["b_dec"])
    t["upstream"] = rand(case.batch, case.k if case.op == "topk_encode" else case.d)
    return t


# ------------------------------------------------------------------------------------ providers


def _dense_latents(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], n, dtype=values.dtype, device=values.device).scatter(1, indices.long(), values)


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    x32, e = x.float(), (x_hat - x).float()
    return e.pow(2).sum() / (x32 - x32.mean(0)).pow(2).sum()


def _forward(case: OpCase, provider: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The op's forward by `provider`; returns a tensor to backpropagate from."""
    backend = provider.removeprefix("flashsae-") if provider.startswith("flashsae-") else None
    if case.op == "topk_encode":
        if provider == "torch_dense":
            return F.relu(F.linear(t["x"] - t["b_dec"], t["W_enc"], t["b_enc"])).topk(case.k, dim=-1).values
        if provider == "torch_sparse":
            return SparsifyStyleEncoder.apply(t["x"] - t["b_dec"], t["W_enc"], t["b_enc"], case.k)[0]
        return topk_encode(t["x"], t["W_enc"], t["b_enc"], case.k, t["b_dec"], backend=backend)[0]
    if provider == "torch_dense":
        x_hat = _dense_latents(t["values"], t["indices"], case.n) @ t["W_dec"] + t["b_dec"]
    elif provider == "torch_sparse":
        x_hat = (
            F.embedding_bag(t["indices"].long(), t["W_dec"], per_sample_weights=t["values"], mode="sum") + t["b_dec"]
        )
    elif case.op == "sparse_decode":
        x_hat = sparse_decode(t["values"], t["indices"], t["W_dec"], t["b_dec"], backend=backend)
    else:
        return sae_loss(t["x"], t["values"], t["indices"], t["W_dec"], t["b_dec"], backend=backend).fvu
    return _fvu(t["x"], x_hat) if case.op == "sae_loss" else x_hat


def make_call(case: OpCase, provider: str, t: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A closure running the stage once (gradients dropped after each backward)."""
    trainable = ("x", "W_enc", "b_enc", "b_dec") if case.op == "topk_encode" else ("values", "W_dec", "b_dec")
    if case.stage == "fwd":

        def forward_only() -> None:
            with torch.no_grad():
                _forward(case, provider, t)

        return forward_only
    leaves = {name: t[name].detach().clone().requires_grad_(name != "x") for name in trainable}
    inputs = {**t, **leaves}

    def forward_backward() -> None:
        out = _forward(case, provider, inputs)
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(inputs["upstream"])
        for leaf in leaves.values():
            leaf.grad = None

    return forward_backward


# ---------------------------------------------------------------------------------- calibration


def _median_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def calibrate(device: str = "cpu", dtype: str = "float32") -> dict[str, float]:
    """The machine's peaks measured now: FLOP/s of a large GEMM in `dtype` and bytes/s of a large copy."""
    dev = torch.device(device)
    size = 2048 if dev.type == "cpu" else 8192
    a = torch.randn(size, size, device=dev).to(DTYPES[dtype])
    b = torch.randn(size, size, device=dev).to(DTYPES[dtype])
    gemm_ms = _median_ms(lambda: a @ b, dev)
    src = torch.empty(1 << 26 if dev.type == "cpu" else 1 << 30, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), dev)
    return {
        "peak_flops": 2.0 * size**3 / (gemm_ms / 1e3),
        "peak_bytes_per_s": 2.0 * src.numel() / (copy_ms / 1e3),
        "gemm_size": size,
    }
