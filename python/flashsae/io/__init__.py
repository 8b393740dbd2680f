"""Checkpoint formats. Native (flashsae) for now; SAELens, sparsify, dictionary_learning and
OpenAI formats follow (see the formats issue)."""

from .native import load_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]
