"""A full TopK SAE training step (forward, backward, fused Adam) per provider: torch_dense (naive
dense module), torch_sparse (sparsify-style eager) and flashsae, over n (providers and harness:
flashsae.bench.train_step). `flashsae bench` prints the same comparison for one size, each provider
in its own processes.

The work recorded is the step's floor: the encoder GEMM (2 * batch * n * d FLOPs) and the bytes of
dense fp32 Adam over both matrices (56 * n * d: read and write of weight, gradient and two moments).
"""

import pytest
import torch

from flashsae.bench.train_step import PROVIDERS, BenchConfig, prepare, train_step
from suite_params import DEVICES, device_marks, full_run

FULL = {"cpu": [(768, n, 32, 1024) for n in (8192, 24576)], "cuda": [(4096, n, 64, 4096) for n in (1 << 15, 1 << 17)]}
TINY = [(16, 96, 4, 32)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    full = full_run(metafunc.config)
    params = [
        pytest.param(device, size, provider, id=f"{device}-d{size[0]}-n{size[1]}-k{size[2]}-b{size[3]}-{provider}",
                     marks=device_marks(device))  # fmt: skip
        for device in DEVICES
        for size in (FULL[device] if full else TINY)
        for provider in PROVIDERS
    ]
    metafunc.parametrize(("device", "size", "provider"), params)


def test_train_step(run_benchmark, device, size, provider):
    d_in, n_latents, k, batch = size
    config = BenchConfig(d_in=d_in, n_latents=n_latents, k=k, batch=batch, device=device)
    sae, optimizer, x = prepare(provider, config)
    fvu = run_benchmark(
        lambda: train_step(sae, optimizer, x), op="train_step", stage="fwd+bwd+adam", d=d_in, n=n_latents,
        k=k, batch=batch, dtype=config.dtype, device=device, provider=provider, optimizer=config.optimizer,
        flop=2.0 * batch * n_latents * d_in, bytes=56.0 * n_latents * d_in,
    )  # fmt: skip
    assert torch.isfinite(fvu)
