"""Inference hooks: context managers over any torch model (Hugging Face transformers first).

    from flashsae.hooks import capture, splice, steer, ablate

    with capture(model, "transformer.h.3", saes={"transformer.h.3": sae}) as acts:
        model(**inputs)                       # acts["transformer.h.3"], acts.latents["transformer.h.3"]
    with splice(model, {"transformer.h.3": sae}):
        loss = model(**inputs, labels=inputs["input_ids"]).loss      # the SAE inside the model
    with steer(model, "transformer.h.3", sae, {1234: 8.0}):          # error term on by default
        tokens = model.generate(**prompt, max_new_tokens=20)
    with ablate(model, "transformer.h.3"):
        ...                                   # that hookpoint outputs zeros
    with replacement(model, clt, inputs="transformer.h.*.ln_2", targets="transformer.h.*.mlp") as replaced:
        logits = replaced(**inputs).logits    # every MLP output predicted by a cross-layer transcoder

Hookpoints are module paths or globs (flashsae.hookpoints; the base model's prefix is optional).
Modules returning tuples (hidden_states, ...) or ModelOutputs are read and rewritten at their first
element. Every hook is registered on enter and removed on exit, also when the body raised. The
hooks work under ``torch.no_grad``, ``torch.inference_mode``, with autograd on, and during
``model.generate``. Contexts nest; hooks on one module run in the order the contexts were entered.
"""

from .capture import Captured, capture
from .replacement import replacement
from .splice import STEER_MODES, ablate, splice, steer

__all__ = ["STEER_MODES", "Captured", "ablate", "capture", "replacement", "splice", "steer"]
