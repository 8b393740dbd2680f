"""sparse_adam_: one fused Adam step over the touched rows of an [n, d] parameter, with exact catch-up.

Dense Adam (torch.optim.Adam, no weight decay) at step j with gradient g_j, per element:

    m_j = m_{j-1} + (1 - b1) (g_j - m_{j-1})          (torch: exp_avg.lerp_(g, 1 - b1))
    v_j = b2 v_{j-1} + (1 - b2) g_j^2
    p_j = p_{j-1} - lr_j / (1 - b1^j) * m_j / (sqrt(v_j) / sqrt(1 - b2^j) + eps)

In an SAE with n >> batch * k, most rows of W_enc / W_dec have g_j = 0 at most steps, yet dense Adam
still reads and writes all four [n, d] arrays every step. This op updates only the rows in ``rows``
(the latents that fired: sorted, unique) and keeps, per row, the step of its last update
(``last_step``). A row last updated at step s and touched again at step t first *catches up* on the
skipped steps j = s+1 .. t-1, at which its gradient was zero. Derivation, with g_j = 0:

    m_j = b1^(j-s) m_s,   v_j = b2^(j-s) v_s                                     (exact)
    p_j = p_{j-1} - lr_j / (1 - b1^j) * m_j / (sqrt(v_j) / sqrt(1 - b2^j) + eps)   (dense Adam moves
          the row by its momentum even with no gradient: "drift")

so catching up = replaying these zero-gradient steps: the moments decay exactly (b^(t-1-s)), and the
parameter drift is the sum of the skipped steps' updates, computed with the same arithmetic as dense
Adam's zero-gradient step (lerp towards 0, then the same denominator). With the per-step scalars
``schedule[j] = (lr_j / (1 - b1^j), sqrt(1 - b2^j))`` kept for every past step (one float64 pair per
step), a row can be replayed whenever it is next touched. Then step t runs with the row's gradient.
Consequences (tested against torch.optim.Adam):

- every row touched at every step (s = t - 1 always): nothing to replay, the op *is* dense Adam;
- a row with zero gradient at some steps ends, at its next touch, exactly where dense Adam puts it
  (parameter and both moments); ``grads=None`` ("flush") replays every given row up to step t with
  no new gradient, so after flushing all rows the whole state equals dense Adam's;
- between touches a row holds its value from the last touch (the drift is applied late, not lost),
  so in a training run the forward of untouched latents sees them without their pending drift.

The drift terms shrink geometrically: |m_j| / sqrt(v_j) falls by r = b1 / sqrt(b2) per skipped step
(0.9005 for Adam's 0.9 / 0.999), while the bias corrections and a warm-up lr grow at most
polynomially. Terms past ``horizon`` skipped steps are below the rounding of the accumulation dtype
(:func:`catch_up_horizon`: the smallest K with r^K K^1.5 <= 2^-p (1 - r); 261 steps for float32 math,
461 for float64), so at most ``horizon`` steps are replayed per touch; the moments still decay over the
whole gap. ``horizon=0`` replays nothing: exact moment decay without drift ("lazy" Adam, cheaper).

Cost per touched row: one pass over its d elements of param, m and v (plus master), and
min(gap, horizon) register-only replay steps; no [n, d] array is swept. Over a run a row's replays add
up to at most the steps that elapsed, so the replay arithmetic never exceeds dense Adam's, and it
needs no memory traffic (dense Adam moves 28 bytes per float32 element per step).

Storage options: parameter float32/float64/bfloat16/float16; moments in the parameter's dtype,
float32 or bfloat16 (math in float32, float64 for float64 parameters); with 16-bit parameters an
optional float32 ``master`` copy [n, d] holds the exact weights (updated on the touched rows, then
rounded into the parameter).

Backends: ``cpu`` (flashsae._C, OpenMP over rows), ``triton`` (flashsae.kernels.sparse_adam),
``torch`` (vectorized over the touched rows); :func:`sparse_adam_reference` is the float64-checkable
definition (a plain loop over rows and skipped steps).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .. import _backend, _checks
from .._checks import check_tensor
from .._native import _C, addr, dtype_code
from . import _common

#: Moment dtypes a parameter of each dtype may use (math in float32, float64 for float64).
STATE_DTYPES = {
    torch.float64: (torch.float64,),
    torch.float32: (torch.float32, torch.bfloat16),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32, torch.bfloat16),
}
#: Parameter dtypes that may keep a float32 master copy.
MASTER_PARAM_DTYPES = (torch.bfloat16, torch.float16)


class AdamStep(NamedTuple):
    """One step of a sparse Adam op besides the parameter and its state tensors, as every backend of
    sparse_adam_ and sparse_adam_rowwise_ takes it (validated; see :func:`sparse_adam_`)."""

    rows: torch.Tensor
    grads: torch.Tensor | None
    step: int
    schedule: torch.Tensor
    beta1: float
    beta2: float
    eps: float
    horizon: int
    master: torch.Tensor | None

    @property
    def upto(self) -> int:
        """The step the rows are caught up to before the gradient step: step - 1 (step for a flush)."""
        return self.step - 1 if self.grads is not None else self.step


@functools.lru_cache(maxsize=64)  # a loop of up to ~460 logs, asked on every row update (25 per CLT step: 4 ms)
def catch_up_horizon(beta1: float, beta2: float, dtype: torch.dtype) -> int:
    """Skipped steps replayed per touch so that the dropped drift terms are below rounding.

    Replayed term i (i steps after the last touch) is at most lr_j |m_s| / (1 - b1) * r^i / (sqrt(b2^i v_s) ...)
    with r = b1 / sqrt(b2); the bias corrections grow at most like sqrt(i) and a linear warm-up lr like
    i, so the tail past K is below 2^-p of the sum when r^K K^1.5 <= 2^-p (1 - r), p = 24 for float32
    math (every dtype but float64) and 53 for float64. Needs b1^2 < b2 (r < 1), true of every
    usual Adam setting (0.9 / 0.999: K = 261 for float32, 461 for float64)."""
    ratio = beta1 / math.sqrt(beta2)
    if not ratio < 1:
        raise ValueError(
            f"beta1, beta2: exact catch-up needs beta1^2 < beta2 so that skipped steps' updates decay, got "
            f"beta1={beta1}, beta2={beta2}; use catch_up='moments'"
        )
    if beta1 == 0:
        return 1
    bits = 53 if dtype == torch.float64 else 24
    bound = math.log(2.0**-bits * (1 - ratio))
    k = 1
    while k * math.log(ratio) + 1.5 * math.log(k) > bound:
        k += 1
    return k


# --------------------------------------------------------------------------------------- reference


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """torch.lerp's two formulas (weight < 0.5: from the start, else from the end)."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


