"""Per-op benchmark cases: inputs, providers and the work each op must do.

Every case times one stage of one op for one provider at one size. Stages: ``fwd``, ``fwd+bwd``, and
for topk_encode ``select`` (the top-k of given [batch, n] scores alone, the part of the encoder that
is not the GEMM; CUDA only). Providers:

- ``torch_dense``: the dense PyTorch computation ([batch, n] pre-activations / latents and autograd
  through them);
- ``torch_sparse``: sparsify-style eager code (flashsae.bench.baselines: dense linear + torch.topk
  forward with an embedding_bag / index_add backward; embedding_bag decoder);
- ``torch_gemm`` (topk_encode fwd only): the encoder's GEMM + bias alone, torch's vendor GEMM
  (oneDNN/MKL, cuBLAS): no selection, so not the op's result but the time an encoder is compared
  with;
- ``flashsae-<backend>``: flashsae's op on each backend that has a kernel for the stage on the
  device (``cpu``, ``cuda``, ``triton`` and the ``torch`` fallback; never the Triton interpreter),
  and ``flashsae-<backend>-<variant>`` for each entry of :data:`VARIANTS` (the op called with extra
  keyword arguments).

:func:`work` is the op's own cost, independent of the provider: the FLOPs and bytes any
implementation must spend (encoder: the GEMM; decoder and loss: the k gathered rows per token and
the dense [n, d] gradient torch's optimizers need). With the machine's peaks measured in the same
run (:func:`calibrate`), ``max(flop / peak_flops, bytes / peak_bandwidth) / time`` is the fraction of
the roofline floor a provider reaches (1.0 = at the machine's limit).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from .. import _backend
from ..ops import sae_loss, sparse_decode, topk_encode
from .baselines import SparsifyStyleEncoder, embedding_bag_decode
from .timer import time_ms
from .train_step import DTYPES

OPS = ("topk_encode", "sparse_decode", "sae_loss")
STAGES = ("fwd", "fwd+bwd", "select")
BASELINES = ("torch_dense", "torch_sparse")
#: Providers that time a part of the op (not its result): never checked against torch_dense.
PARTIAL = ("torch_gemm",)
#: op -> variant name -> extra keyword arguments of the flashsae op: each entry adds a provider
#: ``flashsae-<backend>-<variant>`` for every backend (e.g. a precision setting). Two keys are not
#: arguments: "autocast" (a DTYPES name) runs the op under torch.autocast(device, that dtype), and
#: "backends" limits the variant to those backends (elsewhere it would time the same code twice).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {op: {} for op in OPS}
#: The certified top-k: bf16 candidate scores rescored exactly, outputs identical to "exact"; only
#: the cpu backend has a low-precision candidate pass (the others compute every precision exactly).
VARIANTS["topk_encode"]["certified"] = {"precision": "certified", "backends": ("cpu",)}
#: Fraction of latents marked dead in cases with aux_k > 0.
DEAD_FRACTION = 0.1


@dataclass(frozen=True)
class CaseKey:
    """What a benchmark row measures: an op stage at one size (benchmarks/test_bench_train_step.py
    records op="train_step"). Rows with equal keys are compared with each other in the report."""

    op: str
    stage: str
    d: int
    n: int
    k: int
    batch: int
    dtype: str = "float32"
    device: str = "cpu"
    aux_k: int = 0
    """AuxK latents per token (0: none)."""

    def key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(CaseKey))


@dataclass(frozen=True)
class OpCase(CaseKey):
    """One op stage at one size; aux_k > 0 adds AuxK (topk_encode: over 10% dead latents; sae_loss:
    aux_k auxiliary latents per token)."""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {OPS}, got {self.op!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {self.stage!r}")
        if self.stage == "select" and (self.op != "topk_encode" or self.aux_k):
            raise ValueError(f"stage: 'select' is a stage of topk_encode without AuxK, got {self.op!r}")
        if not 1 <= self.k <= self.n:
            raise ValueError(f"k: expected 1 <= k <= n ({self.n}), got {self.k}")
        if self.aux_k < 0 or (self.aux_k and self.op == "sparse_decode"):
            raise ValueError(f"aux_k: expected 0 for sparse_decode and >= 0 otherwise, got {self.aux_k}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        aux = f"-aux{self.aux_k}" if self.aux_k else ""
        return f"{self.stage}-d{self.d}-n{self.n}-k{self.k}{aux}-b{self.batch}-{self.dtype}-{self.device}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def providers(case: OpCase) -> list[str]:
    """The baselines, then every flashsae backend (and variant) with kernels for the stage (forward,
    and backward for fwd+bwd) on case.device and dtype. The Triton interpreter is a test harness,
    not a provider."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    backends = _backend.available_backends(case.op, device, dtype)  # never the Triton interpreter
    if case.stage == "select":  # the select kernel alone is a binding of the CUDA module only
        return ["torch_dense", *(["flashsae-cuda"] if "cuda" in backends else [])]
    if case.stage == "fwd+bwd":
        backward = _backend.available_backends(f"{case.op}_backward", device, dtype)
        backends = [b for b in backends if b in backward]
    names = [*BASELINES, *(["torch_gemm"] if (case.op, case.stage, case.aux_k) == ("topk_encode", "fwd", 0) else [])]
    for backend in backends:
        variants = [v for v, options in VARIANTS[case.op].items() if backend in options.get("backends", (backend,))]
        names += [f"flashsae-{backend}", *(f"flashsae-{backend}-{v}" for v in variants)]
    return names


