"""Training SAEs on a transformers model's activations: ``flashsae train`` and ``flashsae cache``.

    from flashsae.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(hookpoints=["encoder.layer.3"], out="runs/demo")).train()
    sae = flashsae.load(result.sae_paths["encoder.layer.3"])

Pieces, one concern each: :mod:`.config` (the dataclasses behind the CLI flags), :mod:`.text`
(documents -> packed contexts), :mod:`.activations` (model loading, hookpoints, early-stopping
forward), :mod:`.buffer` (shuffle buffer), :mod:`.cache` (activations on disk), :mod:`.checkpoint`
(atomic training state), :mod:`.calibration` (BatchTopK thresholds set before saving), :mod:`.metrics` (JSONL / tensorboard / wandb), :mod:`.step` (the optimizer
and the unit-norm decoder step, shared with flashsae.distributed), :mod:`.trainer` (the loop).
"""

from .cache import CachedActivations, CacheError, read_manifest, write_cache
from .calibration import calibrate_threshold
from ..cli_args import field_docs
from .config import ActivationSourceConfig, CacheConfig, TrainConfig
from .trainer import NonFiniteActivationsError, Trainer, TrainResult, fold_activation_scale_, resume_config, train

__all__ = [
    "ActivationSourceConfig",
    "CacheConfig",
    "CacheError",
    "CachedActivations",
    "NonFiniteActivationsError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "calibrate_threshold",
    "field_docs",
    "fold_activation_scale_",
    "read_manifest",
    "resume_config",
    "train",
    "write_cache",
]
