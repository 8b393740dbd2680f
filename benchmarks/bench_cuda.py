"""Timings of the CUDA backend on a GPU against torch and the other backends (issue 4's targets).

    python benchmarks/bench_cuda.py [OUT_DIR]       # writes bench_cuda.json and bench_cuda.md there

Rows (bf16):
  select    _C_cuda top-k over [16384, 131072] scores vs torch.topk on the same tensor; GB/s over the
            bytes read once (rows * n * 2) and the fraction of the copy bandwidth measured here
            (target >= 70%, >= 4x torch.topk)
  decoder   sparse_decode forward + backward per backend vs the dense decoder; GB/s over the bytes
            it must move (k gathered rows per token twice, g rows per slot, x_hat, dW write;
            target >= 60%)
  encoder   topk_encode forward per backend vs the cuBLAS GEMM alone and GEMM + torch.topk
Timing: CUDA events around each call, 3 warm-ups, median of 10. Every number is one run on one
machine: compare ratios within the table, not across runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from flashsae import _backend
from flashsae.ops import _cuda, sparse_decode, topk_encode

DEV = "cuda"
DTYPE = torch.bfloat16


def timed(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 31, dtype=torch.int16, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * (1 << 32) / (ms * 1e-3)


def run(rows: list[dict], name: str, provider: str, fn, moved: float | None = None, **info) -> float | None:
    try:
        ms = timed(fn)
    except Exception as exc:  # one provider failing must not hide the others
        rows.append({"op": name, "provider": provider, "error": f"{type(exc).__name__}: {exc}", **info})
        print(f"{name:10s} {provider:16s} ERROR {exc}", flush=True)
        return None
    row = {"op": name, "provider": provider, "ms": ms, **info}
    if moved is not None:
        row["GB/s"] = moved / (ms * 1e-3) / 1e9
    rows.append(row)
    print(f"{name:10s} {provider:16s} {ms:9.3f} ms  {row.get('GB/s', 0):8.1f} GB/s  {info}", flush=True)
    return ms


def backends() -> list[str]:
    names = ["cuda", "torch"]
    if _backend.triton_installed() and not _backend.triton_interpreting():
        names.insert(1, "triton")
    return names


def bench_select(rows: list[dict], peak: float) -> None:
    B, n = 16384, 131072
    scores = torch.randn(B, n, device=DEV, dtype=DTYPE)
    for k in (32, 64, 256):
        ours = run(rows, "select", "flashsae-cuda", lambda k=k: _cuda.topk_rows(scores, k), B * n * 2.0, k=k, n=n, B=B)
        ref = run(rows, "select", "torch.topk", lambda k=k: torch.topk(scores, k, dim=1), B * n * 2.0, k=k, n=n, B=B)
        if ours and ref:
            rows[-2]["speedup_vs_torch_topk"] = ref / ours
            rows[-2]["fraction_of_copy_bw"] = rows[-2]["GB/s"] * 1e9 / peak
    values, _ = _cuda.topk_rows(scores[:64], 64)
    assert torch.equal(values, torch.topk(scores[:64], 64, dim=1).values), "select disagrees with torch.topk"


def bench_decoder(rows: list[dict], peak: float) -> None:
    B, d, n, k = 8192, 4096, 131072, 64
    W = (torch.randn(n, d, device=DEV) * d**-0.5).to(DTYPE).requires_grad_()
    b_dec = torch.zeros(d, device=DEV, dtype=DTYPE, requires_grad=True)
    x = torch.randn(B, d, device=DEV, dtype=DTYPE)
    W_enc = (torch.randn(n, d, device=DEV) * d**-0.5).to(DTYPE)
    values, indices = topk_encode(x, W_enc, torch.zeros(n, device=DEV, dtype=DTYPE), k, backend="torch")
    values = values.detach().requires_grad_()
    g = torch.randn(B, d, device=DEV, dtype=DTYPE)
    s = 2
    moved = 2 * B * k * d * s + B * k * d * s + n * d * s + 3 * B * d * s  # rows twice, g per slot, dW, x_hat/g/db

    def decoder(backend):
        def step():
            out = sparse_decode(values, indices, W, b_dec, backend=backend)
            torch.autograd.grad(out, [values, W, b_dec], g)

        return step

    def dense():
        latents = torch.zeros(B, n, device=DEV, dtype=DTYPE).scatter(1, indices.long(), values)
        out = latents @ W + b_dec
        torch.autograd.grad(out, [latents, W, b_dec], g)

    for backend in backends():
        run(rows, "decoder", f"flashsae-{backend}", decoder(backend), moved, d=d, n=n, k=k, B=B)
    run(rows, "decoder", "torch_dense", dense, moved, d=d, n=n, k=k, B=B)
    for row in rows:
        if row["op"] == "decoder" and "GB/s" in row:
            row["fraction_of_copy_bw"] = row["GB/s"] * 1e9 / peak


def bench_encoder(rows: list[dict]) -> None:
    B, d, n, k = 4096, 4096, 131072, 64
    x = torch.randn(B, d, device=DEV, dtype=DTYPE)
    W_enc = (torch.randn(n, d, device=DEV) * d**-0.5).to(DTYPE)
    b_enc = torch.zeros(n, device=DEV, dtype=DTYPE)
    flop = 2.0 * B * n * d
    gemm = run(rows, "encoder", "cublas_gemm_only", lambda: x @ W_enc.T, d=d, n=n, k=k, B=B)
    run(rows, "encoder", "gemm+torch.topk", lambda: torch.topk((x @ W_enc.T + b_enc).relu(), k, dim=1), d=d, n=n, k=k,
        B=B)  # fmt: skip
    for backend in backends():
        ms = run(rows, "encoder", f"flashsae-{backend}", lambda b=backend: topk_encode(x, W_enc, b_enc, k, backend=b),
                 d=d, n=n, k=k, B=B)  # fmt: skip
        if ms and gemm:
            rows[-1]["TFLOP/s"] = flop / (ms * 1e-3) / 1e12
            rows[-1]["fraction_of_gemm"] = gemm / ms


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    peak = copy_bandwidth()
    print(f"copy bandwidth {peak / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    rows: list[dict] = [{"op": "copy", "provider": "torch", "GB/s": peak / 1e9}]
    bench_select(rows, peak)  # each section's tensors are freed when it returns
    bench_decoder(rows, peak)
    bench_encoder(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    (out_dir / "bench_cuda.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = ["op", "provider", "ms", "GB/s", "fraction_of_copy_bw", "speedup_vs_torch_topk", "TFLOP/s",
            "fraction_of_gemm", "k", "n", "d", "B", "error"]  # fmt: skip
    lines = [f"GPU {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}", "", "| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]  # fmt: skip
    for row in rows:
        cells = [f"{row[key]:.3g}" if isinstance(row.get(key), float) else str(row.get(key, "")) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "bench_cuda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "device-out"))
