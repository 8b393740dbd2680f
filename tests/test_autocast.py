"""Autocast: under torch.autocast every op's kernels receive the autocast dtype, gradients reach the
parameters in their own dtype with the values of the float64 reference (on the operands the kernels
saw), and outside autocast nothing changes. The rules are in flashsae/ops/_autocast.py.

What a kernel receives is recorded by helpers.OpOperands, a TorchDispatchMode: it sees each flashsae
op below the autocast and autograd keys, i.e. the arguments the op's backend dispatch gets; compiled
graphs are read by GraphOperands.

Backends: cpu, torch and triton (interpreted) on CPU tensors under CPU autocast; the cuda backend's
glue on CPU tensors through tests/cuda_fake.py; cuda and triton on a GPU under CUDA autocast (skipped
without one).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.library import opcheck

import cuda_fake
from flashsae import TopKSAE, _backend, _native
from flashsae.ops import (
    _row_grads,
    batch_topk,
    sae_loss,
    sae_loss_reference,
    sparse_decode,
    sparse_decode_reference,
    threshold_encode,
    topk_encode,
)
from flashsae.ops.threshold_encode import DENSE_FRACTION
from helpers import OpOperands, assert_close, assert_received, randn, sae_tensors

LOW = [torch.bfloat16, torch.float16]
ROWS, D, N, K, AUX_K = 13, 24, 150, 5, 6


def gpu_ready() -> bool:
    return torch.cuda.is_available() and _native.cuda_module_available()


def triton_on(device_type: str) -> bool:
    if not _backend.triton_installed():
        return False
    return _backend.triton_interpreting() if device_type == "cpu" else torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu:cpu",
        "cpu:torch",
        pytest.param("cpu:triton", marks=pytest.mark.skipif(not triton_on("cpu"), reason="needs TRITON_INTERPRET=1")),
        "cpu:cuda-fake",
        pytest.param("cuda:cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not gpu_ready(), reason="needs a GPU")]),
        pytest.param(
            "cuda:triton",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not triton_on("cuda"), reason="needs a GPU, no interpreter")],
        ),
    ]
)
def target(request, monkeypatch) -> tuple[torch.device, str]:
    """(device, backend) of a test case; cuda-fake runs the cuda backend's glue on CPU tensors."""
    device, backend = request.param.split(":")
    if backend == "cuda-fake":
        cuda_fake.install(monkeypatch)
        backend = "cuda"
    return torch.device(device), backend


def leaves(device, **tensors) -> dict[str, torch.Tensor]:
    """float32 leaves requiring grad (the parameters and inputs of an autocast region)."""
    return {k: v.detach().float().to(device).requires_grad_() for k, v in tensors.items()}


