"""sparse_adam_rowwise_: sparse Adam with a row-wise second moment, against a dense torch version of the
same optimizer and the float64 reference.

The claims under test (ops/sparse_adam_rowwise.py derives them):
- every row touched at every step: the op is the dense row-wise Adam below (m elementwise,
  v_r = EMA of mean(g^2) over the row), with a float first moment or none (beta1 = 0);
- rows with zero gradient: at a row's next touch, and for every row after a flush, weights and
  moments equal the dense optimizer's, including gaps longer than the replay horizon;
- the int8 first moment: codes round-trip within the companded code's bound, the catch-up moves no
  code (a decay is a scale change), and every backend matches the reference in every storage option;
- untouched rows are not written; bad inputs are refused with the argument's name.
"""

import pytest
import torch
from torch.library import opcheck

from flashsae import _backend
from flashsae.ops.sparse_adam import _lerp, catch_up_horizon
from flashsae.ops.sparse_adam_rowwise import (
    decode_first_moment,
    encode_first_moment,
    sparse_adam_rowwise_,
    sparse_adam_rowwise_reference,
)
from helpers import RTOL
from test_sparse_adam import EPS, EveryRow, RandomTouches, schedule_for

TRITON = _backend.triton_installed() and (_backend.triton_interpreting() or torch.cuda.is_available())
BACKENDS = ["cpu", "torch", *(["triton"] if TRITON else [])]
BETA2 = 0.999
#: The catch-up sums the drift as m_s times a scalar where the dense loop rounds every step: agreement
#: is to a few units in the last place, relative to the largest magnitude.
DENSE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6}


class RowwiseState:
    """One [n, d] parameter and its row-wise Adam state (first: "float", "int8" or None)."""

    def __init__(self, param, first="float", first_dtype=None, master=False):
        n, d = param.shape
        self.p = param.clone()
        self.first = first
        self.m = None
        self.scale = None
        if first == "float":
            self.m = torch.zeros(n, d, dtype=first_dtype or param.dtype)
        elif first == "int8":
            self.m = torch.zeros(n, d, dtype=torch.int8)
            self.scale = torch.zeros(n)
        self.v = torch.zeros(n, dtype=torch.float64 if param.dtype == torch.float64 else torch.float32)
        self.last = torch.zeros(n, dtype=torch.int64)
        self.master = param.float().clone() if master else None
        self.beta1 = 0.0 if first is None else 0.9

    def first_moment(self) -> torch.Tensor:
        if self.first == "int8":
            return decode_first_moment(self.m, self.scale, torch.float64)
        return torch.zeros_like(self.p, dtype=torch.float64) if self.m is None else self.m.double()

    def step(self, backend, rows, grads, step, schedule, horizon=None):
        args = (self.p, self.m, self.scale, self.v, self.last, rows, grads)
        kwargs = {"step": step, "schedule": schedule, "beta1": self.beta1, "beta2": BETA2, "eps": EPS}
        kwargs["master"] = self.master
        if backend == "reference":
            default = catch_up_horizon(self.beta1, BETA2, self.p.dtype)
            sparse_adam_rowwise_reference(*args, horizon=default if horizon is None else horizon, **kwargs)
        else:
            sparse_adam_rowwise_(*args, horizon=horizon, backend=backend, **kwargs)


class DenseRowwiseAdam:
    """The dense optimizer the op is a sparse form of: every row stepped every step."""

    def __init__(self, param, beta1):
        self.p = param.clone()
        acc = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.m = torch.zeros_like(param, dtype=acc)
        self.v = torch.zeros(param.shape[0], dtype=acc)
        self.beta1 = beta1

    def step(self, grad, step, schedule):
        acc = self.m.dtype
        g = grad.to(acc)
        self.m = _lerp(self.m, g, 1.0 - self.beta1)
        self.v = self.v * BETA2 + (1 - BETA2) * (g * g).sum(dim=1) / g.shape[1]
        step_size, bias_sqrt = float(schedule[step, 0]), float(schedule[step, 1])
        factor = step_size / (self.v.sqrt() / bias_sqrt + EPS)
        self.p = (self.p.to(acc) - factor.unsqueeze(1) * self.m).to(self.p.dtype)