@torch.no_grad()
def sparse_adam_reference(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    last_step: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor | None,
    *,
    step: int,
    schedule: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    horizon: int,
    master: torch.Tensor | None = None,
) -> None:
    """The definition, in place: per row, replay the skipped zero-gradient steps of dense Adam
    (at most ``horizon`` of them with their parameter update; the moments decay over all), then
    apply step ``step`` with the row's gradient (``grads=None``: replay up to ``step`` included, no
    new gradient). Math in float64 for float64 tensors, else float32."""
    acc = _common.acc_dtype(param.dtype)
    upto = step - 1 if grads is not None else step
    weight1 = 1.0 - beta1
    for q, row in enumerate(rows.tolist()):
        weights = master if master is not None else param
        p = weights[row].to(acc)
        m, v = exp_avg[row].to(acc), exp_avg_sq[row].to(acc)
        last = int(last_step[row])
        if last > 0 and upto > last:
            replayed = min(upto - last, horizon)
            for j in range(last + 1, last + 1 + replayed):
                step_size, bias_sqrt = float(schedule[j, 0]), float(schedule[j, 1])
                m = _lerp(m, torch.zeros_like(m), weight1)
                v = v * beta2
                p = p - step_size * (m / (v.sqrt() / bias_sqrt + eps))
            rest = upto - last - replayed
            if rest:
                m = m * beta1**rest
                v = v * beta2**rest
        if grads is not None:
            g = grads[q].to(acc)
            m = _lerp(m, g, weight1)
            v = v * beta2 + (1 - beta2) * g * g
            step_size, bias_sqrt = float(schedule[step, 0]), float(schedule[step, 1])
            p = p - step_size * (m / (v.sqrt() / bias_sqrt + eps))
        if master is not None:
            master[row] = p.to(master.dtype)
        param[row] = p.to(param.dtype)
        exp_avg[row] = m.to(exp_avg.dtype)
        exp_avg_sq[row] = v.to(exp_avg_sq.dtype)
        last_step[row] = step


# ----------------------------------------------------------------------------------------- backends