def rounded(t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The operands the kernels see under autocast, in float64, as reference leaves."""
    return {k: v.detach().to(dtype).double().cpu().requires_grad_() for k, v in t.items()}


def assert_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every float32 leaf has a float32 gradient equal to the reference's at the autocast tolerance."""
    for name, leaf in got.items():
        assert leaf.grad is not None, f"d{name}: no gradient"
        assert leaf.grad.dtype == torch.float32, f"d{name}: {leaf.grad.dtype}, expected the parameter's float32"
        assert_close(leaf.grad.cpu(), ref[name].grad, dtype, f"d{name}")


def encoder_inputs(device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """float32 encoder leaves x, W_enc, b_enc, b_dec and a dead mask (40% of the latents)."""
    t = sae_tensors(ROWS, D, N, torch.float32)
    return leaves(device, **{k: t[k] for k in ("x", "W_enc", "b_enc", "b_dec")}), (torch.rand(N) < 0.4).to(device)


def encoder_pre(r: dict[str, torch.Tensor]) -> torch.Tensor:
    return (r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]


def encoder_act(r: dict[str, torch.Tensor]) -> torch.Tensor:
    return encoder_pre(r).relu()


def check_against_reference(p, dtype, out, reference_of) -> None:
    """out against ``reference_of(r)``, the float64 reference on the rounded operands r; then the
    gradients of sum(out * w) against the reference's."""
    w = randn(*out.shape)
    (out.double().cpu() * w).sum().backward()
    r = rounded(p, dtype)
    ref = reference_of(r)
    assert_close(out.cpu(), ref, dtype, "output")
    (ref * w).sum().backward()
    assert_grads(p, r, dtype)


def check_selected(p, dtype, values, indices, dense_of) -> None:
    """Padded encoder output values [rows, m] (index -1: empty slot) against the float64 reference
    ``dense_of(r)`` [rows, n] at the kernel's own selection (low precision may pick differently at
    near-ties), and their gradients."""
    idx = indices.long().cpu()
    check_against_reference(p, dtype, values, lambda r: dense_of(r).gather(1, idx.clamp_min(0)) * (idx >= 0))


# ------------------------------------------------------------------------------------ topk_encode


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_topk_encode_under_autocast(target, dtype):
    device, backend = target
    p, dead = encoder_inputs(device)
    with OpOperands() as mode, torch.autocast(device.type, dtype):
        values, indices, aux_values, aux_indices = topk_encode(
            p["x"], p["W_enc"], p["b_enc"], K, p["b_dec"], dead_mask=dead, aux_k=AUX_K, backend=backend
        )
    assert values.dtype == aux_values.dtype == dtype and indices.dtype == aux_indices.dtype == torch.int32
    assert_received(mode, "topk_encode", dtype, ["x", "W_enc", "b_enc", "b_dec"])
    with OpOperands() as back:
        check_selected(
            p, dtype, torch.cat([values, aux_values], 1), torch.cat([indices, aux_indices], 1), encoder_act
        )
    assert_received(back, "topk_encode_backward", dtype, ["d_values", "values", "x", "W_enc", "b_dec"])


# ---------------------------------------------------------------------------------- sparse_decode


def sparse_latents(rows: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.stack([torch.randperm(n)[:k] for _ in range(rows)]).to(torch.int32)
    indices[0, -1] = -1  # an empty slot
    return torch.rand(rows, k), indices


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sparse_decode_under_autocast(target, dtype):
    device, backend = target
    values, indices = sparse_latents(ROWS, K, N)
    t = sae_tensors(ROWS, D, N, torch.float32)
    p = leaves(device, values=values, W_dec=t["W_dec"], b_dec=t["b_dec"])
    with OpOperands() as mode, torch.autocast(device.type, dtype):
        x_hat = sparse_decode(p["values"], indices.to(device), p["W_dec"], p["b_dec"], backend=backend)
    assert x_hat.dtype == dtype
    assert_received(mode, "sparse_decode", dtype, ["values", "W_dec", "b_dec"])
    with OpOperands() as back:
        check_against_reference(
            p, dtype, x_hat, lambda r: sparse_decode_reference(r["values"], indices, r["W_dec"], r["b_dec"])
        )
    assert_received(back, "sparse_decode_backward", dtype, ["grad", "values", "W_dec"])


# --------------------------------------------------------------------------------------- sae_loss


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sae_loss_under_autocast(target, dtype):
    device, backend = target
    values, indices = sparse_latents(ROWS, K, N)
    aux_values, aux_indices = sparse_latents(ROWS, AUX_K, N)
    t = sae_tensors(ROWS, D, N, torch.float32)
    p = leaves(device, x=t["x"], values=values, W_dec=t["W_dec"], b_dec=t["b_dec"], aux_values=aux_values)
    with OpOperands() as mode, torch.autocast(device.type, dtype):
        out = sae_loss(
            p["x"], p["values"], indices.to(device), p["W_dec"], p["b_dec"], p["aux_values"], aux_indices.to(device),
            backend=backend,
        )  # fmt: skip
    assert out.x_hat.dtype == dtype
    assert out.mse.dtype == out.fvu.dtype == out.auxk_loss.dtype == torch.float32, "losses accumulate in float32"
    assert_received(mode, "sae_loss", dtype, ["x", "values", "W_dec", "b_dec", "aux_values"])
    w = randn(ROWS, D)
    with OpOperands() as back:
        (out.fvu + 0.5 * out.auxk_loss + 3 * out.mse + (out.x_hat.double().cpu() * w).sum() / 100).backward()
    assert_received(back, "sae_loss_backward", dtype, ["x", "values", "W_dec", "b_dec", "aux_values"])
    r = rounded(p, dtype)
    ref = sae_loss_reference(r["x"], r["values"], indices, r["W_dec"], r["b_dec"], r["aux_values"], aux_indices)
    for name in ("x_hat", "mse", "fvu", "auxk_loss"):
        assert_close(getattr(out, name).cpu(), getattr(ref, name), dtype, name)
    (ref.fvu + 0.5 * ref.auxk_loss + 3 * ref.mse + (ref.x_hat * w).sum() / 100).backward()
    assert_grads(p, r, dtype)


# ---------------------------------------------------------------------- threshold_encode, batch_topk


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_threshold_encode_under_autocast(target, dtype, path):
    device, backend = target
    p, _ = encoder_inputs(device)
    # float32 thresholds, as JumpReLU's exp(log_threshold): high ones leave ~5% of the latents active
    # (topk_encode with 4 candidates, the counting pass, a second encode); low ones take the dense path
    low = 1.6 if path == "sparse" else 0.0
    threshold = (low + torch.rand(N) * 0.4).to(device)
    with OpOperands() as mode, torch.autocast(device.type, dtype):
        values, indices = threshold_encode(
            p["x"], p["W_enc"], p["b_enc"], threshold, p["b_dec"], candidates=4, backend=backend
        )
    assert values.dtype == dtype and indices.dtype == torch.int32
    assert_received(mode, "topk_encode", dtype, ["x", "W_enc", "b_enc", "b_dec"])
    assert (values.shape[1] > N * DENSE_FRACTION) == (path == "dense")
    assert (indices >= 0).any()
    check_selected(p, dtype, values, indices, encoder_pre)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_batch_topk_under_autocast(target, dtype):
    device, backend = target
    p, dead = encoder_inputs(device)
    with OpOperands() as mode, torch.autocast(device.type, dtype):
        out = batch_topk(p["x"], p["W_enc"], p["b_enc"], K, p["b_dec"], dead_mask=dead, aux_k=AUX_K, backend=backend)
    assert out.values.dtype == out.aux_values.dtype == dtype
    assert_received(mode, "topk_encode", dtype, ["x", "W_enc", "b_enc", "b_dec"])
    assert int((out.indices >= 0).sum()) == ROWS * K
    check_selected(p, dtype, out.values, out.indices, encoder_act)


# ------------------------------------------------------------------------- the registered kernels


def test_direct_op_calls_cast_through_the_dispatcher():
    """torch.ops.flashsae.* (no public function in between) get the same rule from their autocast
    kernels: the implementation receives bf16, the float32 leaves get float32 gradients."""
    t = sae_tensors(ROWS, D, N, torch.float32)
    p = leaves("cpu", **{k: t[k] for k in ("x", "W_enc", "b_enc", "b_dec", "W_dec")})
    dead = torch.rand(N) < 0.4
    ops = torch.ops.flashsae
    with OpOperands() as mode, torch.autocast("cpu", torch.bfloat16):
        values, indices, _, _ = ops.topk_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], K, dead, AUX_K, "cpu")
        x_hat, sse, _ = ops.sae_loss(p["x"], values, indices, p["W_dec"], p["b_dec"], None, None, "cpu")
        decoded = ops.sparse_decode(values, indices, p["W_dec"], None, "cpu")
    assert_received(mode, "topk_encode", torch.bfloat16, ["x", "W_enc", "b_enc", "b_dec"])
    assert_received(mode, "sae_loss", torch.bfloat16, ["x", "values", "W_dec", "b_dec"])
    assert_received(mode, "sparse_decode", torch.bfloat16, ["values", "W_dec"])
    assert values.dtype == x_hat.dtype == decoded.dtype == torch.bfloat16 and sse.dtype == torch.float32
    (sse.sum() + decoded.float().sum()).backward()
    assert all(leaf.grad is not None and leaf.grad.dtype == torch.float32 for leaf in p.values())


def test_the_autocast_dtype_of_the_region_is_used():
    """float16 and bfloat16 regions each get their own dtype (not one fixed at registration)."""
    t = sae_tensors(ROWS, D, N, torch.float32)
    for dtype in LOW:
        with OpOperands() as mode, torch.autocast("cpu", dtype):
            values, _ = topk_encode(t["x"], t["W_enc"], t["b_enc"], K, t["b_dec"])
        assert values.dtype == dtype
        assert_received(mode, "topk_encode", dtype, ["x", "W_enc", "b_enc", "b_dec"])


def test_mixed_input_dtypes_are_accepted_only_under_autocast():
    """bf16 activations with float32 parameters, as an autocast region hands them over; outside
    autocast the usual dtype check names the argument."""
    t = sae_tensors(ROWS, D, N, torch.float32)
    x = t["x"].bfloat16()
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        topk_encode(x, t["W_enc"], t["b_enc"], K, t["b_dec"])
    with torch.autocast("cpu", torch.bfloat16):
        values, indices = topk_encode(x, t["W_enc"], t["b_enc"], K, t["b_dec"])
        loss = sae_loss(x, values, indices, t["W_dec"], t["b_dec"])
    assert values.dtype == loss.x_hat.dtype == torch.bfloat16


def test_outside_autocast_nothing_changes():
    """No autocast (or autocast disabled): the ops receive and return float32, bit for bit what the
    op gives when called directly."""
    t = sae_tensors(ROWS, D, N, torch.float32)
    direct = torch.ops.flashsae.topk_encode(t["x"], t["W_enc"], t["b_enc"], t["b_dec"], K, None, 0, "auto")
    for region in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", torch.bfloat16, enabled=False)):
        with OpOperands() as mode, region:
            values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], K, t["b_dec"])
            loss = sae_loss(t["x"], values, indices, t["W_dec"], t["b_dec"])
        assert_received(mode, "topk_encode", torch.float32, ["x", "W_enc", "b_enc", "b_dec"])
        assert_received(mode, "sae_loss", torch.float32, ["x", "values", "W_dec", "b_dec"])
        assert torch.equal(values, direct[0]) and torch.equal(indices, direct[1])
        assert loss.x_hat.dtype == torch.float32


