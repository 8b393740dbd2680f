"""A full TopK SAE training step (forward, backward, Adam) per provider: torch_dense (naive dense
module), torch_sparse (sparsify-style eager) and flashsae. Compare each row with torch_dense at the
same size; `flashsae bench` prints the same comparison with peak memory."""

import pytest
import torch

from flashsae.benchmarking import DTYPES, PROVIDER_CLASSES, PROVIDERS, BenchConfig, make_optimizer, train_step


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(run_benchmark, benchmark, provider, size_device, size):
    d_in, n_latents, k, batch = size
    config = BenchConfig(d_in=d_in, n_latents=n_latents, k=k, batch=batch, device=size_device)
    device = torch.device(size_device)
    torch.manual_seed(config.seed)
    sae = PROVIDER_CLASSES[provider](d_in, n_latents, k, dtype=DTYPES[config.dtype], device=device)
    optimizer = make_optimizer(config.optimizer, sae.parameters())
    x = torch.randn(batch, d_in, device=device)
    train_step(sae, optimizer, x)  # allocate the optimizer state outside the timing

    def step():
        fvu = train_step(sae, optimizer, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return fvu

    fvu = run_benchmark(step)
    assert torch.isfinite(fvu)
    # the encoder GEMM every provider must do: 2 * batch * n * d FLOPs (DESIGN.md §4)
    benchmark.extra_info.update(
        provider=provider,
        tokens=batch,
        encoder_gemm_flop=2 * batch * n_latents * d_in,
        optimizer=config.optimizer,
    )
