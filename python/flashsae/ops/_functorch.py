"""torch.func support for the custom ops: ``grad``, ``vjp``, ``vmap`` and ``functional_call``.

Two things stand between a ``torch.library`` custom op and torch.func:

- Autograd. ``register_autograd`` wraps the op in an autograd.Function whose forward takes ``ctx``
  (torch 2.13), and functorch's transforms refuse such Functions ("it must override the
  setup_context staticmethod"). :func:`autograd_function` builds, from the same setup_context and
  backward the op registers, a Function in setup_context style (forward without ctx) that the public
  functional forms call while a transform runs (:func:`call`). Its ``generate_vmap_rule`` lets vmap
  run forward and backward through the ops' own batching rules below, so ``vmap(grad(loss))``
  (per-sample gradients) works too. The custom op keeps its ``register_autograd`` for eager and
  ``torch.compile`` callers, for ``torch.ops.flashsae.*`` and for opcheck.
- Batching. Without a rule, vmap runs a custom op through torch's generic fallback (a loop, with a
  performance warning per op). :func:`register_vmap` gives each op an explicit rule: when every
  vmapped argument is a per-row one (the op treats its rows independently and returns per-row
  outputs, e.g. topk_encode's ``x``), the vmapped dimension is folded into the rows and the op runs
  once on [V * rows, ...]: vmap over a batch of activation batches costs one call, not V. Any other
  batching (vmapped weights: an ensemble of SAEs) runs the op once per slice and stacks the results.
- Data-dependent widths. batch_topk, threshold_encode and the padded-row helpers return [rows, m]
  with m the largest count of any row, which no batching rule can express. Under vmap they call
  :func:`vmap_select`: the positions of the chosen latents are computed below the vmap (folded rows,
  or slice by slice) and padded to the widest slice, then the values are gathered with plain torch
  ops that vmap batches and autograd differentiates.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import torch


def autograd_function(
    name: str,
    op: Callable[..., Any],
    setup_context: Callable[[Any, tuple[Any, ...], Any], None],
    backward: Callable[..., tuple[Any, ...]],
) -> type[torch.autograd.Function]:
    """A setup_context-style ``torch.autograd.Function`` named `name` that calls `op` and
    differentiates it with `setup_context` / `backward` (the functions the op registers with
    ``register_autograd``); vmap rule generated from the ops' batching rules."""

    def forward(*args: Any) -> Any:
        return op(*args)

    return type(
        name,
        (torch.autograd.Function,),
        {
            "__doc__": f"{name}: the custom op {getattr(op, '_qualname', name)} for torch.func.",
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "generate_vmap_rule": True,
        },
    )


def backward_function(name: str, op: Callable[..., Any]) -> type[torch.autograd.Function]:
    """A setup_context-style Function around the backward op `op`, for the backward formulas to
    call: torch.func.grad differentiates with create_graph, so the backward op sees inputs that
    require grad, and the op's generated autograd wrapper (no formula: the ops have no double
    backward) would refuse functorch. This one runs under every transform and raises a clear error
    only if a second derivative is actually taken."""

    def forward(*args: Any) -> Any:
        return op(*args)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    def backward(ctx: Any, *grads: Any) -> Any:
        raise NotImplementedError(
            f"{getattr(op, '_qualname', name)}: flashsae's ops have first derivatives only (no double backward)"
        )

    return type(
        name,
        (torch.autograd.Function,),
        {
            "__doc__": f"{name}: the backward op {getattr(op, '_qualname', name)} for torch.func.",
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "generate_vmap_rule": True,
        },
    )


def _slice(value: Any, dim: int | None, index: int) -> Any:
    if dim is None:
        return value
    return value.select(dim, index).contiguous()


def _stack(results: list[Any]) -> tuple[Any, Any]:
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(results), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*results, strict=True))
    return stacked, tuple(0 for _ in stacked)


def _loop(op: Callable[..., Any], info: Any, in_dims: Sequence[int | None], args: Sequence[Any]) -> tuple[Any, Any]:
    """One call per vmapped slice, outputs stacked along dimension 0."""
    return _stack([op(*(_slice(a, d, i) for a, d in zip(args, in_dims, strict=True))) for i in range(info.batch_size)])


def _fold_rows(
    op: Callable[..., Any], info: Any, in_dims: Sequence[int | None], args: Sequence[Any], row_args: Sequence[int]
) -> tuple[Any, Any]:
    """The vmapped dimension folded into the rows of every per-row argument (unbatched ones
    expanded), one call, every per-row output unfolded back to [V, rows, ...]."""
    size = info.batch_size
    folded = list(args)
    rows = None
    for position in row_args:
        value, dim = args[position], in_dims[position]
        if value is None:
            continue
        value = value.movedim(dim, 0) if dim is not None else value.expand(size, *value.shape)
        rows = value.shape[1]
        folded[position] = value.reshape(size * value.shape[1], *value.shape[2:]).contiguous()
    result = op(*folded)
    outputs = (result,) if isinstance(result, torch.Tensor) else tuple(result)
    unfolded, dims = [], []
    for out in outputs:
        if out.dim() >= 1 and out.shape[0] == size * rows:
            unfolded.append(out.reshape(size, rows, *out.shape[1:]))
            dims.append(0)
        else:  # an output that does not depend on the rows (e.g. an empty placeholder): shared
            unfolded.append(out)
            dims.append(None)
    if isinstance(result, torch.Tensor):
        return unfolded[0], dims[0]
    return tuple(unfolded), tuple(dims)