def assert_matches_dense(sparse: RowwiseState, dense: DenseRowwiseAdam, rows, dtype, what):
    for name, mine, theirs in (
        ("param", sparse.p.double(), dense.p.double()),
        ("exp_avg", sparse.first_moment(), dense.m.double()),
        ("exp_avg_sq", sparse.v.double(), dense.v.double()),
    ):
        if name == "exp_avg" and sparse.first is None:
            continue  # beta1 = 0 keeps no first moment (the dense one is the last gradient)
        a, b = mine[rows], theirs[rows]
        scale = max(b.abs().max().item(), 1e-30)
        err = (a - b).abs().max().item()
        assert err <= DENSE_RTOL[dtype] * scale, f"{what}: {name} differs from the dense optimizer by {err:.3e}"


def run_against_dense(backend, dtype, touches, first="float", n=40, d=13):
    steps = touches.steps
    lrs = [1e-2 * (0.3 + 1.7 * (t % 7) / 7) for t in range(1, steps + 1)]
    schedule = schedule_for(lrs)
    start = torch.randn(n, d, dtype=torch.float64).to(dtype)
    sparse = RowwiseState(start, first)
    dense = DenseRowwiseAdam(start, sparse.beta1)
    for t in range(1, steps + 1):
        rows = touches(t, n)
        grad = torch.zeros(n, d, dtype=dtype)
        grad[rows] = torch.randn(rows.numel(), d, dtype=torch.float64).to(dtype)
        if rows.numel() > 2:
            grad[rows[1]] = 0  # touched with an exactly zero gradient
        dense.step(grad, t, schedule)
        sparse.step(backend, rows, grad[rows].contiguous(), t, schedule)
        assert (sparse.last[rows] == t).all()
        assert_matches_dense(sparse, dense, rows, dtype, f"step {t}, touched rows")
    sparse.step(backend, torch.arange(n), None, steps, schedule)
    assert (sparse.last == steps).all()
    return sparse, dense


