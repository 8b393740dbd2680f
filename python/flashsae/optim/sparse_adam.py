"""SparseAdam: Adam that updates only the rows of latents that fired, with exact catch-up.

    sae = flashsae.TopKSAE(d_in, n_latents, k)
    optimizer = SparseAdam(sae.parameters(), lr=2e-4)
    for x in batches:
        sae(x).loss.backward()       # W_enc / W_dec: row-sparse gradients, no [n, d] .grad
        optimizer.step()             # one fused kernel per [n, d] matrix, over the touched rows
        optimizer.zero_grad()
    optimizer.flush()                # every row up to date (= dense Adam's state), before saving

How gradients get here: the constructor opts every 2-D parameter into row-sparse gradients
(:func:`flashsae.ops._row_grads.collect_row_grads`; ``row_sparse=False`` keeps dense ones). flashsae's
ops (topk_encode, sparse_decode, sae_loss: every TopK-family SAE) then hand the touched rows'
gradients to the parameter's collector instead of writing an [n, d] ``.grad``. A parameter that got a
dense ``.grad`` anyway (used by a plain torch op, or under torch.compile) is updated densely; both
kinds may mix in one step. Parameters that are not 2-D (b_enc, b_dec) get dense gradients and a dense
update by the same kernel (every element touched).

The math (flashsae/ops/sparse_adam.py derives it): each row keeps the step of its last update; when
touched again it first replays the zero-gradient steps of dense Adam it skipped (moments decayed
exactly; the parameter's momentum drift summed up to a horizon past which it is below rounding), then
takes the step with its gradient. Hence: rows touched every step = dense Adam; after :meth:`flush`,
every row's parameter and moments equal dense Adam's given the same gradients. Between touches a row
holds its last value (its pending drift is applied at the next touch or flush). ``catch_up="moments"``
drops the drift (exact moment decay only: cheaper, no longer dense Adam for skipped rows).

Memory: per [n, d] parameter the two moments (``state_dtype``: the parameter's dtype by default, or
float32 / bfloat16), an int64 step per row, and with ``master_weights=True`` (bfloat16/float16
parameters) a float32 master copy; no gradient of size [n, d]. Per step, a float64 pair per step
taken (the lr schedule the replay needs): 16 bytes per step, 16 MB after a million steps.

Leaner moments for very wide SAEs (``moments``, for the 2-D parameters; vectors keep Adam's):
``"row"`` keeps one second moment per row (Adam-mini's block-wise second moment, a block = a latent's
encoder or decoder row) and the first moment elementwise in ``state_dtype``; ``"row-int8"`` also
stores the first moment as int8 codes with a float32 scale per row (flashsae/ops/sparse_adam_rowwise.py).
With bfloat16 weights that is 3 bytes per element of weights + state against Adam's 6 (bfloat16
moments): the difference between 2x and 4x the width of a dense SAE on one GPU (``flashsae plan``).
Same catch-up: rows touched every step, and all rows after :meth:`flush`, equal the dense form of
that optimizer. With ``betas[0] == 0`` the row modes store no first moment at all.
Updates during backward (``update_in_backward=True``): the collectors hand each gradient part to the
optimizer as the ops produce it, and the ops then compute a row-sparse parameter's gradient a chunk of
rows at a time (flashsae.ops._row_grads.EAGER_CHUNK_ELEMENTS); each chunk's rows take their Adam step
at once and the chunk is freed. No gradient larger than a chunk exists, which is what a layer of a
cross-layer transcoder needs, whose batches touch nearly every row ([8192, 2304] decoder gradients).
Same math as step() (the step number and learning rate are those of the coming step: set the
learning rate before the forward). A row may get one gradient part per step (RuntimeError otherwise:
an architecture whose loss reads a matrix twice, e.g. TopK's AuxK or Multi-TopK, needs the default).
Measured on the demo (``flashsae train --optimizer sparse_adam --optimizer-moments M``, MiniLM layer 3,
3072 latents, 262k tokens; held-out explained variance): 0.860 with "row-int8" against 0.859 with
torch's Adam; a dense prototype of the row-wise second moment gave 0.860, and 0.851 with beta1 = 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

from .._backend import requested_backend
from .._checks import boolean, non_negative, positive_number
from ..ops._row_grads import collect_row_grads, row_grads_of, stop_collecting
from ..ops.sparse_adam import MASTER_PARAM_DTYPES, STATE_DTYPES, catch_up_horizon, sparse_adam_
from ..ops.sparse_adam_rowwise import sparse_adam_rowwise_

CATCH_UP = ("exact", "moments")
STATE_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Layouts of the moments of 2-D parameters (vectors always keep Adam's elementwise moments).
MOMENTS = ("elementwise", "row", "row-int8")


def _matrix_view(t: torch.Tensor) -> torch.Tensor:
    """A dense (non-row-sparse) tensor as an [R, C] matrix for the row kernel: 2-D tensors as they
    are, others flattened into rows of up to 1024 elements (C divides the element count), so the
    kernels' threads / programs share the work."""
    if t.dim() == 2:
        return t
    flat = t.reshape(-1)
    cols = math.gcd(flat.numel(), 1024)
    return flat.view(-1, cols)


