"""CUDA kernels against the float64 reference (skipped without a GPU; CI still compiles them)."""

import pytest
import torch

from flashsae import TopKSAE
from flashsae.ops import sparse_decode, sparse_decode_reference
from helpers import assert_close, randn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("rows", "d", "n", "k"), [(37, 97, 1000, 7), (64, 768, 4096, 32), (3, 8, 5, 5)])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_sparse_decode_forward(dtype, rows, d, n, k, with_bias):
    # d = 97 takes the scalar path; d = 768 and 8 the 16-byte vector path
    values = randn(rows, k).abs().to(dtype).cuda()
    indices = torch.randint(-1, n, (rows, k), dtype=torch.int32).cuda()
    W_dec = randn(n, d, scale=d**-0.5, dtype=dtype).cuda()
    b_dec = randn(d, dtype=dtype).cuda() if with_bias else None
    x_hat = sparse_decode(values, indices, W_dec, b_dec, backend="cuda")
    ref = sparse_decode_reference(
        values.double().cpu(), indices.cpu(), W_dec.double().cpu(), None if b_dec is None else b_dec.double().cpu()
    )
    assert_close(x_hat.cpu(), ref, dtype, "x_hat")


def test_sparse_decode_runs_on_the_current_stream():
    values = torch.rand(512, 16, device="cuda")
    indices = torch.randint(0, 2048, (512, 16), dtype=torch.int32, device="cuda")
    W_dec = torch.randn(2048, 256, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    with torch.cuda.stream(side):
        x_hat = sparse_decode(values, indices, W_dec, backend="cuda")
    side.synchronize()
    torch.testing.assert_close(x_hat, sparse_decode(values, indices, W_dec, backend="torch"))


def test_sparse_decode_reports_out_of_range_indices():
    indices = torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    indices[2, 1] = 50
    with pytest.raises(ValueError, match="indices: some index is out of range"):
        sparse_decode(torch.rand(4, 2, device="cuda"), indices, torch.randn(50, 8, device="cuda"), backend="cuda")


def test_topk_sae_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = TopKSAE(64, 512, 8)
    gpu = TopKSAE(64, 512, 8, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(128, 64)
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    out_cpu.fvu.backward()
    out_gpu.fvu.backward()
    torch.testing.assert_close(out_gpu.x_hat.cpu(), out_cpu.x_hat, rtol=1e-4, atol=1e-5)
    for p, q in zip(gpu.parameters(), cpu.parameters(), strict=True):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-5)