@pytest.mark.parametrize("first", ["float", None], ids=["float-m", "no-m"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_every_row_every_step_is_the_dense_optimizer(backend, dtype, first):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    run_against_dense(backend, dtype, EveryRow(6), first)


@pytest.mark.parametrize("first", ["float", None], ids=["float-m", "no-m"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_zero_gradient_rows_catch_up_to_the_dense_optimizer(backend, dtype, first):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    sparse, dense = run_against_dense(backend, dtype, RandomTouches(24), first)
    assert_matches_dense(sparse, dense, torch.arange(40), dtype, "after the flush, every row")
    assert torch.equal(sparse.p[1], dense.p[1]), "a never-touched row is unchanged in both"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaps_longer_than_the_horizon(backend):
    class Sparse:  # row 3 fires at steps 1 and 300: 261 replayed steps, the moments decay over 299
        steps = 300

        def __call__(self, t, n):
            return torch.tensor([0, 3]) if t in (1, 300) else torch.tensor([0])

    sparse, dense = run_against_dense(backend, torch.float32, Sparse(), n=5, d=9)
    assert_matches_dense(sparse, dense, torch.arange(5), torch.float32, "after a 299-step gap")


# ------------------------------------------------------------------------------------- int8 codes


def test_int8_codes_round_trip_within_the_companded_bound():
    m = torch.randn(64, 257, dtype=torch.float64) * torch.logspace(-6, 2, 64, dtype=torch.float64).unsqueeze(1)
    m[3] = 0  # an all-zero row: scale 0, codes 0
    codes, scale = encode_first_moment(m)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    assert torch.equal(codes[3], torch.zeros_like(codes[3])) and scale[3] == 0
    assert (codes.abs().amax(dim=1)[scale > 0] == 127).all(), "the row max codes to +-127"
    decoded = decode_first_moment(codes, scale, torch.float64)
    # |c - 127 sqrt(x)| <= 1/2 with x = |m| / scale gives |decoded - m| <= scale (127 sqrt(x) + 1/4) / 127^2
    x = (m.abs() / scale.double().clamp_min(1e-300).unsqueeze(1)).clamp(max=1)
    bound = scale.double().unsqueeze(1) * (127 * x.sqrt() + 0.25) / 127**2
    assert ((decoded - m).abs() <= bound * (1 + 1e-6) + 1e-45).all()
    assert torch.equal(torch.sign(decoded), torch.sign(m) * (codes != 0))
    # small entries keep finer steps than a linear code would: the smallest non-zero step is scale / 127^2
    row = torch.tensor([[1.0, 1e-3, -2e-4]], dtype=torch.float64)
    assert (encode_first_moment(row)[0][0].abs() > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_catch_up_moves_no_code(backend):
    # a flush decays m by beta1^gap: the codes stay, the scale shrinks by beta1^gap
    n, d, steps = 6, 40, 9
    schedule = schedule_for([1e-3] * steps)
    state = RowwiseState(torch.randn(n, d), "int8")
    state.step(backend, torch.arange(n), torch.randn(n, d), 1, schedule)
    codes, scale = state.m.clone(), state.scale.clone()
    state.step(backend, torch.arange(n), None, steps, schedule)
    assert torch.equal(state.m, codes)
    torch.testing.assert_close(state.scale, scale * 0.9 ** (steps - 1), rtol=2e-6, atol=0)


# ------------------------------------------------------------------------- storage options, backends

OPTIONS = [
    # (param dtype, first moment, its float dtype, master copy)
    (torch.float64, "float", None, False),
    (torch.float32, "float", None, False),
    (torch.float32, "float", torch.bfloat16, False),
    (torch.float32, "int8", None, False),
    (torch.float32, None, None, False),
    (torch.bfloat16, "int8", None, False),
    (torch.bfloat16, "int8", None, True),
    (torch.float16, "int8", None, True),
    (torch.bfloat16, "float", torch.bfloat16, True),
]
OPTION_IDS = ["f64", "f32", "f32-bf16m", "f32-int8m", "f32-no-m", "bf16-int8m", "bf16-int8m-master",
              "f16-int8m-master", "bf16-bf16m-master"]  # fmt: skip


@pytest.mark.parametrize(("dtype", "first", "first_dtype", "master"), OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_the_reference(backend, dtype, first, first_dtype, master):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    n, d, steps = 37, 97, 5
    schedule = schedule_for([1e-3 * (1 + t) for t in range(steps)])
    start = (torch.randn(n, d, dtype=torch.float64) * 0.1).to(dtype)
    mine, reference = (RowwiseState(start, first, first_dtype, master) for _ in range(2))
    for t in range(1, steps + 1):
        rows = (torch.rand(n) < 0.4).nonzero().squeeze(1) if t > 1 else torch.arange(n)
        grads = torch.randn(rows.numel(), d, dtype=torch.float64).to(dtype)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[rows] = False
        before = (mine.p[untouched].clone(), mine.first_moment()[untouched], mine.v[untouched].clone())
        mine.step(backend, rows, grads, t, schedule)
        reference.step("reference", rows, grads, t, schedule)
        after = (mine.p[untouched], mine.first_moment()[untouched], mine.v[untouched])
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "an untouched row was written"
    flush_rows = torch.arange(0, n, 3)
    mine.step(backend, flush_rows, None, steps, schedule)
    reference.step("reference", flush_rows, None, steps, schedule)
    # the least precise storage sets the tolerance; an int8 code may flip by one step on a last-bit
    # difference (1/127 of the row max at most: 2 (127 sqrt(x)) + 1 over 127^2)
    tolerance = max(RTOL[dtype], 2 * RTOL[first_dtype or dtype] if first_dtype else 0, 1.6e-2 if first == "int8" else 0)
    pairs = (("param", mine.p, reference.p), ("exp_avg", mine.first_moment(), reference.first_moment()),
             ("exp_avg_sq", mine.v, reference.v))  # fmt: skip
    for name, a, b in pairs:
        a, b = a.double(), b.double()
        err, scale = (a - b).abs().max().item(), max(b.abs().max().item(), 1e-30)
        limit = tolerance if name == "exp_avg" else max(RTOL[dtype], RTOL[first_dtype or dtype])
        assert err <= limit * scale, f"{backend} {name}: max error {err:.3e} > {limit:.0e} x {scale:.3e}"
    if first == "int8":
        assert (mine.m != reference.m).float().mean() < 0.01, "codes differ from the reference's in > 1%"
    if master:
        assert torch.equal(mine.p, mine.master.to(dtype)), "param = the master copy, rounded"
    assert torch.equal(mine.last, reference.last)


# ------------------------------------------------------------------------------------- bad inputs


def good_args():
    n, d = 10, 4
    return {
        "param": torch.randn(n, d),
        "exp_avg": torch.zeros(n, d, dtype=torch.int8),
        "exp_avg_scale": torch.zeros(n),
        "exp_avg_sq": torch.zeros(n),
        "last_step": torch.zeros(n, dtype=torch.int64),
        "rows": torch.tensor([1, 4, 7]),
        "grads": torch.randn(3, d),
        "step": 1,
        "schedule": schedule_for([1e-3]),
    }


POSITIONAL = ("param", "exp_avg", "exp_avg_scale", "exp_avg_sq", "last_step", "rows", "grads")
BAD = [
    ({"exp_avg": None}, ValueError, r"exp_avg: None \(no first moment\) needs beta1 = 0"),
    ({"exp_avg": torch.zeros(10, 4, dtype=torch.int16)}, TypeError, r"exp_avg: expected dtype .* or int8, got .*int16"),
    ({"exp_avg": torch.zeros(10, 5, dtype=torch.int8)}, ValueError, r"exp_avg: expected shape \[n=10, d=4\]"),
    ({"exp_avg_scale": None}, TypeError, r"exp_avg_scale: expected a torch.Tensor"),
    ({"exp_avg_scale": torch.zeros(9)}, ValueError, r"exp_avg_scale: expected shape \[n=10\]"),
    ({"exp_avg": torch.zeros(10, 4)}, ValueError, r"exp_avg_scale: only int8 exp_avg has row scales"),
    ({"exp_avg_sq": torch.zeros(10, 4)}, ValueError, r"exp_avg_sq: expected shape \[n=10\]"),
    ({"exp_avg_sq": torch.zeros(10, dtype=torch.bfloat16)}, TypeError, r"exp_avg_sq: expected dtype float32"),
    ({"rows": torch.tensor([4, 1, 7])}, ValueError, r"rows: expected row ids sorted ascending without repeats"),
    ({"grads": torch.randn(2, 4)}, ValueError, r"grads: expected shape \[m=3, d=4\]"),
    ({"last_step": torch.ones(10, dtype=torch.int64)}, ValueError, r"last_step: some row was already updated at"),
    ({"step": 2}, ValueError, r"schedule: expected at least step \+ 1 = 3 rows, got 2"),
    ({"master": torch.zeros(10, 4)}, ValueError, r"master: only bfloat16/float16 parameters"),
]


@pytest.mark.parametrize(("change", "error", "pattern"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_inputs_are_named(change, error, pattern):
    args = good_args() | change
    positional = [args.pop(name) for name in POSITIONAL]
    with pytest.raises(error, match=pattern):
        sparse_adam_rowwise_(*positional, **args)


def test_float64_params_take_no_int8_first_moment():
    args = good_args() | {"param": torch.randn(10, 4, dtype=torch.float64), "exp_avg_sq": torch.zeros(10)}
    positional = [args.pop(name) for name in POSITIONAL]
    with pytest.raises(TypeError, match=r"exp_avg: expected dtype float64, got torch.int8"):
        sparse_adam_rowwise_(*positional, **args)


def test_the_cpu_kernel_checks_its_arguments_itself():
    from flashsae._native import _C, addr, dtype_code

    a = good_args()
    p, m, s, v, last, schedule = (a[k] for k in ("param", "exp_avg", "exp_avg_scale", "exp_avg_sq", "last_step",
                                                  "schedule"))  # fmt: skip

    def call(rows, first=2, scale=s, beta1=0.9):
        _C.sparse_adam_rowwise(
            param=addr(p), master=0, exp_avg=addr(m), exp_avg_scale=addr(scale), exp_avg_sq=addr(v),
            last_step=addr(last), rows=addr(rows), row_count=3, grads=addr(a["grads"]), param_rows=10, d=4, step=1,
            schedule=addr(schedule), schedule_rows=2, beta1=beta1, beta2=BETA2, eps=EPS, horizon=5,
            param_dtype=dtype_code(p), first_moment=first, first_moment_dtype=-1,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"rows: row 4 at position 1 is out of range or out of order"):
        call(torch.tensor([4, 4, 7]))
    with pytest.raises(ValueError, match=r"exp_avg_scale: "):
        call(torch.tensor([1, 4, 7]), scale=None)
    with pytest.raises(ValueError, match=r"exp_avg: None \(no first moment\) needs beta1 = 0"):
        call(torch.tensor([1, 4, 7]), first=0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    a = good_args()
    opcheck(
        torch.ops.flashsae.sparse_adam_rowwise.default,
        (*(a[k] for k in POSITIONAL), 1, a["schedule"], 0.9, BETA2, EPS, 10, None, backend),
        test_utils=("test_schema", "test_faketensor"),
    )
