"""The Triton kernels on a GPU, each against the dense PyTorch computation of the same result
(DESIGN.md §6), timed with triton.testing.do_bench (median ms, L2 flushed between runs).

Per size (bf16; d, n, k, B from issue 3):
  encoder   triton fused encoder + top-k  vs  cuBLAS GEMM alone (the ceiling: target >= 80%),
            GEMM + relu + torch.topk (dense), and torch.topk alone on materialized pre-activations
  decoder   sparse_decode forward + backward  vs  the dense decoder ([B, n] latents @ W_dec and its
            autograd backward; target >= 10x at n / k >= 1000)
  loss      sae_loss forward + backward (AuxK on)  vs  the same math on dense [B, n] latents
Before timing, each size is validated: the fused top-k against fp32 pre-activations recomputed
for 256 rows, decoder and loss against the torch backend.

Runs under ``pytest benchmarks/test_bench_ops_triton.py --benchmark-only`` on a machine with a GPU
and TRITON_INTERPRET=0 (benchmarks/run_device.sh); the do_bench numbers land in each row's
extra_info in the --benchmark-json output. Skipped without a GPU. A plain ``pytest`` run on a GPU
machine runs one tiny size once, so the suite cannot rot.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from flashsae import _backend  # noqa: E402
from flashsae.ops import sae_loss, sparse_decode, topk_encode  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(_backend.triton_interpreting(), reason="the Triton interpreter is on (TRITON_INTERPRET=1)"),
]

DTYPE = torch.bfloat16
DEVICE = "cuda"
#: (d, n, k, B): the issue's grid, trimmed to fit one 10-minute device call.
ENCODER_SIZES = [
    (768, 1 << 15, 32, 4096), (768, 1 << 17, 64, 4096), (768, 1 << 17, 64, 16384), (4096, 1 << 15, 64, 4096),
    (4096, 1 << 17, 32, 4096), (4096, 1 << 17, 64, 4096), (4096, 1 << 17, 128, 4096), (4096, 1 << 17, 64, 16384),
    (4096, 1 << 20, 64, 4096),
]  # fmt: skip
DECODER_SIZES = [(768, 1 << 15, 32, 4096), (4096, 1 << 17, 64, 4096), (4096, 1 << 20, 128, 4096)]
#: AuxK in the encoder: aux_k = 64 is fused, d / 2 = 384 (TopKSAE's default) runs over the dead latents.
AUX_SIZES = [(768, 1 << 17, 32, 4096, 64), (768, 1 << 17, 32, 4096, 384)]
TINY = [(64, 2048, 16, 256)]


def sizes(config: pytest.Config, full: list) -> list:
    return full if config.getoption("benchmark_only") else TINY


def pytest_generate_tests(metafunc):
    for name, full in (("encoder_size", ENCODER_SIZES), ("decoder_size", DECODER_SIZES)):
        if name in metafunc.fixturenames:
            cases = sizes(metafunc.config, full)
            metafunc.parametrize(name, cases, ids=[f"d{d}-n{n}-k{k}-b{b}" for d, n, k, b in cases])
    if "aux_size" in metafunc.fixturenames:
        cases = AUX_SIZES if metafunc.config.getoption("benchmark_only") else [(*TINY[0], 8)]
        metafunc.parametrize("aux_size", cases, ids=[f"d{d}-n{n}-k{k}-b{b}-aux{a}" for d, n, k, b, a in cases])


def bench(fn) -> float:
    """Median milliseconds (do_bench flushes L2 between runs)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def sae(d: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(DTYPE)

    return {
        "W_enc": randn(n, d, scale=d**-0.5), "b_enc": randn(n, scale=0.1), "b_dec": randn(d, scale=0.1),
        "W_dec": randn(n, d, scale=d**-0.5),
    }  # fmt: skip


def validate_topk(x, t, k, values, indices, rows: int = 256) -> None:
    """The fused selection against fp32 pre-activations recomputed for the first rows: values equal
    the activations they name, and nothing unselected beats the k-th value (both up to bf16 rounding
    of the outputs and TF32-free fp32 recomputation)."""
    pre = ((x[:rows].float() - t["b_dec"].float()) @ t["W_enc"].float().T + t["b_enc"].float()).relu()
    v, i = values[:rows].float(), indices[:rows].long()
    scale = pre.abs().max().item()
    assert (v - pre.gather(1, i)).abs().max().item() <= 1e-2 * scale, "values differ from their latents"
    unselected = pre.scatter(1, i, float("-inf")).max(1).values
    assert (unselected <= v.min(1).values + 1e-2 * scale).all(), "a better latent was skipped"


def test_encoder(benchmark, encoder_size):
    d, n, k, B = encoder_size
    torch.manual_seed(0)
    t = sae(d, n)
    x = torch.randn(B, d, device=DEVICE).to(DTYPE)

    def fused():
        return topk_encode(x, t["W_enc"], t["b_enc"], k, t["b_dec"], backend="triton")

    values, indices = fused()
    validate_topk(x, t, k, values, indices)
    W_t = t["W_enc"].T
    centered = x - t["b_dec"]
    pre = torch.addmm(t["b_enc"], centered, W_t)
    timings = {
        "triton_fused_ms": bench(fused),
        "cublas_gemm_ms": bench(lambda: torch.addmm(t["b_enc"], centered, W_t)),
        "dense_gemm_relu_topk_ms": bench(lambda: torch.addmm(t["b_enc"], x - t["b_dec"], W_t).relu_().topk(k, dim=1)),
        "torch_topk_on_materialized_ms": bench(lambda: pre.topk(k, dim=1)),
    }
    flop = 2 * B * n * d
    benchmark.extra_info.update(
        op="topk_encode", d=d, n=n, k=k, batch=B, dtype=str(DTYPE), **timings,
        fused_vs_gemm=timings["cublas_gemm_ms"] / timings["triton_fused_ms"],
        dense_over_fused=timings["dense_gemm_relu_topk_ms"] / timings["triton_fused_ms"],
        fused_tflops=flop / timings["triton_fused_ms"] / 1e9, gemm_tflops=flop / timings["cublas_gemm_ms"] / 1e9,
    )  # fmt: skip
    benchmark.pedantic(fused, rounds=1, iterations=1)


def test_encoder_with_auxk(benchmark, aux_size):
    d, n, k, B, aux_k = aux_size
    torch.manual_seed(3)
    t = sae(d, n)
    x = torch.randn(B, d, device=DEVICE).to(DTYPE)
    dead = torch.rand(n, device=DEVICE) < 0.1

    def fused():
        return topk_encode(x, t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead, aux_k=aux_k, backend="triton")

    def dense():
        pre = torch.addmm(t["b_enc"], x - t["b_dec"], t["W_enc"].T).relu_()
        return pre.topk(k, dim=1), pre.masked_fill_(~dead, float("-inf")).topk(aux_k, dim=1)

    values, indices, _, aux_indices = fused()
    validate_topk(x, t, k, values, indices)
    assert bool(dead[aux_indices[:, : min(aux_k, int(dead.sum()))].long()].all()), "aux picked a live latent"
    timings = {"triton_fused_ms": bench(fused), "dense_gemm_relu_topk_auxk_ms": bench(dense)}
    benchmark.extra_info.update(
        op="topk_encode + AuxK (10% dead)", d=d, n=n, k=k, aux_k=aux_k, batch=B, dtype=str(DTYPE), **timings,
        dense_over_fused=timings["dense_gemm_relu_topk_auxk_ms"] / timings["triton_fused_ms"],
    )  # fmt: skip
    benchmark.pedantic(fused, rounds=1, iterations=1)


def dense_latents(values, indices, n):
    return torch.zeros(values.shape[0], n, dtype=values.dtype, device=values.device).scatter_(1, indices.long(), values)


def test_decoder_forward_backward(benchmark, decoder_size):
    d, n, k, B = decoder_size
    torch.manual_seed(1)
    t = sae(d, n)
    values = torch.rand(B, k, device=DEVICE).to(DTYPE).requires_grad_()
    indices = torch.randint(0, n, (B, k), device=DEVICE, dtype=torch.int32)
    W_dec = t["W_dec"].requires_grad_()
    b_dec = t["b_dec"].requires_grad_()
    grad = torch.randn(B, d, device=DEVICE).to(DTYPE)

    def sparse(backend):
        def step():
            x_hat = sparse_decode(values, indices, W_dec, b_dec, backend=backend)
            return torch.autograd.grad(x_hat, (values, W_dec, b_dec), grad)

        return step

    def dense():
        dense_values = dense_latents(values, indices, n)
        x_hat = dense_values @ W_dec + b_dec
        return torch.autograd.grad(x_hat, (values, W_dec, b_dec), grad)

    ours, ref = sparse("triton")(), sparse("torch")()
    for name, a, b in zip(["d_values", "dW_dec", "db_dec"], ours, ref, strict=True):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2e-2 * max(b.float().abs().max().item(), 1e-6), f"{name}: {err}"
    timings = {
        "triton_ms": bench(sparse("triton")),
        "torch_sparse_ms": bench(sparse("torch")),
        "dense_ms": bench(dense),
    }
    benchmark.extra_info.update(
        op="sparse_decode fwd+bwd", d=d, n=n, k=k, batch=B, dtype=str(DTYPE), **timings,
        dense_over_triton=timings["dense_ms"] / timings["triton_ms"],
        # the floor: dW_dec is a dense [n, d] write, plus k rows of W_dec read twice per token
        min_bytes=2 * (n * d + 2 * B * k * d),
    )  # fmt: skip
    benchmark.pedantic(sparse("triton"), rounds=1, iterations=1)


def test_sae_loss_forward_backward(benchmark, decoder_size):
    d, n, k, B = decoder_size
    aux_k = 64
    torch.manual_seed(2)
    t = sae(d, n)
    x = torch.randn(B, d, device=DEVICE).to(DTYPE)
    values = torch.rand(B, k, device=DEVICE).to(DTYPE).requires_grad_()
    indices = torch.randint(0, n, (B, k), device=DEVICE, dtype=torch.int32)
    aux_values = torch.rand(B, aux_k, device=DEVICE).to(DTYPE).requires_grad_()
    aux_indices = torch.randint(0, n, (B, aux_k), device=DEVICE, dtype=torch.int32)
    W_dec = t["W_dec"].requires_grad_()
    b_dec = t["b_dec"].requires_grad_()
    leaves = (values, W_dec, b_dec, aux_values)

    def fused(backend):
        def step():
            out = sae_loss(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend=backend)
            return torch.autograd.grad(out.fvu + out.auxk_loss, leaves)

        return step

    def dense():
        x_hat = dense_latents(values, indices, n) @ W_dec + b_dec
        e_hat = dense_latents(aux_values, aux_indices, n) @ W_dec
        variance = (x.float() - x.float().mean(0)).pow(2).sum()
        fvu = (x_hat.float() - x.float()).pow(2).sum() / variance
        auxk = (e_hat.float() - (x - x_hat).detach().float()).pow(2).sum() / variance
        return torch.autograd.grad(fvu + auxk, leaves)

    ours, ref = fused("triton")(), fused("torch")()
    for name, a, b in zip(["d_values", "dW_dec", "db_dec", "d_aux_values"], ours, ref, strict=True):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2e-2 * max(b.float().abs().max().item(), 1e-6), f"{name}: {err}"
    timings = {"triton_ms": bench(fused("triton")), "torch_sparse_ms": bench(fused("torch")), "dense_ms": bench(dense)}
    benchmark.extra_info.update(
        op="sae_loss fwd+bwd", d=d, n=n, k=k, aux_k=aux_k, batch=B, dtype=str(DTYPE), **timings,
        dense_over_triton=timings["dense_ms"] / timings["triton_ms"],
    )  # fmt: skip
    benchmark.pedantic(fused("triton"), rounds=1, iterations=1)
