"""sparse_adam_: the fused row-sparse Adam step against torch.optim.Adam and the float64 reference.

The claims under test (ops/sparse_adam.py derives them):
- every row touched at every step: the op is dense Adam;
- rows with zero gradient: at a row's next touch, and for every row after a flush, parameter and
  both moments equal dense Adam's, including gaps longer than the replay horizon;
- horizon=0: the moments still equal dense Adam's (exact decay), the parameter skips the drift;
- untouched rows are not written; every backend matches the reference in every storage option.
"""

import importlib

import pytest
import torch
from torch.library import opcheck

from flashsae import _backend
from flashsae.ops.sparse_adam import catch_up_horizon, sparse_adam_, sparse_adam_reference
from helpers import RTOL, assert_close

sparse_adam_module = importlib.import_module("flashsae.ops.sparse_adam")

TRITON = _backend.triton_installed() and (_backend.triton_interpreting() or torch.cuda.is_available())
BACKENDS = ["cpu", "torch", *(["triton"] if TRITON else [])]
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
#: Dense Adam and the replay round differently (torch's vectorized lerp uses an FMA), so agreement is
#: to rounding: a few units in the last place of the values, relative to their largest magnitude.
DENSE_RTOL = {torch.float64: 1e-13, torch.float32: 1e-6}


def schedule_for(lrs: list[float]) -> torch.Tensor:
    """Rows j = 1..T: (lr_j / (1 - beta1^j), sqrt(1 - beta2^j)), as torch's Adam computes them."""
    table = torch.zeros(len(lrs) + 1, 2, dtype=torch.float64)
    for j, lr in enumerate(lrs, start=1):
        table[j, 0] = lr / (1 - BETA1**j)
        table[j, 1] = (1 - BETA2**j) ** 0.5
    return table


class SparseState:
    """One [n, d] parameter updated by sparse_adam_ (or the reference)."""

    def __init__(self, param: torch.Tensor, state_dtype=None, master=False):
        self.p = param.clone()
        self.m = torch.zeros_like(param, dtype=state_dtype or param.dtype)
        self.v = torch.zeros_like(self.m)
        self.last = torch.zeros(param.shape[0], dtype=torch.int64)
        self.master = param.float().clone() if master else None

    def step(self, backend, rows, grads, step, schedule, horizon=None):
        args = (self.p, self.m, self.v, self.last, rows, grads)
        kwargs = {"step": step, "schedule": schedule, "beta1": BETA1, "beta2": BETA2, "eps": EPS, "master": self.master}
        if backend == "reference":
            default = catch_up_horizon(BETA1, BETA2, self.p.dtype)
            sparse_adam_reference(*args, horizon=default if horizon is None else horizon, **kwargs)
        else:
            sparse_adam_(*args, horizon=horizon, backend=backend, **kwargs)


def dense_adam(param: torch.Tensor) -> tuple[torch.nn.Parameter, torch.optim.Adam]:
    dense = torch.nn.Parameter(param.clone())
    return dense, torch.optim.Adam([dense], lr=1.0, betas=(BETA1, BETA2), eps=EPS, foreach=False)


def assert_matches_dense(sparse: SparseState, dense, optimizer, rows, dtype, what):
    state = optimizer.state[dense]
    for name, mine, theirs in (
        ("param", sparse.p, dense.detach()),
        ("exp_avg", sparse.m, state["exp_avg"]),
        ("exp_avg_sq", sparse.v, state["exp_avg_sq"]),
    ):
        a, b = mine[rows].double(), theirs[rows].double()
        scale = max(b.abs().max().item(), 1e-30)
        err = (a - b).abs().max().item()
        assert err <= DENSE_RTOL[dtype] * scale, f"{what}: {name} differs from dense Adam by {err:.3e} ({scale:.3e})"