def _adam_torch(param, exp_avg, exp_avg_sq, last_step, s: AdamStep):
    """Vectorized over the touched rows: [m, d] gathers, at most ``horizon`` masked replay steps."""
    rows, grads, step, schedule, beta1, beta2, eps, horizon, master = s
    acc = _common.acc_dtype(param.dtype)
    upto = s.upto
    weights = master if master is not None else param
    p = weights.index_select(0, rows).to(acc)
    m = exp_avg.index_select(0, rows).to(acc)
    v = exp_avg_sq.index_select(0, rows).to(acc)
    last = last_step.index_select(0, rows)
    gap = (upto - last).clamp_min(0) * (last > 0)
    replay = gap.clamp(max=horizon)
    weight1 = 1.0 - beta1
    longest = int(replay.max()) if rows.numel() else 0
    table = schedule.to(acc)
    for i in range(1, longest + 1):
        active = (replay >= i).unsqueeze(1)
        j = (last + i).clamp(max=schedule.shape[0] - 1)
        step_size, bias_sqrt = table[j, 0].unsqueeze(1), table[j, 1].unsqueeze(1)
        m_next = _lerp(m, torch.zeros_like(m), weight1)
        v_next = v * beta2
        p_next = p - step_size * (m_next / (v_next.sqrt() / bias_sqrt + eps))
        m, v, p = torch.where(active, m_next, m), torch.where(active, v_next, v), torch.where(active, p_next, p)
    rest = (gap - replay).to(torch.float64).unsqueeze(1)
    m = m * torch.pow(beta1, rest).to(acc)
    v = v * torch.pow(beta2, rest).to(acc)
    if grads is not None:
        g = grads.to(acc)
        m = _lerp(m, g, weight1)
        v = v * beta2 + (1 - beta2) * g * g
        step_size, bias_sqrt = float(schedule[step, 0]), float(schedule[step, 1])
        p = p - step_size * (m / (v.sqrt() / bias_sqrt + eps))
    if master is not None:
        master.index_copy_(0, rows, p.to(master.dtype))
    param.index_copy_(0, rows, p.to(param.dtype))
    exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
    last_step.index_fill_(0, rows, step)


def _adam_cpu(param, exp_avg, exp_avg_sq, last_step, s: AdamStep):
    rows, grads, step, schedule, beta1, beta2, eps, horizon, master = s
    n, d = param.shape
    _C.sparse_adam(
        param=addr(param), master=addr(master), exp_avg=addr(exp_avg), exp_avg_sq=addr(exp_avg_sq),
        last_step=addr(last_step), rows=addr(rows), row_count=rows.numel(), grads=addr(grads), param_rows=n, d=d,
        step=step, schedule=addr(schedule), schedule_rows=schedule.shape[0], beta1=beta1, beta2=beta2, eps=eps,
        horizon=horizon, param_dtype=dtype_code(param), state_dtype=dtype_code(exp_avg),
    )  # fmt: skip


def _adam_triton(param, exp_avg, exp_avg_sq, last_step, s: AdamStep):
    _common.gpu_launchers("triton", "sparse_adam").sparse_adam(param, exp_avg, exp_avg_sq, last_step, s)
    # last_step is written after the kernel: programs of one row block (over d) all read it
    last_step.index_fill_(0, s.rows, s.step)


DISPATCH = _backend.register(
    {"sparse_adam": {"cpu": _adam_cpu, "triton": _adam_triton, "torch": _adam_torch}}
)


# ------------------------------------------------------------------------------------ torch.library


# No autocast rule (ops/_autocast.py): the step updates parameters and moments in place, in their own
# dtypes (a cast copy would take the update), and an optimizer step runs outside the autocast region.
@torch.library.custom_op(
    "flashsae::sparse_adam", mutates_args=("param", "exp_avg", "exp_avg_sq", "last_step", "master")
)
def _sparse_adam_op(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    last_step: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor | None,
    step: int,
    schedule: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    horizon: int,
    master: torch.Tensor | None,
    backend: str,
) -> None:
    step_args = AdamStep(rows, grads, step, schedule, beta1, beta2, eps, horizon, master)
    run = _backend.dispatch("sparse_adam", param.device, backend, param.dtype)
    run(param, exp_avg, exp_avg_sq, last_step, step_args)


@_sparse_adam_op.register_fake
def _(param, exp_avg, exp_avg_sq, last_step, rows, grads, step, schedule, beta1, beta2, eps, horizon, master,
      backend):  # fmt: skip
    return None


# ------------------------------------------------------------------------------------------- public


