"""The optimizer and the optimizer step both trainers share (flashsae.train.Trainer and
flashsae.distributed.train.DistributedTrainer), so the two train with the same settings.

A step: set the scheduled learning rate, remove from W_dec's gradient its component along each
decoder row (dense gradients and SparseAdam's row-sparse ones), the optimizer step, then rescale the
decoder rows to unit norm: with SparseAdam only the rows it changed (the others kept their unit
norm), else every row. Architectures whose penalty weighs activations by decoder norms
(``unit_norm_decoder = False``) skip both decoder parts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..optim import SparseAdam, normalize_rows_, remove_parallel_row_grads_
from .config import TrainConfig


def make_optimizer(
    parameters: Iterable[nn.Parameter], config: TrainConfig, lr: float, *, update_in_backward: bool = False
) -> torch.optim.Optimizer:
    """config.optimizer ("adam" or "sparse_adam") over `parameters` with the config's betas, eps and
    (SparseAdam) state dtype and moments. update_in_backward: SparseAdam updates rows during the
    backward pass (architectures that opt in, e.g. the CLT, whose batches touch nearly every row)."""
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "sparse_adam":
        return SparseAdam(
            parameters,
            lr=lr,
            betas=betas,
            eps=config.adam_eps,
            state_dtype=config.optimizer_state_dtype,
            moments=config.optimizer_moments,
            update_in_backward=update_in_backward,
        )
    # fused: one kernel per tensor and no [n, d] temporaries (torch's default Adam adds two)
    return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=config.adam_eps, fused=True)


def unit_norm_decoder(sae: nn.Module) -> bool:
    """Whether training keeps the decoder rows at unit norm: an architecture opts out with
    ``unit_norm_decoder = False`` (a class attribute, or a property when it depends on the config)."""
    return bool(getattr(sae, "unit_norm_decoder", True))


def normalize_decoder(sae: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Unit-norm decoder rows after a step: with SparseAdam only the rows it changed, else every row."""
    rows = optimizer.updated_rows(sae.W_dec) if isinstance(optimizer, SparseAdam) else None
    if rows is None:
        sae.normalize_decoder_()
    else:
        normalize_rows_(sae.W_dec, rows, master=optimizer.state[sae.W_dec].get("master"))


def optimizer_step(sae: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
    """One step of `optimizer` at learning rate `lr` on the gradients of `sae` (see the module
    docstring); the gradients are cleared afterwards."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    unit_norm = unit_norm_decoder(sae)
    if unit_norm:
        sae.remove_decoder_parallel_grads_()
        remove_parallel_row_grads_(sae.W_dec)  # row-sparse gradients (sparse_adam); else a no-op
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if unit_norm:
        normalize_decoder(sae, optimizer)


def flush_optimizer(sae: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Brings SparseAdam's skipped rows up to date (dense Adam's weights) and renormalizes the
    decoder; a no-op for dense Adam."""
    if isinstance(optimizer, SparseAdam):
        optimizer.flush()
        if unit_norm_decoder(sae):
            normalize_decoder(sae, optimizer)