def run_against_dense(backend, dtype, touches, n=40, d=13, horizon=None, flush=True):
    """Steps t = 1..T where touches(t, n) gives the rows with a gradient; rows with a zero gradient
    get none (and some touched rows get an exactly zero one). Compares after every step (touched
    rows) and after a final flush (all rows)."""
    steps = touches.steps
    lrs = [1e-2 * (0.3 + 1.7 * (t % 7) / 7) for t in range(1, steps + 1)]  # a varying lr
    schedule = schedule_for(lrs)
    start = torch.randn(n, d, dtype=torch.float64).to(dtype)
    sparse = SparseState(start)
    dense, optimizer = dense_adam(start)
    for t in range(1, steps + 1):
        rows = touches(t, n)
        grad = torch.zeros(n, d, dtype=dtype)
        grad[rows] = torch.randn(rows.numel(), d, dtype=torch.float64).to(dtype)
        if rows.numel() > 2:
            grad[rows[1]] = 0  # touched with an exactly zero gradient: a zero-gradient step of dense Adam
        optimizer.param_groups[0]["lr"] = lrs[t - 1]
        dense.grad = grad.clone()
        optimizer.step()
        sparse.step(backend, rows, grad[rows].contiguous(), t, schedule, horizon)
        assert (sparse.last[rows] == t).all()
        if horizon != 0:
            assert_matches_dense(sparse, dense, optimizer, rows, dtype, f"step {t}, touched rows")
    if flush:
        everything = torch.arange(n)
        sparse.step(backend, everything, None, steps, schedule, horizon)
        assert (sparse.last == steps).all()
    return sparse, dense, optimizer


class RandomTouches:
    """Each row fires with probability `rate`; row 0 always, row 1 never, row 2 only at the first
    and last step (a gap of steps - 1)."""

    def __init__(self, steps, rate=0.3):
        self.steps, self.rate = steps, rate

    def __call__(self, t, n):
        mask = torch.rand(n) < self.rate
        mask[0], mask[1], mask[2] = True, False, t in (1, self.steps)
        return mask.nonzero().squeeze(1)