def work(case: OpCase) -> tuple[float, float]:
    """(FLOPs, bytes) the op stage must spend, whoever computes it."""
    B, n, d, k = case.batch, case.n, case.d, case.k
    s = torch.finfo(DTYPES[case.dtype]).bits // 8
    slots = B * (k + case.aux_k) * (s + 4)  # values + int32 indices
    if case.stage == "select":  # the scores read once
        return 0.0, float(s * B * n + slots)
    if case.op == "topk_encode":
        flop = 2.0 * B * n * d
        moved = s * (B * d + n * d + n) + slots
        if case.stage == "fwd+bwd":  # sparse dW_enc / db_enc: the k rows per token, one dense write
            flop += 2.0 * B * (k + case.aux_k) * d
            moved += s * (n * d + n) + s * B * d
        return flop, float(moved)
    rows = k + case.aux_k  # rows of W_dec gathered per token
    flop = 2.0 * B * rows * d
    moved = s * B * rows * d + s * B * d + slots  # gathered rows, x_hat
    if case.op == "sae_loss":
        moved += s * B * d  # reads x
    if case.stage == "fwd+bwd":  # d_values (row dots), dW_dec (scatter + dense write), db_dec
        flop += 4.0 * B * rows * d
        moved += s * B * rows * d + s * n * d + s * B * d
    return flop, float(moved)


# -------------------------------------------------------------------------------------- inputs


def make_inputs(case: OpCase, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs scaled like a real SAE (pre-activations ~ N(0, 1)), drawn on the case's device;
    latents for the decoder and the loss are the encoder's real top-k, so their indices are
    distributed like a real SAE's."""
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    t = {"x": rand(case.batch, case.d)}
    if case.stage == "select":
        t["scores"] = rand(case.batch, case.n)
        return t
    t |= {
        "W_enc": rand(case.n, case.d, scale=case.d**-0.5),
        "b_enc": rand(case.n, scale=0.1),
        "b_dec": rand(case.d, scale=0.1),
        "W_dec": rand(case.n, case.d, scale=case.d**-0.5),
    }
    if case.aux_k:
        t["dead_mask"] = torch.rand(case.n, generator=g, device=device) < DEAD_FRACTION
    if case.op != "topk_encode":
        values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], case.k + case.aux_k, t["b_dec"])
        t["values"], t["indices"] = values[:, : case.k].contiguous(), indices[:, : case.k].contiguous()
        if case.aux_k:  # the next-best latents stand in for AuxK's dead ones
            t["aux_values"], t["aux_indices"] = values[:, case.k :].contiguous(), indices[:, case.k :].contiguous()
    t["upstream"] = rand(case.batch, case.k + case.aux_k if case.op == "topk_encode" else case.d)
    return t


# ------------------------------------------------------------------------------------ providers


def _dense_latents(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], n, dtype=values.dtype, device=values.device).scatter(1, indices.long(), values)


