"""Every Triton launch compiles for the GPU, without a GPU.

The interpreter (what the other op tests run on CPU) executes kernels as Python and
never sees the compiler, so a kernel can pass there and fail to compile for a GPU. This test runs
the launchers in a subprocess with the interpreter off, on meta tensors, records each kernel launch
(kernel, arguments, block sizes: exactly what the launchers pick on a GPU) instead of running it, and
compiles each one with triton.compile for sm_90a (the H200) down to a cubin: triton's frontend,
MLIR passes, LLVM and the ptxas bundled with the triton wheel all run; only the launch needs a GPU.
FLASHSAE_COMPILE_ARCHS=80,90 adds sm_80 (A100), slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

TYPES = {
    "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int32": "i32", "int64": "i64",
    "uint8": "u8", "int8": "i8",
}  # fmt: skip


def record_launches(group: str) -> list[tuple]:
    """(kernel, bound arguments, launch options) of every launch the launchers of `group` make for a
    few representative problems, on meta tensors: "sae" (topk_encode, sparse_rows, sae_loss) or
    "sparse_adam" (sparse_adam, sparse_adam_rowwise: every storage option, float32 / bfloat16
    parameters and moments, with and without a master copy and a gradient, int8 / bfloat16 / no first
    moment)."""
    import torch
    import triton
    from flashsae.kernels import sae_loss, sparse_adam, sparse_adam_rowwise, sparse_rows, topk_encode
    from flashsae.ops.sparse_adam import AdamStep

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    triton.runtime.jit.JITFunction.run = record
    meta = torch.device("meta")

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device=meta)

    if group == "sparse_adam":
        n, d, m = 1 << 20, 4096, 1 << 15
        for param_dtype, state_dtype, master, grads in (
            (torch.float32, torch.float32, False, True),
            (torch.bfloat16, torch.bfloat16, False, True),
            (torch.bfloat16, torch.float32, True, True),
            (torch.float32, torch.float32, False, False),
        ):
            param = torch.empty(n, d, dtype=param_dtype, device=meta)
            state = torch.empty(n, d, dtype=state_dtype, device=meta)
            sparse_adam.sparse_adam(
                param, state, state, torch.empty(n, dtype=torch.int64, device=meta),
                AdamStep(
                    torch.empty(m, dtype=torch.int64, device=meta),
                    torch.empty(m, d, dtype=param_dtype, device=meta) if grads else None, 7,
                    torch.empty(8, 2, dtype=torch.float64, device=meta), 0.9, 0.999, 1e-8, 261,
                    torch.empty(n, d, device=meta) if master else None,
                ),
            )  # fmt: skip
        for param_dtype, first, master, grads in (
            (torch.bfloat16, torch.int8, False, True),
            (torch.bfloat16, torch.int8, True, True),
            (torch.float32, torch.bfloat16, False, True),
            (torch.float32, None, False, True),
            (torch.bfloat16, torch.int8, False, False),
        ):
            param = torch.empty(n, d, dtype=param_dtype, device=meta)
            sparse_adam_rowwise.sparse_adam_rowwise(
                param, None if first is None else torch.empty(n, d, dtype=first, device=meta),
                torch.empty(n, device=meta) if first == torch.int8 else None, torch.empty(n, device=meta),
                torch.empty(n, dtype=torch.int64, device=meta),
                AdamStep(
                    torch.empty(m, dtype=torch.int64, device=meta),
                    torch.empty(m, d, dtype=param_dtype, device=meta) if grads else None, 7,
                    torch.empty(8, 2, dtype=torch.float64, device=meta), 0.0 if first is None else 0.9, 0.999, 1e-8,
                    261, torch.empty(n, d, device=meta) if master else None,
                ),
            )  # fmt: skip
        return launches

    B, d, n = 4096, 4096, 1 << 15
    for dtype, k, aux_k in ((torch.bfloat16, 64, 64), (torch.float32, 128, 0)):
        x, W = t(B, d, dtype=dtype), t(n, d, dtype=dtype)
        vals, idx = t(B, k, dtype=dtype), t(B, k, dtype=torch.int32)
        aux_vals, aux_idx = t(B, aux_k, dtype=dtype), t(B, aux_k, dtype=torch.int32)
        dead = t(n, dtype=torch.bool)
        topk_encode.topk_encode(
            x, W, t(n, dtype=dtype), t(d, dtype=dtype), k, dead, aux_k, vals, idx, aux_vals, aux_idx
        )
    k, aux_k = 64, 256
    x, W, b = t(B, d), t(n, d), t(d)
    vals, idx, aux_vals, aux_idx = t(B, k), t(B, k, dtype=torch.int32), t(B, aux_k), t(B, aux_k, dtype=torch.int32)
    flags = t(2, dtype=torch.int32)
    sparse_rows.gather_rows(vals, idx, W, t(B, d), flags, bias=b)
    sparse_rows.dot_rows(t(B, d), idx, W, t(B, k), flags)
    sparse_rows.scatter_rows(vals, idx, x, t(n, d), gate=vals, offset=b, coef_sum=t(n))
    f32 = torch.float32
    G, H = t(B, d, dtype=f32), t(B, d, dtype=f32)
    sae_loss.loss_forward(x, vals, idx, aux_vals, aux_idx, W, b, t(B, d), t(B, dtype=f32), t(B, dtype=f32), flags)
    sae_loss.loss_backward_rows(
        t(B, d), t(B, dtype=f32), t(B, dtype=f32), x, vals, idx, aux_vals, aux_idx, W, b, G, H, t(B, d), flags
    )
    # what flashsae.ops.sae_loss runs next: the row dots and one scatter over the main and aux slots
    sparse_rows.dot_rows(G, idx, W, t(B, k), flags)
    sparse_rows.scatter_rows(t(B, k + aux_k), t(B, k + aux_k, dtype=torch.int32), G, t(n, d), R2=H, main_slots=k)
    return launches


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack (spill) bytes, from the cuobjdump bundled with triton."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except OSError:
            return {}
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))} if found else {}


def compile_launches(archs: list[int], group: str) -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results, seen = [], set()
    for fn, args, kwargs in record_launches(group):
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
        bound = dict(zip(fn.arg_names, args, strict=False)) | kwargs
        constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
        signature, constexprs = {}, {}
        for name in fn.arg_names:
            value = bound[name]
            if name in constexpr_names:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        key = (fn.__name__, json.dumps(constexprs, sort_keys=True), json.dumps(signature, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        for arch in archs:
            start = time.time()
            kernel = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
            assert kernel.asm["cubin"], f"{fn.__name__}: no cubin for sm_{arch}"
            results.append(
                {"kernel": fn.__name__, "arch": arch, "seconds": round(time.time() - start, 1),
                 "shared_bytes": kernel.metadata.shared, **resource_usage(kernel.asm["cubin"]),
                 "constexprs": constexprs, **options}
            )  # fmt: skip
    return results


def compile_in_subprocess(tmp_path, archs: str, group: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, __file__, archs, group], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.compile
def test_every_launch_compiles_for_the_gpu(tmp_path):
    archs = os.environ.get("FLASHSAE_COMPILE_ARCHS", "90")
    results = compile_in_subprocess(tmp_path, archs, "sae")
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_encoder_bias_kernel", "_encode_topk_kernel", "_topk_finish_kernel", "_gather_rows_kernel", "_dot_rows_kernel",
        "_scatter_rows_kernel", "_loss_forward_kernel", "_loss_backward_kernel",
    }  # fmt: skip
    assert len(results) >= len(kernels) * len(archs.split(","))


@pytest.mark.compile
def test_sparse_adam_kernels_compile_for_the_gpu(tmp_path):
    results = compile_in_subprocess(tmp_path, "90", "sparse_adam")
    assert len(results) == 9
    assert {r["kernel"] for r in results} == {"_sparse_adam_kernel", "_sparse_adam_rowwise_kernel"}


if __name__ == "__main__":
    print(json.dumps(compile_launches([int(a) for a in sys.argv[1].split(",")], sys.argv[2])))