class EveryRow:
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, t, n):
        return torch.arange(n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_every_row_every_step_is_dense_adam(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    run_against_dense(backend, dtype, EveryRow(6), flush=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_zero_gradient_rows_catch_up_to_dense_adam(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    sparse, dense, optimizer = run_against_dense(backend, dtype, RandomTouches(24))
    assert_matches_dense(sparse, dense, optimizer, torch.arange(40), dtype, "after the flush, every row")
    # rows 1 (never touched) and 2 (touched at steps 1 and 24) take the two extremes
    assert torch.equal(sparse.p[1], dense.detach()[1]), "a never-touched row is dense Adam's too (unchanged)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaps_longer_than_the_horizon(backend):
    # float32: horizon 261. One row fires at steps 1 and 300 (gap 299): replaying 261 steps and
    # decaying the moments over the rest lands where 299 zero-gradient dense steps do.
    horizon = catch_up_horizon(BETA1, BETA2, torch.float32)
    assert horizon == 261

    class Sparse:
        steps = 300

        def __call__(self, t, n):
            return torch.tensor([0, 3]) if t in (1, 300) else torch.tensor([0])

    sparse, dense, optimizer = run_against_dense(backend, torch.float32, Sparse(), n=5, d=9)
    assert_matches_dense(sparse, dense, optimizer, torch.arange(5), torch.float32, "after a 299-step gap")


def test_horizon_values_and_limits():
    assert catch_up_horizon(0.9, 0.999, torch.float64) == 461
    assert catch_up_horizon(0.9, 0.999, torch.bfloat16) == catch_up_horizon(0.9, 0.999, torch.float32)
    assert catch_up_horizon(0.0, 0.999, torch.float32) == 1
    assert catch_up_horizon(0.5, 0.999, torch.float32) < 40  # faster decay, shorter replay
    with pytest.raises(ValueError, match=r"beta1\^2 < beta2"):
        catch_up_horizon(0.99, 0.95, torch.float32)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_horizon_zero_keeps_exact_moments_without_drift(backend):
    sparse, dense, optimizer = run_against_dense(backend, torch.float32, RandomTouches(12), horizon=0)
    state = optimizer.state[dense]
    everything = torch.arange(40)
    for mine, theirs in ((sparse.m, state["exp_avg"]), (sparse.v, state["exp_avg_sq"])):
        assert_close(mine[everything], theirs[everything].double(), torch.float32, "moments")
    # the parameter misses the momentum drift of skipped steps: different, but only on rows that skipped
    assert torch.equal(sparse.p[1], dense.detach()[1])
    assert not torch.allclose(sparse.p, dense.detach(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- storage options, backends

OPTIONS = [
    # (param dtype, moments dtype, master copy)
    (torch.float64, None, False),
    (torch.float32, None, False),
    (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, None, False),
    (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, True),
]
OPTION_IDS = ["f64", "f32", "f32-bf16state", "bf16", "bf16-master", "f16-master", "bf16-bf16state-master"]


@pytest.mark.parametrize(("dtype", "state_dtype", "master"), OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_the_reference(backend, dtype, state_dtype, master):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    n, d, steps = 37, 97, 5
    schedule = schedule_for([1e-3 * (1 + t) for t in range(steps)])
    start = (torch.randn(n, d, dtype=torch.float64) * 0.1).to(dtype)
    mine, reference = SparseState(start, state_dtype, master), SparseState(start, state_dtype, master)
    for t in range(1, steps + 1):
        rows = (torch.rand(n) < 0.4).nonzero().squeeze(1) if t > 1 else torch.arange(n)
        grads = torch.randn(rows.numel(), d, dtype=torch.float64).to(dtype)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[rows] = False
        before = (mine.p[untouched].clone(), mine.m[untouched].clone())
        mine.step(backend, rows, grads, t, schedule)
        reference.step("reference", rows, grads, t, schedule)
        assert torch.equal(mine.p[untouched], before[0]) and torch.equal(mine.m[untouched], before[1]), (
            "an untouched row was written"
        )
    flush_rows = torch.arange(0, n, 3)
    mine.step(backend, flush_rows, None, steps, schedule)
    reference.step("reference", flush_rows, None, steps, schedule)
    # the least precise storage sets the tolerance; 16-bit moments get two bf16 units: a rounding that
    # flips on a last-bit float32 difference feeds back into the following steps
    tolerance = max(RTOL[dtype], RTOL[state_dtype or dtype] * (2 if state_dtype == torch.bfloat16 else 1))
    pairs = (("param", mine.p, reference.p), ("exp_avg", mine.m, reference.m), ("exp_avg_sq", mine.v, reference.v))
    for name, a, b in pairs:
        a, b = a.double(), b.double()
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= tolerance * scale, f"{backend} {name}: max error {err:.3e} > {tolerance:.0e} x {scale:.3e}"
    if master:
        assert_close(mine.master, reference.master.double(), torch.float32, "master")
        assert torch.equal(mine.p, mine.master.to(dtype)), "param = the master copy, rounded"
    assert torch.equal(mine.last, reference.last)


def test_master_copy_keeps_updates_smaller_than_a_bf16_ulp():
    # lr 1e-4 on weights of magnitude 1: each update is below bfloat16's resolution (2^-8), so a plain
    # bf16 parameter never moves, while the float32 master accumulates them (and so does the bf16 view
    # once the sum passes half an ulp).
    n, d, steps = 4, 8, 40
    schedule = schedule_for([1e-4] * steps)
    start = torch.ones(n, d, dtype=torch.bfloat16)
    plain, mastered = SparseState(start), SparseState(start, torch.float32, master=True)
    rows = torch.arange(n)
    for t in range(1, steps + 1):
        grads = torch.ones(n, d, dtype=torch.bfloat16)
        plain.step("cpu", rows, grads, t, schedule)
        mastered.step("cpu", rows, grads, t, schedule)
    assert torch.equal(plain.p, start)
    assert torch.allclose(mastered.master, torch.full((n, d), 1 - 40e-4), atol=1e-6)
    assert (mastered.p < 1).all()


# ------------------------------------------------------------------------------------- bad inputs


def good_args():
    n, d = 10, 4
    param = torch.randn(n, d)
    return {
        "param": param,
        "exp_avg": torch.zeros(n, d),
        "exp_avg_sq": torch.zeros(n, d),
        "last_step": torch.zeros(n, dtype=torch.int64),
        "rows": torch.tensor([1, 4, 7]),
        "grads": torch.randn(3, d),
        "step": 1,
        "schedule": schedule_for([1e-3]),
    }


BAD = [
    ({"rows": torch.tensor([4, 1, 7])}, ValueError, r"rows: expected row ids sorted ascending without repeats"),
    ({"rows": torch.tensor([1, 4, 4])}, ValueError, r"rows: expected row ids sorted ascending without repeats"),
    ({"rows": torch.tensor([1, 4, 10])}, ValueError, r"rows: expected row ids in \[0, 10\)"),
    ({"rows": torch.tensor([1, 4, 7], dtype=torch.int32)}, TypeError, r"rows: expected dtype int64"),
    ({"grads": torch.randn(2, 4)}, ValueError, r"grads: expected shape \[m=3, d=4\]"),
    ({"grads": torch.randn(3, 4, dtype=torch.float64)}, TypeError, r"grads: expected dtype float32"),
    ({"grads": torch.tensor([[float("nan")] * 4] * 3)}, ValueError, r"grads: contains 12 NaN or Inf"),
    ({"exp_avg": torch.zeros(10, 4, dtype=torch.float16)}, TypeError, r"exp_avg: expected dtype float32 or bfloat16"),
    ({"exp_avg_sq": torch.zeros(10, 4, dtype=torch.bfloat16)}, TypeError, r"exp_avg_sq: expected dtype float32"),
    ({"last_step": torch.zeros(10, dtype=torch.int32)}, TypeError, r"last_step: expected dtype int64"),
    ({"last_step": torch.ones(10, dtype=torch.int64)}, ValueError, r"last_step: some row was already updated at"),
    ({"step": 0}, ValueError, r"step: expected an int >= 1"),
    ({"step": 2}, ValueError, r"schedule: expected at least step \+ 1 = 3 rows, got 2"),
    ({"schedule": schedule_for([1e-3]).float()}, TypeError, r"schedule: expected dtype float64"),
    ({"beta1": 1.0}, ValueError, r"beta1: expected a number in \[0.0, 1.0\)"),
    ({"eps": 0.0}, ValueError, r"eps: expected a number in \(0.0, inf\)"),
    ({"horizon": -1}, ValueError, r"horizon: expected an int >= 0"),
    ({"master": torch.zeros(10, 4)}, ValueError, r"master: only bfloat16/float16 parameters"),
    ({"param": torch.randn(10, 4).t()}, ValueError, r"param: expected a contiguous tensor"),
]


@pytest.mark.parametrize(("change", "error", "pattern"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_inputs_are_named(change, error, pattern):
    args = good_args() | change
    positional = [args.pop(name) for name in ("param", "exp_avg", "exp_avg_sq", "last_step", "rows", "grads")]
    with pytest.raises(error, match=pattern):
        sparse_adam_(*positional, **args)


def test_the_cpu_kernel_checks_rows_itself():
    # with value checks off in Python, the C++ boundary still refuses rows that would race
    from flashsae._native import _C, addr, dtype_code

    args = good_args()
    rows = torch.tensor([4, 4, 7])
    p, m, v, last, schedule = args["param"], args["exp_avg"], args["exp_avg_sq"], args["last_step"], args["schedule"]
    with pytest.raises(ValueError, match=r"rows: row 4 at position 1 is out of range or out of order"):
        _C.sparse_adam(
            param=addr(p), master=0, exp_avg=addr(m), exp_avg_sq=addr(v), last_step=addr(last), rows=addr(rows),
            row_count=3, grads=addr(args["grads"]), param_rows=10, d=4, step=1, schedule=addr(schedule),
            schedule_rows=2, beta1=BETA1, beta2=BETA2, eps=EPS, horizon=5, param_dtype=dtype_code(p),
            state_dtype=dtype_code(m),
        )  # fmt: skip


def test_empty_rows_are_a_no_op():
    args = good_args()
    before = args["param"].clone()
    sparse_adam_(
        args["param"], args["exp_avg"], args["exp_avg_sq"], args["last_step"], torch.empty(0, dtype=torch.int64),
        None, step=1, schedule=args["schedule"],
    )  # fmt: skip
    assert torch.equal(args["param"], before)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    args = good_args()
    opcheck(
        torch.ops.flashsae.sparse_adam.default,
        (
            args["param"], args["exp_avg"], args["exp_avg_sq"], args["last_step"], args["rows"], args["grads"], 1,
            args["schedule"], BETA1, BETA2, EPS, 10, None, backend,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip
