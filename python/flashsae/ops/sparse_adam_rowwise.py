"""sparse_adam_rowwise_: sparse Adam with one second moment per row and an optional 8-bit first moment.

The memory-lean sibling of :mod:`flashsae.ops.sparse_adam` for the [n, d] matrices of a very wide SAE.
Adam keeps two moments per element (16 bytes per element in float32, 4 in bfloat16): with bfloat16
weights that is twice the weights, which caps how wide an SAE fits a GPU. Here, per row r (a latent):

- the second moment is one number, v_r, the running mean over the row of g^2 (Adam-mini's block-wise
  second moment, Zhang et al. 2024, arXiv:2406.16793, with a block = a latent's encoder or decoder
  row): 4 bytes per row instead of 2-4 bytes per element;
- the first moment is elementwise, stored in a float dtype, or as int8 codes with one float32 scale
  per row (1 byte per element), or not at all when beta1 = 0 (m = g).

Per step t with the row's gradient g (d elements), math in float32 (float64 for float64 params):

    m   = lerp(m, g, 1 - b1)                        (elementwise, torch's lerp formulas)
    v_r = b2 v_r + (1 - b2) mean(g^2)
    p  -= lr_t / (1 - b1^t) / (sqrt(v_r) / sqrt(1 - b2^t) + eps) * m

The denominator is a per-row scalar, so the exact catch-up of :mod:`~flashsae.ops.sparse_adam` gets
cheap: a row last updated at step s and touched again at step t skipped steps s+1 .. t-1 with g = 0,
at which m_j = b1^(j-s) m_s and v_j = b2^(j-s) v_s, so the skipped steps' drift is m_s times a
per-row scalar:

    p -= m_s * sum_{i=1..R} ss_{s+i} b1^i / (sqrt(v_s b2^i) / bs_{s+i} + eps)

with (ss_j, bs_j) = the schedule's (lr_j / (1 - b1^j), sqrt(1 - b2^j)) and R = min(t-1-s, horizon)
(terms past the horizon are below rounding, :func:`~flashsae.ops.sparse_adam.catch_up_horizon`). The
replay is R scalar steps per row, not R passes over d elements. Then m = b1^(t-1-s) m_s,
v_r = b2^(t-1-s) v_s, and step t runs. ``grads=None`` ("flush") brings the rows up to ``step`` with no
new gradient. Rows touched at every step and all rows after a flush equal the dense version of this
optimizer (every row stepped every step; tests/test_sparse_adam_rowwise.py).

int8 first moment: per row a float32 scale = max |m| over the row, and codes
c = sign(m) floor(127 sqrt(|m| / scale) + 0.5) in [-127, 127]; decoded m = scale c |c| / 127^2. The
square-root companding gives small entries finer steps than a linear code: the smallest non-zero
magnitude is scale / 16129 (linear: scale / 127), the largest relative step near the top ~1.6%. The
update itself uses the unrounded new m; only the stored state is coded (bitsandbytes' 8-bit Adam
does the same with a block-wise lookup map). Over the skipped steps the decay is a scale change, so
catching up moves no code.

Memory per [n, d] matrix: param + n d (int8 m) + 12 n bytes (scale, v, last step): with bfloat16
weights, 3 bytes per element against Adam's 6 (bfloat16 moments) or 10 (float32 moments).

Backends: ``cpu`` (flashsae._C, OpenMP over rows), ``triton`` (flashsae.kernels.sparse_adam_rowwise),
``torch`` (vectorized over the touched rows); :func:`sparse_adam_rowwise_reference` is the
float64-checkable definition (a loop over rows).
"""

from __future__ import annotations

import torch

from .. import _backend
from .._checks import check_tensor
from .._native import _C, addr, dtype_code
from . import _common
from .sparse_adam import STATE_DTYPES, AdamStep, _lerp, check_step_arguments

#: Largest int8 code of the first moment (codes are symmetric: -127 .. 127).
CODE_MAX = 127
#: First-moment storage kinds passed to the CPU kernel.
FIRST_MOMENT_NONE, FIRST_MOMENT_FLOAT, FIRST_MOMENT_INT8 = 0, 1, 2


def encode_first_moment(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of m ([rows, d], float) -> (int8 codes [rows, d], float32 scale [rows]): scale = max |m|
    per row, code = sign(m) floor(127 sqrt(|m| / scale) + 0.5). Math in m's dtype (float32 or float64)."""
    scale = m.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    magnitude = torch.floor(CODE_MAX * torch.sqrt(m.abs() / safe) + 0.5)
    codes = torch.where(m < 0, -magnitude, magnitude)
    return codes.to(torch.int8), scale.to(torch.float32)


def decode_first_moment(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(int8 codes [rows, d], scale [rows]) -> m [rows, d] in dtype: scale c |c| / 127^2."""
    c = codes.to(dtype)
    return (c * c.abs()) * (scale.to(dtype) / (CODE_MAX * CODE_MAX)).unsqueeze(1)


def _first_moment_kind(exp_avg: torch.Tensor | None) -> int:
    if exp_avg is None:
        return FIRST_MOMENT_NONE
    return FIRST_MOMENT_INT8 if exp_avg.dtype == torch.int8 else FIRST_MOMENT_FLOAT


def _gather_first_moment(exp_avg, exp_avg_scale, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The stored first moment of ``rows`` as a tensor like ``like`` ([m, d], the math dtype): decoded
    int8 codes, the float storage, or zeros when none is kept."""
    kind = _first_moment_kind(exp_avg)
    if kind == FIRST_MOMENT_INT8:
        return decode_first_moment(exp_avg.index_select(0, rows), exp_avg_scale.index_select(0, rows), like.dtype)
    if kind == FIRST_MOMENT_FLOAT:
        return exp_avg.index_select(0, rows).to(like.dtype)
    return torch.zeros_like(like)


def _scatter_first_moment(exp_avg, exp_avg_scale, rows: torch.Tensor, m: torch.Tensor) -> None:
    """Stores the first moment ``m`` [len(rows), d] of ``rows`` (coded when int8; nothing when none)."""
    kind = _first_moment_kind(exp_avg)
    if kind == FIRST_MOMENT_INT8:
        codes, scale = encode_first_moment(m)
        exp_avg.index_copy_(0, rows, codes)
        exp_avg_scale.index_copy_(0, rows, scale)
    elif kind == FIRST_MOMENT_FLOAT:
        exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))


# --------------------------------------------------------------------------------------- reference