def test_float64_is_not_cast():
    """torch's rule: autocast leaves float64 alone."""
    t = sae_tensors(ROWS, D, N, torch.float64)
    with OpOperands() as mode, torch.autocast("cpu", torch.bfloat16):
        values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], K, t["b_dec"])
        x_hat = sparse_decode(values, indices, t["W_dec"], t["b_dec"])
    assert values.dtype == x_hat.dtype == torch.float64
    assert_received(mode, "topk_encode", torch.float64, ["x", "W_enc", "b_enc", "b_dec"])


def test_backward_inside_the_region_matches_backward_outside():
    """The backward ops cast nothing and run with autocast off: calling backward inside the region
    gives the gradients of a backward outside it."""
    t = sae_tensors(ROWS, D, N, torch.float32)
    grads = []
    for inside in (False, True):
        sae = TopKSAE(D, N, K, backend="torch")
        sae.load_state_dict({k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
        with torch.autocast("cpu", torch.bfloat16):
            out = sae(t["x"], dead_mask=torch.arange(N) % 3 == 0)
            if inside:
                out.loss.backward()
        if not inside:
            out.loss.backward()
        grads.append({name: q.grad for name, q in sae.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"d{name}"


def test_row_sparse_gradients_survive_the_cast():
    """A parameter opted into row-sparse gradients keeps them under autocast: its collector receives
    the touched rows in the parameter's dtype, equal to the rows of the dense gradient, and no dense
    gradient is made."""
    t = sae_tensors(ROWS, D, N, torch.float32)
    dead = torch.arange(N) % 3 == 0
    dense = TopKSAE(D, N, K)
    dense.load_state_dict({k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
    sparse = TopKSAE(D, N, K)
    sparse.load_state_dict(dense.state_dict())
    collectors = {name: _row_grads.collect_row_grads(getattr(sparse, name)) for name in ("W_enc", "W_dec")}
    for sae in (dense, sparse):
        with torch.autocast("cpu", torch.bfloat16):
            out = sae(t["x"], dead_mask=dead)
        out.loss.backward()
    for name, collector in collectors.items():
        assert getattr(sparse, name).grad is None, f"{name}: a dense gradient was made"
        rows, grads = collector.coalesced()
        assert rows.numel() > 0 and grads.dtype == torch.float32
        full = getattr(dense, name).grad
        torch.testing.assert_close(grads, full[rows], msg=f"rows of d{name}")
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[rows] = False
        assert not full[untouched].any(), f"d{name}: a row outside the collected ones has a gradient"


# fake-tensor conversion reads .grad of the autocast kernel's cast copies (non-leaf tensors) through
# torch's meta_utils.safe_grad, which hides this warning itself unless warnings are errors (pytest here)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("op_and_args", ["topk_encode", "sparse_decode", "sae_loss"])
def test_opcheck_under_autocast(op_and_args):
    t = {k: v.requires_grad_() for k, v in sae_tensors(9, 12, 70, torch.float32).items()}
    values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], 5, t["b_dec"])
    values = values.detach().requires_grad_()
    ops = torch.ops.flashsae
    args = {
        "topk_encode": (ops.topk_encode.default, (t["x"], t["W_enc"], t["b_enc"], t["b_dec"], 5, None, 0, "cpu")),
        "sparse_decode": (ops.sparse_decode.default, (values, indices, t["W_dec"], t["b_dec"], "cpu")),
        "sae_loss": (ops.sae_loss.default, (t["x"], values, indices, t["W_dec"], t["b_dec"], None, None, "cpu")),
    }
    op, op_args = args[op_and_args]
    with torch.autocast("cpu", torch.bfloat16):
        opcheck(op, op_args)


def autocast_training_loss(model: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x, dead_mask=dead_mask)
    return out.fvu + out.auxk_loss / 32


class GraphOperands:
    """An aot_eager-like torch.compile backend that records, for every flashsae op in the forward and
    backward graphs it is handed, the dtypes of its floating tensor inputs (the graph's own metadata:
    what the compiled op receives)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, torch.dtype]]] = []

    def _compiler(self, gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "flashsae":
                floats = {}
                for arg, value in zip(node.target._schema.arguments, node.args, strict=False):
                    meta = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
                    if isinstance(meta, torch.Tensor) and meta.is_floating_point():
                        floats[arg.name] = meta.dtype
                self.calls.append((node.target._schema.name.removeprefix("flashsae::"), floats))
        return make_boxed_func(gm.forward)

    def backend(self):
        return aot_autograd(fw_compiler=self._compiler, bw_compiler=self._compiler)

    dtypes = OpOperands.dtypes


@pytest.mark.compile
@pytest.mark.parametrize("compile_backend", ["recorded", "inductor"])
def test_compiled_autocast_training_step_matches_eager(compile_backend):
    """torch.compile(fullgraph=True) of an autocast TopKSAE step: the compiled ops receive bf16
    operands, and loss and float32 gradients equal eager autocast's."""
    torch._dynamo.reset()
    eager = TopKSAE(32, 256, 8, backend="cpu")
    compiled_model = TopKSAE(32, 256, 8, backend="cpu")
    compiled_model.load_state_dict(eager.state_dict())
    x = torch.randn(2, 48, 32)
    dead = torch.rand(256) < 0.2
    recorder = GraphOperands()
    backend = recorder.backend() if compile_backend == "recorded" else compile_backend
    step = torch.compile(autocast_training_loss, fullgraph=True, backend=backend)
    loss = step(compiled_model, x, dead)
    loss.backward()
    if compile_backend == "recorded":
        assert_received(recorder, "topk_encode", torch.bfloat16, ["x", "W_enc", "b_enc", "b_dec"])
        assert_received(recorder, "sae_loss", torch.bfloat16, ["x", "values", "W_dec", "b_dec", "aux_values"])
        assert_received(recorder, "topk_encode_backward", torch.bfloat16, ["d_values", "x", "W_enc", "b_dec"])
        assert_received(recorder, "sae_loss_backward", torch.bfloat16, ["x", "values", "W_dec", "b_dec"])
    reference = autocast_training_loss(eager, x, dead)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, msg=f"grad of {name}")


def test_autocast_bar_script_runs_at_a_tiny_size(capsys):
    """benchmarks/autocast_bar.py (the bar's measurement, run by hand) still runs: its checks pass and it
    reports both providers and their ratio. No timing is asserted."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "autocast_bar.py"
    spec = importlib.util.spec_from_file_location("autocast_bar", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--d", "16", "--n", "96", "--k", "4", "--batch", "32", "--steps", "2", "--warmup", "1",
                          "--auxk"])  # fmt: skip
    assert set(result["median_ms"]) == {"torch_dense", "flashsae"} and result["ratio"] > 0
    assert "speed ratio" in capsys.readouterr().out


def test_large_parameter_gradients_land_in_recycled_storage(monkeypatch):
    """The backward of the cast of a large CPU parameter (>= RECYCLE_MIN_BYTES) writes its float32
    gradient into storage reused step after step, with the values autograd's own cast backward gives."""
    from flashsae.ops import _autocast

    def grads_of_two_steps():
        torch.manual_seed(0)
        sae = TopKSAE(64, 4096, 8)  # W_enc, W_dec: 1 MiB each in float32
        x = torch.randn(96, 64)
        steps = []
        for _ in range(2):
            with torch.autocast("cpu", torch.bfloat16):
                out = sae(x)
            out.loss.backward()
            steps.append({name: (p.grad.clone(), p.grad.dtype, p.grad.data_ptr()) for name, p in sae.named_parameters()})
            sae.zero_grad(set_to_none=True)
        return steps

    recycled = grads_of_two_steps()
    monkeypatch.setattr(_autocast, "_eager_tensor", lambda t: False)  # autograd's own cast backward
    plain = grads_of_two_steps()
    for step_recycled, step_plain in zip(recycled, plain, strict=True):
        for name, (grad, dtype, _) in step_recycled.items():
            assert dtype == torch.float32
            torch.testing.assert_close(grad, step_plain[name][0], rtol=0, atol=0, msg=name)
    for name in ("W_enc", "W_dec"):
        assert recycled[0][name][2] == recycled[1][name][2], f"{name}: the second step's gradient is a fresh block"
