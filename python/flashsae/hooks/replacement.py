"""replacement: a cross-layer transcoder or a crosscoder spliced into a running model at all of its
sites at once -- the replacement model of attribution graphs (Ameisen et al. 2025).

    with flashsae.hooks.replacement(model, clt, inputs="encoder.layer.*.attention.output",
                                    targets="encoder.layer.*.output.dense") as replaced:
        out = replaced(**batch)             # = model(**batch) with every MLP output predicted by the CLT
    replaced.latents[2]                     # layer 2's latents of that forward

Cross-layer transcoder (one forward pass). Target j's prediction needs the latents of every layer
i <= j: y_hat_j = b_dec_j + sum_{i <= j} latents_i W_dec_i[:, j - i] (+ x_j W_skip_j^T). When input
site i runs, its output x_i goes through encoder i (once per forward: each encoder runs once, as in
the CLT's own forward) and layer i's latents are decoded to all their targets j >= i in one
sparse_decode ([rows, L - i, d_out], kept until the last target has run). When target j runs, its
output is replaced by b_dec_j plus the j - i'th slice of every kept decode (+ the skip path). Without
the error term later layers read what the CLT wrote (the pure replacement: errors compound over the
layers); inputs are read from the spliced model as it runs.

Crosscoder (acausal: every site's reconstruction reads every site, later ones included). Calling
the context runs the model twice: a clean pass that stops after the last site (nothing after it
runs), whose sites are encoded once, then the pass that returns, in which each site's output is
replaced by its reconstruction from the clean sites. Calling the model itself inside a crosscoder's
context raises (no reconstruction exists before its clean pass).

The error term (``error_term=True``): a replaced site outputs ``y.detach() + (y_hat - y_hat.detach())``
(y: what the module returned), which is y bit for bit, with the gradient of the reconstruction:
what flows back to a site goes to the features (and through the encoders to the inputs), none
through the module's own computation. This is ``y_hat + (y - y_hat).detach()`` (circuit-tracer's
replacement model, the error node held constant) without its rounding. With ``mask``, positions
where it is False keep the module's own output (special tokens, padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import boolean
from ..hookpoints import replace_output, resolve_hookpoints
from ..modules import SAE
from ..outputs import SparseLatents
from ._base import HookContext, activation, check_mask, check_sae, validate_mask
from .capture import capture

#: The architectures a replacement splices, and whether each has targets apart from its inputs.
REPLACEABLE = {"clt": True, "crosscoder": False}


def _sites(model: nn.Module, patterns: str | Sequence[str], argument: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{argument}: expected a module path, a glob or a non-empty list of them, got {patterns!r}")
    return resolve_hookpoints(model, list(patterns))


class replacement(HookContext):
    """Context manager that splices a :class:`~flashsae.CrossLayerTranscoder` or a
    :class:`~flashsae.Crosscoder` into `model` at all of its sites (module docstring).

    Args:
        model: any ``torch.nn.Module`` (a transformers model usually).
        sae: a CrossLayerTranscoder (``flashsae.create("clt", ...)`` / ``flashsae.load``) or a Crosscoder.
        inputs: a CLT's input sites (module paths or globs; L modules, paired with the targets in
            model order: layer i reads the i-th), or a crosscoder's S sites.
        targets: a CLT's target sites (L modules, whose outputs it predicts); None for a crosscoder.
        error_term: keep each site's value and pass gradients through the features (module
            docstring); False (default): the reconstructions replace the sites.
        mask: optional bool [batch, tokens]: where False, sites keep the model's own outputs.

    Call the context like the model (``replaced(**batch)``): for a CLT that is the model's own call,
    for a crosscoder the clean pass then the spliced one. ``replaced.latents``: a CLT's per-layer
    SparseLatents (list of L, latents of the spliced pass), a crosscoder's SparseLatents [..., k]
    (of the clean pass). ``replaced.inputs`` and ``replaced.targets`` hold the resolved module paths.
    Call ``sae.eval()`` first where the architecture has an inference rule.
    """

    def __init__(
        self,
        model: nn.Module,
        sae: SAE,
        inputs: str | Sequence[str],
        targets: str | Sequence[str] | None = None,
        *,
        error_term: bool = False,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model)
        check_sae("sae", sae)
        if sae.architecture not in REPLACEABLE:
            raise TypeError(
                f"sae: replacement splices a clt or a crosscoder, got {sae.architecture!r} (splice one SAE with "
                "flashsae.hooks.splice)"
            )
        self.sae = sae
        self.is_clt = REPLACEABLE[sae.architecture]
        self.inputs = _sites(model, inputs, "inputs")
        sites = sae.n_layers if self.is_clt else sae.n_sites
        what = "n_layers" if self.is_clt else "n_sites"
        if len(self.inputs) != sites:
            named = ", ".join(self.inputs)
            raise ValueError(f"inputs: name {len(self.inputs)} modules ({named}); the {what} is {sites}")
        if self.is_clt:
            if targets is None:
                raise ValueError("targets: a clt needs the modules whose outputs it predicts (one per input)")
            self.targets = _sites(model, targets, "targets")
            if len(self.targets) != sites:
                raise ValueError(
                    f"targets: name {len(self.targets)} modules ({', '.join(self.targets)}); the {what} is {sites}"
                )
        elif targets is not None:
            raise ValueError("targets: a crosscoder writes the sites it reads; leave targets None")
        else:
            self.targets = list(self.inputs)
        self.error_term = boolean("error_term", error_term, error=TypeError)
        self.mask = validate_mask(mask)
        self.latents: Any = [None] * sites if self.is_clt else None
        self._decoded: list[torch.Tensor | None] = [None] * sites  # CLT: layer i's decode to targets >= i
        self._x: list[torch.Tensor | None] = [None] * sites  # CLT with skip: each layer's input
        self._recon: torch.Tensor | None = None  # crosscoder: [..., S, d] from the clean pass

    # ------------------------------------------------------------------------------------ hooks

    def _hooks(self) -> list[tuple[str, Callable[..., Any]]]:
        # every read before every write: an input site that is also a target is read as the module
        # returned it (hooks on one module run in registration order)
        reads = [(path, self._read_hook(i)) for i, path in enumerate(self.inputs)] if self.is_clt else []
        return reads + [(path, self._write_hook(j)) for j, path in enumerate(self.targets)]

    def _read_hook(self, i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            clt = self.sae
            if i == 0:  # a new forward: what an earlier one left (one cut short) is dropped
                self._decoded = [None] * clt.n_layers
                self._x = [None] * clt.n_layers
            x = activation(self.inputs[i], output)
            if x.dim() == 0 or x.shape[-1] != clt.d_in:
                raise ValueError(f"inputs: {self.inputs[i]} gives activations of shape {list(x.shape)}, but the clt "
                                 f"takes d_in={clt.d_in}")  # fmt: skip
            x = x.to(clt.device)
            latents = clt.encode_layer(x, i)
            self.latents[i] = latents
            self._decoded[i] = clt.decode_layer(latents, i)
            if clt.config.skip:
                self._x[i] = x

        return hook

    def _write_hook(self, j: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            y = activation(self.targets[j], output)
            y_hat = self._clt_prediction(j) if self.is_clt else self._crosscoder_site(j)
            if y_hat.shape != y.shape:
                raise ValueError(
                    f"targets: the {self.sae.architecture} predicts shape {list(y_hat.shape)} for {self.targets[j]}, "
                    f"which outputs {list(y.shape)}"
                )
            y_hat = y_hat.to(y.device, y.dtype)
            new = y.detach() + (y_hat - y_hat.detach()) if self.error_term else y_hat
            mask = check_mask(self.targets[j], self.mask, y)
            return replace_output(output, new if mask is None else torch.where(mask.unsqueeze(-1), new, y))

        return hook

    def _clt_prediction(self, j: int) -> torch.Tensor:
        clt = self.sae
        # a per-layer transcoder set (cross_layer=False) reads only its own layer's decode
        sources = range(j + 1) if clt.config.cross_layer else (j,)
        missing = [self.inputs[i] for i in sources if self._decoded[i] is None]
        if missing:
            raise RuntimeError(
                f"replacement: {self.targets[j]} ran before {', '.join(missing)} in this forward; a clt's target j "
                "needs the inputs of layers 0..j first"
            )
        total = getattr(clt, f"b_dec_{j}")
        for i in sources:
            total = total + self._decoded[i][..., j - i if clt.config.cross_layer else 0, :]
        if clt.config.skip:
            total = total + self._x[j] @ getattr(clt, f"W_skip_{j}").T
        if j == clt.n_layers - 1:  # the last target: the kept decodes are no longer needed
            self._decoded = [None] * clt.n_layers
            self._x = [None] * clt.n_layers
        return total

    def _crosscoder_site(self, s: int) -> torch.Tensor:
        if self._recon is None:
            raise RuntimeError(
                "replacement: a crosscoder reads every site before it writes the first; call the context "
                "(replaced(**inputs)), which runs the clean pass first, not the model"
            )
        return self._recon[..., s, :]

    # ------------------------------------------------------------------------------------ calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output on these arguments with the sites replaced (module docstring)."""
        if not self.active:
            raise RuntimeError("replacement: call it inside its with block")
        if self.is_clt:
            return self.model(*args, **kwargs)
        cc = self.sae
        # the clean pass: this context's hooks come off for it (they would replace the sites)
        self._close()
        try:
            with capture(self.model, self.inputs, detach=not torch.is_grad_enabled(), stop=True) as acts:
                self.model(*args, **kwargs)
        finally:
            self._open()
        x = torch.stack([acts[path] for path in self.inputs], dim=-2)
        if x.shape[-1] != cc.d_in:
            raise ValueError(f"inputs: the sites give width {x.shape[-1]}, but the crosscoder takes d_in={cc.d_in}")
        x = x.to(cc.device)
        latents = cc.encode(x)
        self.latents = SparseLatents(*latents)
        self._recon = cc.decode(latents)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._recon = None

    def _close(self) -> None:
        self._decoded = [None] * len(self._decoded)
        self._x = [None] * len(self._x)
        super()._close()
