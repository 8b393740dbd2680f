"""The fused sparse Adam Triton kernels (sparse_adam, sparse_adam_rowwise) compile for the GPU (sm_90a,
cubin through ptxas), without a GPU.

As tests/test_triton_compile.py does for the other kernels: a subprocess with the interpreter off runs
the launcher on meta tensors, records each launch (arguments and the block sizes the launcher picks on
a GPU) instead of running it, and compiles it with triton.compile. Every storage option is compiled:
float32 / bfloat16 parameters, float32 / bfloat16 moments, with and without a master copy and a gradient;
for the row-wise kernel int8 / bfloat16 / no first moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64", "int8": "i8"}


def compile_launches() -> list[dict]:
    import torch
    import triton
    from flashsae.kernels import sparse_adam, sparse_adam_rowwise
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    triton.runtime.jit.JITFunction.run = record
    meta = torch.device("meta")
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
            param, torch.empty(n, d, device=meta) if master else None, state, state,
            torch.empty(n, dtype=torch.int64, device=meta), torch.empty(m, dtype=torch.int64, device=meta),
            torch.empty(m, d, dtype=param_dtype, device=meta) if grads else None, 7,
            torch.empty(8, 2, dtype=torch.float64, device=meta), 0.9, 0.999, 1e-8, 261,
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
            param, torch.empty(n, d, device=meta) if master else None,
            None if first is None else torch.empty(n, d, dtype=first, device=meta),
            torch.empty(n, device=meta) if first == torch.int8 else None, torch.empty(n, device=meta),
            torch.empty(n, dtype=torch.int64, device=meta), torch.empty(m, dtype=torch.int64, device=meta),
            torch.empty(m, d, dtype=param_dtype, device=meta) if grads else None, 7,
            torch.empty(8, 2, dtype=torch.float64, device=meta), 0.0 if first is None else 0.9, 0.999, 1e-8, 261,
        )  # fmt: skip
    results = []
    for fn, args, kwargs in launches:
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
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=options,
        )
        assert kernel.asm["cubin"], f"{fn.__name__}: no cubin"
        results.append({"kernel": fn.__name__, "constexprs": constexprs, "shared": kernel.metadata.shared})
    return results


@pytest.mark.compile
def test_sparse_adam_kernel_compiles_for_sm90a(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 9
    assert {r["kernel"] for r in results} == {"_sparse_adam_kernel", "_sparse_adam_rowwise_kernel"}


if __name__ == "__main__":
    print(json.dumps(compile_launches()))