def _dense_auxk_values(case: OpCase, pre: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The top aux_k relu'd pre-activations among the dead latents."""
    return pre.masked_fill(~t["dead_mask"], float("-inf")).topk(case.aux_k, dim=-1).values.clamp_min(0)


def _losses(case: OpCase, t: dict[str, torch.Tensor], x_hat: torch.Tensor, e_hat: torch.Tensor | None) -> torch.Tensor:
    """fvu (+ AuxK loss) of a reconstruction, in float32 as sae_loss computes them."""
    x32 = t["x"].float()
    variance = (x32 - x32.mean(0)).pow(2).sum()
    loss = (x_hat.float() - x32).pow(2).sum() / variance
    if e_hat is not None:
        loss = loss + (e_hat.float() - (t["x"] - x_hat).detach().float()).pow(2).sum() / variance
    return loss


def _encode(case: OpCase, provider: str, t: dict[str, torch.Tensor], **options: Any) -> torch.Tensor:
    x, W, b, b_dec = t["x"], t["W_enc"], t["b_enc"], t["b_dec"]
    if provider == "torch_gemm":
        return torch.addmm(b, x - b_dec, W.T)
    if provider == "torch_dense":
        pre = F.relu(F.linear(x - b_dec, W, b))
        values = pre.topk(case.k, dim=-1).values
        return torch.cat([values, _dense_auxk_values(case, pre, t)], 1) if case.aux_k else values
    if provider == "torch_sparse":
        values, _, pre = SparsifyStyleEncoder.apply(x - b_dec, W, b, case.k)
        return torch.cat([values, _dense_auxk_values(case, pre, t)], 1) if case.aux_k else values
    aux = {"dead_mask": t["dead_mask"], "aux_k": case.aux_k} if case.aux_k else {}
    out = topk_encode(x, W, b, case.k, b_dec, **aux, **options)
    return torch.cat([out[0], out[2]], 1) if case.aux_k else out[0]


def _decode(case: OpCase, provider: str, t: dict[str, torch.Tensor], **options: Any) -> torch.Tensor:
    aux = case.op == "sae_loss" and case.aux_k > 0
    if provider.startswith("flashsae"):
        if case.op == "sparse_decode":
            return sparse_decode(t["values"], t["indices"], t["W_dec"], t["b_dec"], **options)
        extra = (t["aux_values"], t["aux_indices"]) if aux else ()
        out = sae_loss(t["x"], t["values"], t["indices"], t["W_dec"], t["b_dec"], *extra, **options)
        return out.fvu + out.auxk_loss if aux else out.fvu
    if provider == "torch_dense":

        def decode(values, indices):
            return _dense_latents(values, indices, case.n) @ t["W_dec"]

    else:

        def decode(values, indices):
            return embedding_bag_decode(values, indices, t["W_dec"])

    x_hat = decode(t["values"], t["indices"]) + t["b_dec"]
    if case.op == "sparse_decode":
        return x_hat
    return _losses(case, t, x_hat, decode(t["aux_values"], t["aux_indices"]) if aux else None)


def _select(case: OpCase, provider: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if provider == "torch_dense":
        return torch.topk(t["scores"], case.k, dim=1).values
    from ..ops import _cuda  # the select kernel alone exists in the CUDA module only

    return _cuda.topk_rows(t["scores"], case.k)[0]


def forward(case: OpCase, provider: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The op's forward by `provider`; returns a tensor to backpropagate from (or to compare)."""
    if case.stage == "select":
        return _select(case, provider, t)
    options: dict[str, Any] = {}
    if provider.startswith("flashsae-"):
        backend, _, variant = provider.removeprefix("flashsae-").partition("-")
        options = {"backend": backend, **(VARIANTS[case.op][variant] if variant else {})}
    autocast = options.pop("autocast", None)
    options.pop("backends", None)
    run = _encode if case.op == "topk_encode" else _decode
    if autocast is None:
        return run(case, provider, t, **options)
    with torch.autocast(torch.device(case.device).type, dtype=DTYPES[autocast]):
        return run(case, provider, t, **options)


def check(case: OpCase, provider: str, t: dict[str, torch.Tensor]) -> None:
    """Raises AssertionError when the provider's forward disagrees with torch_dense's beyond the
    rounding of case.dtype (top-k values compared sorted per row: near-ties may pick other latents).
    A check that the timed call computes the op, not a substitute for the float64 tests."""
    if provider in PARTIAL or provider == "torch_dense":
        return
    with torch.no_grad():
        ours, ref = forward(case, provider, t).float(), forward(case, "torch_dense", t).float()
    if case.op == "topk_encode":
        ours, ref = ours.sort(dim=1).values, ref.sort(dim=1).values
    # float32: 5e-3 leaves room for GPU kernels that multiply in TF32 (10-bit mantissa); 16-bit
    # dtypes: a few roundings of the output (bfloat16: 8 bits)
    tol = (5e-3 if case.dtype == "float32" else 3e-2) * max(float(ref.abs().max()), 1.0)
    err = float((ours - ref).abs().max())
    assert err <= tol, f"{case.op} {case.name} {provider}: max error {err:.3g} vs torch_dense (tolerance {tol:.3g})"


def make_call(case: OpCase, provider: str, t: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A closure running the stage once (gradients dropped after each backward)."""
    if case.stage != "fwd+bwd":

        def forward_only() -> None:
            with torch.no_grad():
                forward(case, provider, t)

        return forward_only
    trainable = ("x", "W_enc", "b_enc", "b_dec") if case.op == "topk_encode" else ("values", "W_dec", "b_dec")
    if case.op == "sae_loss" and case.aux_k:
        trainable += ("aux_values",)
    leaves = {name: t[name].detach().clone().requires_grad_(name != "x") for name in trainable}
    inputs = {**t, **leaves}

    def forward_backward() -> None:
        out = forward(case, provider, inputs)
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(inputs["upstream"])
        for leaf in leaves.values():
            leaf.grad = None

    return forward_backward


# ---------------------------------------------------------------------------------- calibration


def calibrate(device: str = "cpu", dtype: str = "float32") -> dict[str, float]:
    """The machine's peaks measured now: FLOP/s of a large GEMM in `dtype` and bytes/s of a large copy."""
    dev = torch.device(device)
    size = 2048 if dev.type == "cpu" else 8192
    a = torch.randn(size, size, device=dev).to(DTYPES[dtype])
    b = torch.randn(size, size, device=dev).to(DTYPES[dtype])
    gemm_ms = statistics.median(time_ms(lambda: a @ b, dev, 5, warmup=1))
    src = torch.empty(1 << 26 if dev.type == "cpu" else 1 << 30, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_ms(lambda: dst.copy_(src), dev, 5, warmup=1))
    return {
        "peak_flops": 2.0 * size**3 / (gemm_ms / 1e3),
        "peak_bytes_per_s": 2.0 * src.numel() / (copy_ms / 1e3),
        "gemm_size": size,
    }