@torch.no_grad()
def sparse_adam_rowwise_reference(
    param: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_scale: torch.Tensor | None,
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
    """The definition, in place, one row at a time (see the module docstring). Math in float64 for
    float64 params, else float32; the drift coefficient is summed in that dtype too."""
    acc = _common.acc_dtype(param.dtype)
    upto = step - 1 if grads is not None else step
    weight1 = 1.0 - beta1
    for q, row in enumerate(rows.tolist()):
        weights = master if master is not None else param
        p = weights[row].to(acc)
        m = _gather_first_moment(exp_avg, exp_avg_scale, rows[q : q + 1], p.unsqueeze(0))[0]
        v = exp_avg_sq[row].to(acc)
        last = int(last_step[row])
        gap = upto - last if last > 0 and upto > last else 0
        if gap:
            coef = torch.zeros((), dtype=acc)
            decay1, second = torch.ones((), dtype=acc), v.clone()
            for j in range(last + 1, last + 1 + min(gap, horizon)):
                decay1 = decay1 * beta1
                second = second * beta2
                step_size, bias_sqrt = float(schedule[j, 0]), float(schedule[j, 1])
                coef = coef + step_size * decay1 / (second.sqrt() / bias_sqrt + eps)
            p = p - coef * m
            m = m * torch.tensor(beta1**gap, dtype=acc)
            v = v * torch.tensor(beta2**gap, dtype=acc)
        if grads is not None:
            g = grads[q].to(acc)
            m = _lerp(m, g, weight1)
            v = v * beta2 + (1 - beta2) * (g * g).sum() / g.numel()
            step_size, bias_sqrt = float(schedule[step, 0]), float(schedule[step, 1])
            p = p - (step_size / (v.sqrt() / bias_sqrt + eps)) * m
        if master is not None:
            master[row] = p.to(master.dtype)
        param[row] = p.to(param.dtype)
        _scatter_first_moment(exp_avg, exp_avg_scale, rows[q : q + 1], m.unsqueeze(0))
        exp_avg_sq[row] = v.to(exp_avg_sq.dtype)
        last_step[row] = step


# ----------------------------------------------------------------------------------------- backends


def _rowwise_torch(param, exp_avg, exp_avg_scale, exp_avg_sq, last_step, s: AdamStep):
    """Vectorized over the touched rows: [m, d] gathers, the drift coefficients as [m] scalars."""
    rows, grads, step, schedule, beta1, beta2, eps, horizon, master = s
    acc = _common.acc_dtype(param.dtype)
    upto = s.upto
    weights = master if master is not None else param
    p = weights.index_select(0, rows).to(acc)
    m = _gather_first_moment(exp_avg, exp_avg_scale, rows, p)
    v = exp_avg_sq.index_select(0, rows).to(acc)
    last = last_step.index_select(0, rows)
    gap = (upto - last).clamp_min(0) * (last > 0)
    replay = gap.clamp(max=horizon)
    table = schedule.to(acc)
    coef = torch.zeros_like(v)
    decay1, second = torch.ones_like(v), v.clone()
    for i in range(1, int(replay.max()) + 1 if rows.numel() else 1):
        active = replay >= i
        j = (last + i).clamp(max=schedule.shape[0] - 1)
        decay1 = decay1 * beta1
        second = second * beta2
        term = table[j, 0] * decay1 / (second.sqrt() / table[j, 1] + eps)
        coef = coef + torch.where(active, term, torch.zeros_like(term))
    p = p - coef.unsqueeze(1) * m
    gaps = gap.to(torch.float64)
    m = m * torch.pow(beta1, gaps).to(acc).unsqueeze(1)
    v = v * torch.pow(beta2, gaps).to(acc)
    if grads is not None:
        g = grads.to(acc)
        m = _lerp(m, g, 1.0 - beta1)
        v = v * beta2 + (1 - beta2) * (g * g).sum(dim=1) / g.shape[1]
        step_size, bias_sqrt = float(schedule[step, 0]), float(schedule[step, 1])
        p = p - (step_size / (v.sqrt() / bias_sqrt + eps)).unsqueeze(1) * m
    if master is not None:
        master.index_copy_(0, rows, p.to(master.dtype))
    param.index_copy_(0, rows, p.to(param.dtype))
    _scatter_first_moment(exp_avg, exp_avg_scale, rows, m)
    exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
    last_step.index_fill_(0, rows, step)


def _rowwise_cpu(param, exp_avg, exp_avg_scale, exp_avg_sq, last_step, s: AdamStep):
    rows, grads, step, schedule, beta1, beta2, eps, horizon, master = s
    n, d = param.shape
    kind = _first_moment_kind(exp_avg)
    _C.sparse_adam_rowwise(
        param=addr(param), master=addr(master), exp_avg=addr(exp_avg), exp_avg_scale=addr(exp_avg_scale),
        exp_avg_sq=addr(exp_avg_sq), last_step=addr(last_step), rows=addr(rows), row_count=rows.numel(),
        grads=addr(grads), param_rows=n, d=d, step=step, schedule=addr(schedule), schedule_rows=schedule.shape[0],
        beta1=beta1, beta2=beta2, eps=eps, horizon=horizon, param_dtype=dtype_code(param), first_moment=kind,
        first_moment_dtype=dtype_code(exp_avg) if kind == FIRST_MOMENT_FLOAT else -1,
    )  # fmt: skip


def _rowwise_triton(param, exp_avg, exp_avg_scale, exp_avg_sq, last_step, s: AdamStep):
    launchers = _common.gpu_launchers("triton", "sparse_adam_rowwise")
    launchers.sparse_adam_rowwise(param, exp_avg, exp_avg_scale, exp_avg_sq, last_step, s)
    # last_step is written after the kernel: programs of one row block all read it
    last_step.index_fill_(0, s.rows, s.step)


DISPATCH = _backend.register(
    {"sparse_adam_rowwise": {"cpu": _rowwise_cpu, "triton": _rowwise_triton, "torch": _rowwise_torch}}
)


# ------------------------------------------------------------------------------------ torch.library


# No autocast rule (ops/_autocast.py): the step updates parameters and moments in place, in their own
# dtypes (a cast copy would take the update), and an optimizer step runs outside the autocast region.
@torch.library.custom_op(
    "flashsae::sparse_adam_rowwise",
    mutates_args=("param", "exp_avg", "exp_avg_scale", "exp_avg_sq", "last_step", "master"),
)
def _sparse_adam_rowwise_op(
    param: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_scale: torch.Tensor | None,
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
    run = _backend.dispatch("sparse_adam_rowwise", param.device, backend, param.dtype)
    run(param, exp_avg, exp_avg_scale, exp_avg_sq, last_step, step_args)


@_sparse_adam_rowwise_op.register_fake
def _(param, exp_avg, exp_avg_scale, exp_avg_sq, last_step, rows, grads, step, schedule, beta1, beta2, eps, horizon,
      master, backend):  # fmt: skip
    return None


# ------------------------------------------------------------------------------------------- public


def sparse_adam_rowwise_(
    param: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_scale: torch.Tensor | None,
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
    """In place: step ``step`` of row-wise Adam on the rows ``rows`` of ``param``, after catching up
    the steps each row skipped since ``last_step`` (see the module docstring for the math).

    Args:
        param: [n, d] parameter (float32/float64/bfloat16/float16), updated in place.
        exp_avg: [n, d] first moment: a float dtype of ``flashsae.ops.sparse_adam.STATE_DTYPES``, or
            int8 codes (then ``exp_avg_scale`` holds the row scales), or None when beta1 = 0.
        exp_avg_scale: [n] float32 scales of int8 ``exp_avg`` (None otherwise).
        exp_avg_sq: [n] row second moments, float32 (float64 for float64 params).
        last_step: [n] int64, the step each row was last brought to (0: never; its moments are 0);
            set to ``step`` for the given rows.
        rows: [m] int64 row ids, sorted ascending and unique (the latents that fired).
        grads: [m, d] their gradients (param's dtype), or None to only catch the rows up to ``step``.
        step, schedule, beta1, beta2, eps, horizon, master, backend: as for
            :func:`flashsae.ops.sparse_adam_`.
    """
    check_tensor("param", param, shape={"n": None, "d": None})
    n, d = param.shape
    if exp_avg is None:
        if not (isinstance(beta1, (int, float)) and beta1 == 0):
            raise ValueError(f"exp_avg: None (no first moment) needs beta1 = 0, got beta1={beta1!r}")
    else:
        dtypes = STATE_DTYPES[param.dtype] + ((torch.int8,) if param.dtype != torch.float64 else ())
        check_tensor("exp_avg", exp_avg, shape={"n": n, "d": d}, dtype=dtypes, like=("param", param))
    if exp_avg is not None and exp_avg.dtype == torch.int8:
        check_tensor("exp_avg_scale", exp_avg_scale, shape={"n": n}, dtype=torch.float32, like=("param", param))
    elif exp_avg_scale is not None:
        raise ValueError("exp_avg_scale: only int8 exp_avg has row scales; pass None")
    second = torch.float64 if param.dtype == torch.float64 else torch.float32
    check_tensor("exp_avg_sq", exp_avg_sq, shape={"n": n}, dtype=second, like=("param", param))
    checked = check_step_arguments(param, last_step, rows, grads, step, schedule, beta1, beta2, eps, horizon, master)
    if checked is None:
        return  # nothing touched
    beta1, beta2, eps, horizon = checked
    requested = _backend.requested_backend(backend)
    _sparse_adam_rowwise_op(
        param, exp_avg, exp_avg_scale, exp_avg_sq, last_step, rows, grads, step, schedule, beta1, beta2, eps,
        horizon, master, requested,
    )  # fmt: skip
