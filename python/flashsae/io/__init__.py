"""Checkpoint formats: flashsae's native one and the formats of SAELens, sparsify,
dictionary_learning, OpenAI's sparse_autoencoder and lm-saes / Llama Scope.

    sae  = flashsae.load(path)                    # any format, detected; format= forces one
    saes = flashsae.load_many(run_dir)            # every hookpoint of a multi-SAE directory
    sae.save(path, format="saelens")              # "native" (default), "saelens", "sparsify"

Each format module documents its layout, the forward the original library defines and how flashsae
expresses it. What a format cannot express is a :class:`FormatError` naming the field.
"""

from ._common import FormatError
from .api import FORMATS, SAVE_FORMATS, detect_format, load, load_many, save
from .native import load_checkpoint, save_checkpoint

__all__ = [
    "FORMATS",
    "SAVE_FORMATS",
    "FormatError",
    "detect_format",
    "load",
    "load_checkpoint",
    "load_many",
    "save",
    "save_checkpoint",
]