def _check_number(name: str, value: object, low: float, high: float, *, closed_low: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not ((low <= value if closed_low else low < value) and value < high):
        bracket = "[" if closed_low else "("
        raise ValueError(f"{name}: expected a number in {bracket}{low}, {high}), got {value!r}")
    return float(value)


def check_step_arguments(
    param: torch.Tensor,
    last_step: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor | None,
    step: int,
    schedule: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    horizon: int | None,
    master: torch.Tensor | None,
) -> tuple[float, float, float, int] | None:
    """The checks every sparse Adam op shares (everything but the moments): raises naming the bad
    argument; returns (beta1, beta2, eps, horizon) with the horizon resolved, or None when no row is
    touched."""
    n, d = param.shape
    check_tensor("last_step", last_step, shape={"n": n}, dtype=torch.int64, like=("param", param))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step: expected an int >= 1, got {step!r}")
    check_tensor("schedule", schedule, shape={"steps": None, "2": 2}, dtype=torch.float64, like=("param", param))
    if schedule.shape[0] <= step:
        raise ValueError(f"schedule: expected at least step + 1 = {step + 1} rows, got {schedule.shape[0]}")
    beta1 = _check_number("beta1", beta1, 0.0, 1.0)
    beta2 = _check_number("beta2", beta2, 0.0, 1.0)
    eps = _check_number("eps", eps, 0.0, math.inf, closed_low=False)
    if horizon is None:
        horizon = catch_up_horizon(beta1, beta2, param.dtype)
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0:
        raise ValueError(f"horizon: expected an int >= 0, got {horizon!r}")
    if master is not None:
        if param.dtype not in MASTER_PARAM_DTYPES:
            raise ValueError(
                f"master: only bfloat16/float16 parameters keep a float32 master copy, param is {param.dtype}"
            )
        check_tensor("master", master, shape={"n": n, "d": d}, dtype=torch.float32, like=("param", param))
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows: expected a torch.Tensor, got {type(rows).__name__}")
    if rows.numel() == 0 and (grads is None or grads.numel() == 0):
        return None  # nothing touched
    check_tensor("rows", rows, shape={"m": None}, dtype=torch.int64, like=("param", param))
    m = rows.shape[0]
    if grads is not None:
        check_tensor("grads", grads, shape={"m": m, "d": d}, dtype=param.dtype, like=("param", param))
        if _checks.VALUE_CHECKS:
            # one vectorized sum (_checks.all_finite; torch.isfinite(...).all() costs 35x more on CPU:
            # 100 ms for a [24576, 768] float32 gradient on one core)
            if not _checks.all_finite(grads):
                _checks.check_finite("grads", grads)  # the exact count, for the message
    if _checks.VALUE_CHECKS:
        if int(rows[0]) < 0 or int(rows[-1]) >= n:
            raise ValueError(f"rows: expected row ids in [0, {n}), got a range [{int(rows[0])}, {int(rows[-1])}]")
        if m > 1 and not bool((rows[1:] > rows[:-1]).all()):
            raise ValueError("rows: expected row ids sorted ascending without repeats")
        if int(last_step.index_select(0, rows).max()) >= step + (grads is None):
            raise ValueError(f"last_step: some row was already updated at step {step} or later")
    return beta1, beta2, eps, horizon


def sparse_adam_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    last_step: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor | None,
    *,
    step: int,
    schedule: torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    horizon: int | None = None,
    master: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """In place: Adam step ``step`` on the rows ``rows`` of ``param``, after replaying the steps each
    row skipped since ``last_step`` (see the module docstring for the math).

    Args:
        param: [n, d] parameter (float32/float64/bfloat16/float16), updated in place.
        exp_avg, exp_avg_sq: [n, d] Adam moments (dtype: see ``STATE_DTYPES``), updated in place.
        last_step: [n] int64, the step each row was last brought to (0: never; its moments are 0);
            set to ``step`` for the given rows.
        rows: [m] int64 row ids, sorted ascending and unique (the latents that fired).
        grads: [m, d] their gradients (param's dtype), or None to only catch the rows up to
            ``step`` ("flush": no new gradient).
        step: the step being taken (>= 1; dense Adam's step count after this update).
        schedule: [>= step + 1, 2] float64: row j = (lr_j / (1 - beta1^j), sqrt(1 - beta2^j)) for
            every past step j (the optimizer appends a row per step; row 0 is unused).
        beta1, beta2, eps: Adam's hyper-parameters (no weight decay).
        horizon: skipped steps replayed with their parameter update per touch; None:
            :func:`catch_up_horizon` (below rounding); 0: moments only.
        master: optional float32 [n, d] master weights of a bfloat16/float16 param; updated on the
            rows, then rounded into param.
        backend: "auto" (default, or FLASHSAE_BACKEND), "cpu", "triton" or "torch".
    """
    check_tensor("param", param, shape={"n": None, "d": None})
    n, d = param.shape
    states = STATE_DTYPES[param.dtype]
    check_tensor("exp_avg", exp_avg, shape={"n": n, "d": d}, dtype=states, like=("param", param))
    check_tensor("exp_avg_sq", exp_avg_sq, shape={"n": n, "d": d}, dtype=exp_avg.dtype, like=("param", param))
    checked = check_step_arguments(param, last_step, rows, grads, step, schedule, beta1, beta2, eps, horizon, master)
    if checked is None:
        return  # nothing touched
    beta1, beta2, eps, horizon = checked
    requested = _backend.requested_backend(backend)
    _sparse_adam_op(
        param, exp_avg, exp_avg_sq, last_step, rows, grads, step, schedule, beta1, beta2, eps, horizon, master,
        requested,
    )  # fmt: skip