def register_vmap(op: Any, *, row_args: Sequence[str] = ()) -> None:
    """Gives the custom op `op` (a ``torch.library.custom_op``) an explicit batching rule.

    row_args: the names of its per-row arguments, if the op is row-wise (row i of every per-row
    output depends only on row i of these arguments and on the others); when only they are vmapped
    the vmapped dimension is folded into the rows. Otherwise, and for ops that reduce over rows
    (the backward ops: parameter gradients sum over the batch), one call per slice.
    """
    names = [argument.name for argument in op._opoverload._schema.arguments]
    positions = [names.index(name) for name in row_args]

    def rule(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Any, Any]:
        batched = {i for i, dim in enumerate(in_dims) if dim is not None}
        if positions and batched <= set(positions):
            return _fold_rows(op, info, in_dims, args, positions)
        return _loop(op, info, in_dims, args)

    op.register_vmap(rule)


def call(op: Any, function: type[torch.autograd.Function], *args: Any) -> Any:
    """`op(*args)` through its torch.func-compatible `function` while a transform runs, else the op
    itself: eager and ``torch.compile`` keep the op's own autograd registration (dynamo traces the
    custom op as one node, as before), and both paths run the same setup_context and backward."""
    if not torch.compiler.is_compiling() and transforms_active():
        return function.apply(*args)
    return op(*args)


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is running: a module then leaves its
    state (step counters, hints) alone, as a functional transform expects."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


#: True while a selector of :func:`vmap_select` runs on plain tensors below the vmap: the
#: variable-width functions it calls then take their ordinary path.
_selecting = contextvars.ContextVar("flashsae_selecting", default=False)


def vmap_active() -> bool:
    """Whether a torch.func.vmap (at any level) is running, outside a vmap_select selector."""
    if torch.compiler.is_compiling() or _selecting.get():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    vmap = torch._C._functorch.TransformType.Vmap
    return any(interpreter.key() == vmap for interpreter in retrieve_all_functorch_interpreters())


def _pad_stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[rows, m_i] int tensors padded with -1 to the largest m and stacked: [V, rows, m]."""
    width = max(part.shape[-1] for part in parts)
    return torch.stack([torch.nn.functional.pad(part, (0, width - part.shape[-1]), value=-1) for part in parts])


class _Select(torch.autograd.Function):
    """The positions a data-dependent selector picks ([rows, m] int64, -1 = empty), batched by hand:
    vmap cannot batch a function whose output width depends on the data, but the positions alone
    (no gradient) can be computed below the vmap, slice by slice or on the folded rows, and padded."""

    @staticmethod
    def forward(selector: Callable[..., torch.Tensor], rows: int, *tensors: torch.Tensor) -> torch.Tensor:
        token = _selecting.set(True)
        try:
            with torch.no_grad():
                return selector(*tensors)
        finally:
            _selecting.reset(token)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # pragma: no cover - the output is an integer tensor
        raise RuntimeError("positions have no gradient")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], selector: Any, rows: int, *tensors: Any) -> Any:
        dims = in_dims[2:]
        size = info.batch_size
        batched = [i for i, dim in enumerate(dims) if dim is not None]
        if rows and all(i < rows for i in batched):  # fold the vmapped dimension into the rows
            folded = list(tensors)
            count = None
            for i in range(rows):
                value = tensors[i]
                value = value.movedim(dims[i], 0) if dims[i] is not None else value.expand(size, *value.shape)
                count = value.shape[1]
                folded[i] = value.reshape(size * count, *value.shape[2:]).contiguous()
            picked = _Select.forward(selector, rows, *folded)
            return picked.reshape(size, count, picked.shape[-1]), 0
        parts = [
            _Select.forward(selector, rows, *(_slice(t, d, i) for t, d in zip(tensors, dims, strict=True)))
            for i in range(size)
        ]
        return _pad_stack(parts), 0


def vmap_select(selector: Callable[..., torch.Tensor], *tensors: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Under vmap: the int64 positions [rows, m] (-1 = empty slot) that `selector(*tensors)` returns
    on plain tensors, for every vmapped slice, padded to one m. rows: how many leading tensors are
    per-row inputs of a row-wise selector (each output row depends on their same row only); when only
    they are vmapped, the vmapped dimension is folded into their rows and the selector runs once.
    rows=0 (a batch-wide selection, BatchTopK): once per slice. The caller gathers the values from
    the positions with differentiable torch ops, which vmap batches."""
    return _Select.apply(selector, rows, *tensors)