class SparseAdam(torch.optim.Optimizer):
    """Adam (no weight decay) over row-sparse gradients, see the module docstring.

    Args:
        params: parameters or parameter groups, as for torch.optim.Adam.
        lr, betas, eps: Adam's hyper-parameters (torch.optim.Adam's meaning and defaults).
        catch_up: "exact" (replay skipped steps: dense Adam's math) or "moments" (decay only).
        state_dtype: dtype of the moments: None (the parameter's), "float32" or "bfloat16".
        moments: "elementwise" (Adam), "row" (one second moment per row of a 2-D parameter) or
            "row-int8" (that, and an int8 first moment with a scale per row); see the module docstring.
        master_weights: keep a float32 master copy of bfloat16/float16 parameters (the kernel
            updates it and rounds into the parameter); ignored for float32/float64 parameters.
        row_sparse: opt 2-D parameters into row-sparse gradients (see the module docstring).
        update_in_backward: update the rows of row-sparse parameters during the backward pass, as
            the ops hand over each chunk of rows' gradient (see "Updates during backward" in the module
            docstring); step() then updates the other parameters and closes the step.
        backend: kernel backend ("auto" default; see flashsae._backend).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        catch_up: str = "exact",
        state_dtype: str | None = None,
        master_weights: bool = False,
        moments: str = "elementwise",
        row_sparse: bool = True,
        update_in_backward: bool = False,
        backend: str | None = None,
    ) -> None:
        non_negative("lr", lr, finite=True)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        positive_number("eps", eps, expected="a number > 0")
        if catch_up not in CATCH_UP:
            raise ValueError(f"catch_up: expected one of {', '.join(CATCH_UP)}, got {catch_up!r}")
        if catch_up == "exact":
            catch_up_horizon(betas[0], betas[1], torch.float32)  # refuses betas whose updates do not decay
        if state_dtype is not None and state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype: expected None, 'float32' or 'bfloat16', got {state_dtype!r}")
        boolean("master_weights", master_weights)
        boolean("update_in_backward", update_in_backward)
        if moments not in MOMENTS:
            raise ValueError(f"moments: expected one of {', '.join(MOMENTS)}, got {moments!r}")
        defaults = {
            "lr": float(lr),
            "betas": (float(betas[0]), float(betas[1])),
            "eps": float(eps),
            "catch_up": catch_up,
            "state_dtype": state_dtype,
            "master_weights": master_weights,
            "moments": moments,
            "row_sparse": bool(row_sparse),
            "backend": None if backend is None else requested_backend(backend),
        }
        super().__init__(params, defaults)
        self._updated_rows: dict[torch.Tensor, torch.Tensor | None] = {}
        self.update_in_backward = update_in_backward
        #: Row-sparse parameters updated during this step's backward -> the rows updated.
        self._pending: dict[torch.Tensor, list[torch.Tensor]] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if group["row_sparse"] and p.dim() == 2:
                    collector = collect_row_grads(p)
                    if update_in_backward:
                        # the group by position: load_state_dict replaces the group dicts
                        collector.consumer = partial(self._update_rows_now, index, p)

    # -------------------------------------------------------------------------------- state

    def _state_dtype(self, group: dict[str, Any], p: torch.Tensor) -> torch.dtype:
        name = group["state_dtype"]
        dtype = p.dtype if name is None or p.dtype == torch.float64 else STATE_DTYPE_NAMES[name]
        if dtype not in STATE_DTYPES[p.dtype]:
            raise ValueError(f"state_dtype: {name} moments are not available for {p.dtype} parameters")
        return dtype

    @staticmethod
    def _rowwise(group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether p's moments are row-wise (a 2-D parameter under moments "row" / "row-int8")."""
        return group.get("moments", "elementwise") != "elementwise" and p.dim() == 2

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        view = p if p.dim() == 2 and row_grads_of(p) is not None else _matrix_view(p)
        dtype = self._state_dtype(group, p)
        state["step"] = torch.zeros((), dtype=torch.int64)  # on the CPU: read every step without a device sync
        if self._rowwise(group, p):
            n = p.shape[0]
            if group["moments"] == "row-int8":
                if p.dtype == torch.float64:
                    raise ValueError("moments: row-int8 is for float32/bfloat16/float16 parameters, not float64")
                if group["betas"][0] > 0:
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.int8, device=p.device)
                    state["exp_avg_scale"] = torch.zeros(n, dtype=torch.float32, device=p.device)
            elif group["betas"][0] > 0:
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            second = torch.float64 if p.dtype == torch.float64 else torch.float32
            state["exp_avg_sq"] = torch.zeros(n, dtype=second, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["last_step"] = torch.zeros(view.shape[0], dtype=torch.int64, device=p.device)
        state["schedule"] = torch.zeros(64, 2, dtype=torch.float64, device=p.device)
        if group["master_weights"] and p.dtype in MASTER_PARAM_DTYPES:
            state["master"] = p.detach().float().contiguous()
        return state

    @staticmethod
    def _record_schedule(state: dict[str, Any], step: int, lr: float, beta1: float, beta2: float) -> None:
        """Row `step` of the schedule: torch's Adam scalars (lr / (1 - b1^t), sqrt(1 - b2^t))."""
        table = state["schedule"]
        if table.shape[0] <= step:
            grown = torch.zeros(max(2 * table.shape[0], step + 1), 2, dtype=torch.float64, device=table.device)
            grown[: table.shape[0]] = table
            state["schedule"] = table = grown
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        table[step] = torch.tensor([lr / bias_correction1, bias_correction2**0.5], dtype=torch.float64)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch.optim.Optimizer's, except that state tensors keep their dtypes (torch casts
        floating state to the parameter's dtype: bfloat16 would round the float32 master copy and
        the float64 schedule)."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params, strict=False))
        super().load_state_dict(state_dict)
        for pid, entries in state_dict["state"].items():
            p = by_id[int(pid)] if int(pid) in by_id else by_id[pid]
            for key, value in entries.items():
                if key == "step":
                    self.state[p][key] = torch.as_tensor(value, dtype=torch.int64).cpu()
                elif isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device)
        for group in self.param_groups:
            group["betas"] = tuple(group["betas"])  # a JSON round trip makes it a list

    # --------------------------------------------------------------------------------- steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears dense gradients (as torch does) and the row-sparse collectors."""
        super().zero_grad(set_to_none=set_to_none)
        if self._pending:
            raise RuntimeError("update_in_backward: zero_grad() before step() would drop updates already made")
        for group in self.param_groups:
            for p in group["params"]:
                collector = row_grads_of(p)
                if collector is not None:
                    collector.clear()

    def _gradient(self, p: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, grads) of this step: the collector's rows, or every row when p has a dense grad
        (plus the collector's parts, if any); None when p took no part in the step."""
        collector = row_grads_of(p)
        if p.grad is None:
            if collector is None:
                return None
            return collector.coalesced()
        if p.grad.is_sparse:
            raise ValueError("SparseAdam takes dense or flashsae row-sparse gradients, not torch sparse tensors")
        grads = _matrix_view(p.grad.to(p.dtype).contiguous())
        if collector is not None and len(collector):
            rows, parts = collector.coalesced()
            grads = grads.index_add(0, rows, parts)
        return torch.arange(view.shape[0], device=p.device), grads

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One Adam step of every parameter that has a gradient (dense or row-sparse); a row-sparse
        parameter steps every time (a step that touched none of its rows is a zero-gradient step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._updated_rows.clear()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p in self._pending:  # its rows were updated during backward: close the step
                    if p.grad is not None:
                        raise RuntimeError(
                            "update_in_backward: a parameter got both a dense gradient and row updates in one "
                            "step (it is used outside flashsae's ops); use update_in_backward=False"
                        )
                    self.state[p]["step"] += 1
                    self._updated_rows[p] = torch.cat(self._pending.pop(p)).sort().values
                    continue
                sparse = p.dim() == 2 and row_grads_of(p) is not None
                view = p if sparse else _matrix_view(p)
                gradient = self._gradient(p, view)
                if gradient is None:
                    continue
                state = self._init_state(group, p)
                state["step"] += 1
                step = int(state["step"])
                self._record_schedule(state, step, group["lr"], beta1, beta2)
                rows, grads = gradient
                self._apply(group, p, state, rows.contiguous(), grads.contiguous(), step)
                self._updated_rows[p] = rows if sparse and p.grad is None else None
        return loss

    @torch.no_grad()
    def _update_rows_now(self, group_index: int, p: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """A chunk's gradient handed over during backward (update_in_backward): the Adam step of
        these rows at the coming step number, now. A row may be updated once per step."""
        group = self.param_groups[group_index]
        state = self._init_state(group, p)
        step = int(state["step"]) + 1
        if bool((state["last_step"].index_select(0, rows) >= step).any()):
            raise RuntimeError(
                "update_in_backward: a row got a second gradient part in one step (two ops, or two "
                "backward passes, wrote the same parameter); use update_in_backward=False"
            )
        beta1, beta2 = group["betas"]
        self._record_schedule(state, step, group["lr"], beta1, beta2)
        self._apply(group, p, state, rows.contiguous(), grads.contiguous(), step)
        self._pending.setdefault(p, []).append(rows)

    def _apply(self, group, p, state, rows, grads, step) -> None:
        beta1, beta2 = group["betas"]
        sparse = p.dim() == 2 and row_grads_of(p) is not None
        view = (lambda t: t) if sparse else _matrix_view
        horizon = 0 if group["catch_up"] == "moments" else catch_up_horizon(beta1, beta2, p.dtype)
        master = state.get("master")
        if self._rowwise(group, p):
            sparse_adam_rowwise_(
                p.data, state.get("exp_avg"), state.get("exp_avg_scale"), state["exp_avg_sq"], state["last_step"], rows,
                grads, step=step, schedule=state["schedule"], beta1=beta1, beta2=beta2, eps=group["eps"],
                horizon=horizon, master=master, backend=group["backend"],
            )  # fmt: skip
            return
        sparse_adam_(
            view(p.data), view(state["exp_avg"]), view(state["exp_avg_sq"]), state["last_step"], rows, grads,
            step=step, schedule=state["schedule"], beta1=beta1, beta2=beta2, eps=group["eps"], horizon=horizon,
            master=None if master is None else view(master), backend=group["backend"],
        )  # fmt: skip

    @torch.no_grad()
    def flush(self) -> None:
        """Brings every row up to the current step (replays the zero-gradient steps each skipped):
        afterwards parameters and moments are dense Adam's. Call before evaluating or saving the
        weights; training may continue afterwards (the replayed steps are not replayed again)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or int(state["step"]) == 0:
                    continue
                step = int(state["step"])
                stale = (state["last_step"] < step).nonzero().squeeze(1)
                if stale.numel():
                    self._apply(group, p, state, stale, None, step)
                self._updated_rows[p] = None

    def updated_rows(self, p: torch.Tensor) -> torch.Tensor | None:
        """Rows of p changed by the last step() (int64, sorted), or None when every row may have
        changed (a dense update or a flush). A trainer renormalizing decoder rows needs only these."""
        if p not in self._updated_rows:
            raise KeyError("updated_rows: this parameter was not updated by the last step()")
        return self._updated_rows[p]

    def release(self) -> None:
        """Back to dense gradients for every parameter (detaches the row-sparse collectors)."""
        for group in self.param_groups:
            for p in group["params"]:
                stop_collecting(p)
