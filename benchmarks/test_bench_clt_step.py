"""A full cross-layer transcoder training step (forward, backward, optimizer) per provider:
torch_dense (a dense PyTorch CLT with fused Adam) and flashsae (CrossLayerTranscoder with SparseAdam
updating rows during backward); providers and harness: flashsae.bench.clt_step. ``flashsae bench
--architecture clt`` prints the same comparison for one size, each provider in its own processes.

The stage names the layer count (the report groups rows by op, stage and sizes; n is per layer). The
work recorded is the step's floor: the L encoder GEMMs (2 * batch * n * d FLOPs each) and the bytes
of fp32 Adam over every weight (28 bytes per weight read or written: weight, gradient, two moments),
L * n * d encoder weights and n * d * L (L + 1) / 2 decoder weights.
"""

import pytest
import torch

from flashsae.bench.clt_step import PROVIDERS, CLTBenchConfig, prepare
from suite_params import DEVICES, device_marks, full_run

#: (n_layers, d, n per layer, k, batch): on CPU the size of the CLT bar.
FULL = {"cpu": [(6, 384, 8192, 32, 1024)], "cuda": [(6, 2048, 1 << 15, 64, 4096)]}
TINY = [(3, 16, 96, 4, 32)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    full = full_run(metafunc.config)
    params = [
        pytest.param(device, size, provider, id=f"{device}-L{size[0]}-d{size[1]}-n{size[2]}-k{size[3]}-b{size[4]}-{provider}",
                     marks=device_marks(device))  # fmt: skip
        for device in DEVICES
        for size in (FULL[device] if full else TINY)
        for provider in PROVIDERS
    ]
    metafunc.parametrize(("device", "size", "provider"), params)


def test_clt_step(run_benchmark, device, size, provider):
    L, d, n, k, batch = size
    config = CLTBenchConfig(n_layers=L, d_in=d, n_latents=n, k=k, batch=batch, device=device)
    _, optimizer, loss_fn = prepare(provider, config)

    def step() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    weights = L * n * d + n * d * L * (L + 1) // 2
    loss = run_benchmark(
        step, op="clt_step", stage=f"fwd+bwd+adam-L{L}", d=d, n=n, k=k, batch=batch, dtype="float32",
        device=device, provider=provider, flop=2.0 * L * batch * n * d, bytes=28.0 * weights,
    )  # fmt: skip
    assert torch.isfinite(loss)
