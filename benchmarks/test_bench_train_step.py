"""A full TopK SAE training step (forward, backward, fused Adam) per provider: torch_dense (naive
dense module), torch_sparse (sparsify-style eager) and flashsae, over n. `flashsae bench` prints the
same comparison for one size, each provider in its own process.

The work recorded is the floor of DESIGN.md §4: the encoder GEMM (2 * batch * n * d FLOPs) and the
bytes of dense fp32 Adam over both matrices (56 * n * d).
"""

import pytest
import torch

from flashsae.benchmarking import (
    DTYPES,
    PROVIDER_CLASSES,
    PROVIDERS,
    BenchConfig,
    PeakMemory,
    make_optimizer,
    train_step,
)
from test_bench_ops import machine_peaks

FULL = {"cpu": [(768, n, 32, 1024) for n in (8192, 24576)], "cuda": [(4096, n, 64, 4096) for n in (1 << 15, 1 << 17)]}
TINY = [(16, 96, 4, 32)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    full = bool(metafunc.config.getoption("benchmark_only"))
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    params = [
        pytest.param(device, size, provider, id=f"{device}-d{size[0]}-n{size[1]}-k{size[2]}-b{size[3]}-{provider}")
        for device in devices
        for size in (FULL[device] if full else TINY)
        for provider in PROVIDERS
    ]
    metafunc.parametrize(("device", "size", "provider"), params)


def test_train_step(run_benchmark, benchmark, request, device, size, provider):
    d_in, n_latents, k, batch = size
    config = BenchConfig(d_in=d_in, n_latents=n_latents, k=k, batch=batch, device=device)
    torch.manual_seed(config.seed)
    sae = PROVIDER_CLASSES[provider](d_in, n_latents, k, dtype=DTYPES[config.dtype], device=device)
    optimizer = make_optimizer(config.optimizer, sae.parameters())
    x = torch.randn(batch, d_in, device=device)
    train_step(sae, optimizer, x)  # allocate the optimizer state outside the timing

    def step():
        fvu = train_step(sae, optimizer, x)
        if device == "cuda":
            torch.cuda.synchronize()
        return fvu

    memory = PeakMemory(torch.device(device))
    before = memory.current()
    memory.reset()
    step()
    peak_bytes = max(0, memory.peak() - before)
    fvu = run_benchmark(step)
    assert torch.isfinite(fvu)
    benchmark.extra_info.update(
        op="train_step", stage="fwd+bwd+adam", d=d_in, n=n_latents, k=k, batch=batch, dtype=config.dtype,
        device=device, provider=provider, optimizer=config.optimizer, peak_bytes=peak_bytes,
        flop=2.0 * batch * n_latents * d_in, bytes=56.0 * n_latents * d_in,
    )  # fmt: skip
    if request.config.getoption("benchmark_only"):
        benchmark.extra_info.update(machine_peaks(device, config.dtype))
