"""Every flashsae._C_cuda kernel once, on small odd inputs, for compute-sanitizer (memcheck, racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python tests/cuda_sanitize.py

Each kernel path runs at least once: the select's vector and element-wise loads, its merges, aux
state and the > 32 KiB shared-memory opt-in (k = aux_k = 2048); the finish sort at every width; row
gathers, dots and segment reduces on the 16-byte and scalar paths; the loss forward and backward
rows with and without aux. Results are compared with the torch backend (loose tolerances: this is
a memory / race check; the CUDA tests check the numbers). PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives
every tensor its own allocation, so an out-of-bounds access leaves it instead of landing in a
neighbour inside torch's cache. Exit status 0 when every comparison held.

A script, not a pytest module (its name does not match test_*.py): compute-sanitizer runs it as one
process, in the sanitize step of benchmarks/run_device.sh.
"""

from __future__ import annotations

import importlib
import sys

import torch

from flashsae.ops import _cuda, sae_loss, sparse_decode, topk_encode

topk_encode_module = importlib.import_module("flashsae.ops.topk_encode")


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-2) -> bool:
    a, b = a.double(), b.double()
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-6)


def main() -> int:
    torch.manual_seed(0)
    dev = "cuda"
    failures: list[str] = []

    def check(name: str, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
        if not ok:
            failures.append(name)

    # select: aligned bf16 rows (vector loads), unaligned fp32 rows (element loads), fp16
    cases = ((torch.bfloat16, 5000, 64, 0), (torch.float32, 4099, 7, 1), (torch.float16, 3000, 300, 0))
    for dtype, n, k, offset in cases:
        base = torch.randn(3, n + offset, device=dev).to(dtype)
        scores = base[:, offset:]
        values, indices = _cuda.topk_rows(scores, k)
        ref = torch.sort(scores.float(), dim=1, descending=True, stable=True)
        check(f"select {dtype} n={n} k={k}", torch.equal(indices.long(), ref.indices[:, :k]))
    # select with aux at the shared-memory limit, fed in two launches
    rows, n = 2, 6000
    scores = torch.randn(rows, n, device=dev)
    dead = torch.rand(n, device=dev) < 0.5
    state, aux_state = _cuda.select_state(rows, 2048, dev), _cuda.select_state(rows, 2048, dev)
    for c0, c1 in ((0, 2500), (2500, n)):
        _cuda.topk_select(scores[:, c0:c1], state, col0=c0, relu=True, dead_mask=dead.view(torch.uint8),
                          aux_state=aux_state)  # fmt: skip
    for st, mask in ((state, None), (aux_state, dead)):
        values = torch.empty(rows, 2048, device=dev)
        indices = torch.empty(rows, 2048, dtype=torch.int32, device=dev)
        _cuda.topk_finish(st, values, indices)
        act = scores.relu() if mask is None else scores.relu().masked_fill(~mask, float("-inf"))
        ref = torch.sort(act, dim=1, descending=True, stable=True).values[:, :2048]
        filled = min(int(dead.sum()), 2048) if mask is not None else 2048
        name = "aux" if mask is not None else "main"
        check(f"select k=2048 {name}", torch.equal(values[:, :filled], ref[:, :filled]))

    # encoder forward + backward, several chunks, aux fused (its scores are fp32 for every input
    # dtype; float32 inputs keep the comparison with the torch backend free of near-tie flips)
    topk_encode_module.CUDA_CHUNK_ELEMENTS = 1  # 256-latent chunks
    for dtype, (rows, d, n, k) in ((torch.float32, (9, 64, 1000, 16)), (torch.float32, (5, 33, 700, 5))):
        x = torch.randn(rows, d, device=dev, dtype=dtype, requires_grad=True)
        W = (torch.randn(n, d, device=dev) * d**-0.5).to(dtype).requires_grad_()
        b = (torch.randn(n, device=dev) * 0.1).to(dtype).requires_grad_()
        bd = (torch.randn(d, device=dev) * 0.1).to(dtype).requires_grad_()
        dead = torch.rand(n, device=dev) < 0.2
        out = topk_encode(x, W, b, k, bd, dead_mask=dead, aux_k=8, backend="cuda")
        ref = topk_encode(x, W, b, k, bd, dead_mask=dead, aux_k=8, backend="torch")
        check(f"encode n={n} k={k}", close(out[0], ref[0]))
        grads = torch.autograd.grad(out[0].float().sum() + out[2].float().sum(), [x, W, b, bd])
        ref_grads = torch.autograd.grad(ref[0].float().sum() + ref[2].float().sum(), [x, W, b, bd])
        check(f"encode backward n={n} k={k}", all(close(g, r) for g, r in zip(grads, ref_grads, strict=True)))

    # decoder forward + backward: 16-byte path (d = 64) and scalar path (d = 37), k > 256 slots
    for dtype, d, k in ((torch.bfloat16, 64, 300), (torch.float32, 37, 5), (torch.float16, 64, 9)):
        values = torch.rand(11, k, device=dev, dtype=dtype, requires_grad=True)
        indices = torch.randint(-1, 500, (11, k), device=dev, dtype=torch.int32)
        W = torch.randn(500, d, device=dev, dtype=dtype, requires_grad=True)
        bd = torch.randn(d, device=dev, dtype=dtype, requires_grad=True)
        outs = [sparse_decode(values, indices, W, bd, backend=be) for be in ("cuda", "torch")]
        check(f"decode {dtype} d={d}", close(*outs))
        g = [torch.autograd.grad(o.float().pow(2).sum(), [values, W, bd]) for o in outs]
        check(f"decode backward {dtype} d={d}", all(close(a, r) for a, r in zip(*g, strict=True)))

    # loss forward + backward, with and without aux
    for aux_k in (0, 4):
        rows, d, n = 13, 40, 300
        x = torch.randn(rows, d, device=dev, requires_grad=True)
        values = torch.rand(rows, 6, device=dev, requires_grad=True)
        indices = torch.randint(-1, n, (rows, 6), device=dev, dtype=torch.int32)
        W = torch.randn(n, d, device=dev, requires_grad=True)
        bd = torch.randn(d, device=dev, requires_grad=True)
        av = torch.rand(rows, aux_k, device=dev, requires_grad=True) if aux_k else None
        ai = torch.randint(-1, n, (rows, aux_k), device=dev, dtype=torch.int32) if aux_k else None
        leaves = [x, values, W, bd] + ([av] if aux_k else [])
        res = []
        for be in ("cuda", "torch"):
            out = sae_loss(x, values, indices, W, bd, av, ai, backend=be)
            res.append(torch.autograd.grad(out.fvu + out.auxk_loss + out.x_hat.sum() * 1e-3, leaves))
        check(f"loss backward aux_k={aux_k}", all(close(a, r) for a, r in zip(*res, strict=True)))

    torch.cuda.synchronize()
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
