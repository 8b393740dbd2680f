"""splice, steer and ablate: replace activations of a running model with an SAE's reconstruction,
an edited reconstruction, or zeros.

The error term. With ``error_term=True`` a spliced hookpoint outputs

    y + (decode(edited latents) - decode(latents))        (y: what the module returned)

i.e. the model's own activation plus the change the edit makes to the reconstruction: the SAE's
reconstruction error ``y - decode(latents)`` is added back, computed from the UNEDITED latents.
Without an edit the output is ``y`` itself, bit for bit. With an edit (steering) the output moves
by exactly the edit's decoded change, so steering acts with the error term on too. (Computing
the error from the edited latents, or recomputing it after the edit, cancels the edit: the known
failure of error-term steering this design avoids.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import boolean, is_number
from ..hookpoints import replace_output, resolve_hookpoint
from ..modules import SAE
from ..outputs import SparseLatents
from ._base import (
    HookContext,
    activation,
    check_mask,
    check_sae,
    check_width,
    decode,
    hookpoint_keys,
    validate_mask,
)

#: An edit: (hookpoint key, latents) -> edited latents of the same leading shape.
Edit = Callable[[Any, SparseLatents], SparseLatents]
STEER_MODES = ("add", "clamp")


class _Spliced:
    """One SAE in a splice: reads `in_path`, writes `out_path` (the same module for an SAE)."""

    def __init__(self, key: Any, in_path: str, out_path: str, sae: SAE) -> None:
        self.key, self.in_path, self.out_path, self.sae = key, in_path, out_path, sae
        self.pending: tuple[torch.Tensor, SparseLatents, torch.Tensor] | None = None


class splice(HookContext):
    """Context manager that replaces hookpoint activations by SAE reconstructions.

        with flashsae.hooks.splice(model, {"transformer.h.3": sae}) as spliced:
            loss = model(**inputs, labels=inputs["input_ids"]).loss   # the model with the SAE inside
        spliced.latents["transformer.h.3"]                              # the latents of that forward

    Args:
        model: any ``torch.nn.Module``.
        saes: ``{hookpoint: sae}``. A key may also be a pair ``(input hookpoint, output hookpoint)``:
            the SAE encodes the first module's output and its reconstruction replaces the second's,
            which is how a transcoder is spliced (e.g. MLP input -> MLP output; a skip transcoder's
            skip path gets the input too). The input module must run before the output module.
        error_term: add back the reconstruction error (module docstring): the model's output is
            unchanged unless ``edit`` changes latents.
        edit: optional ``edit(key, latents) -> latents`` applied to the latents before decoding
            (see :func:`steer`); the edited latents may hold negative values and empty slots
            (index -1).
        mask: optional bool tensor with the activation's leading shape ([batch, tokens]); where it is
            False the module's own activation is kept (special tokens, padding). None: everywhere.

    ``spliced.latents[key]`` holds the unedited latents of the most recent forward. The hooks run
    under ``torch.no_grad`` / ``inference_mode`` / ``generate`` alike, and are removed on exit even
    after an exception. Call ``sae.eval()`` first for the inference rule of BatchTopK.
    """

    def __init__(
        self,
        model: nn.Module,
        saes: Mapping[str | tuple[str, str], SAE],
        *,
        error_term: bool = False,
        edit: Edit | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model)
        if not isinstance(saes, Mapping) or not saes:
            raise ValueError(f"saes: expected a non-empty mapping {{hookpoint: SAE}}, got {saes!r}")
        boolean("error_term", error_term, error=TypeError)
        if edit is not None and not callable(edit):
            raise TypeError(f"edit: expected a callable (key, latents) -> latents, got {type(edit).__name__}")
        self.error_term = error_term
        self.edit = edit
        self.mask = validate_mask(mask)
        self.entries: list[_Spliced] = []
        for key, sae in saes.items():
            check_sae(f"saes[{key!r}]", sae)
            if isinstance(key, tuple) and len(key) == 2:
                in_path, out_path = (resolve_hookpoint(model, path, "saes") for path in key)
            elif isinstance(key, str):
                in_path = out_path = resolve_hookpoint(model, key, "saes")
            else:
                raise TypeError(f"saes: keys are hookpoints or (input hookpoint, output hookpoint) pairs, got {key!r}")
            self.entries.append(_Spliced(key, in_path, out_path, sae))
        written = [entry.out_path for entry in self.entries]
        twice = sorted({path for path in written if written.count(path) > 1})
        if twice:
            raise ValueError(f"saes: more than one SAE replaces the output of {', '.join(twice)}")
        self.latents: dict[Any, SparseLatents] = {}

    def _hooks(self) -> list[tuple[str, Callable[..., Any]]]:
        hooks = []
        for entry in self.entries:
            if entry.in_path == entry.out_path:
                hooks.append((entry.in_path, self._replace_hook(entry, read=True)))
            else:
                hooks.append((entry.in_path, self._read_hook(entry)))
                hooks.append((entry.out_path, self._replace_hook(entry, read=False)))
        return hooks

    def _encode(self, entry: _Spliced, output: Any) -> tuple[torch.Tensor, SparseLatents, torch.Tensor]:
        x = activation(str(entry.key), output)
        check_width(str(entry.key), x, entry.sae)
        x_sae = x.to(entry.sae.device)
        latents = entry.sae.encode(x_sae)
        self.latents[entry.key] = latents
        return x_sae, latents, decode(entry.sae, latents, x_sae)

    def _read_hook(self, entry: _Spliced) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            entry.pending = self._encode(entry, output)

        return hook

    def _replace_hook(self, entry: _Spliced, *, read: bool) -> Callable[..., Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            if read:
                encoded = self._encode(entry, output)
            else:
                if entry.pending is None:
                    raise RuntimeError(
                        f"splice: {entry.out_path} ran before {entry.in_path} in this forward; "
                        "the input hookpoint must run first"
                    )
                encoded, entry.pending = entry.pending, None
            y = activation(str(entry.key), output)
            return replace_output(output, self._replacement(entry, y, *encoded))

        return hook

    def _replacement(
        self, entry: _Spliced, y: torch.Tensor, x: torch.Tensor, latents: SparseLatents, recon: torch.Tensor
    ) -> torch.Tensor:
        if recon.shape != y.shape:
            raise ValueError(
                f"saes: the SAE at {entry.key!r} reconstructs shape {list(recon.shape)}, "
                f"but {entry.out_path} outputs {list(y.shape)}"
            )
        edited = None
        if self.edit is not None:
            edited = self.edit(entry.key, latents)
            if not isinstance(edited, tuple) or len(edited) != 2 or edited[0].shape[:-1] != latents[0].shape[:-1]:
                raise ValueError(
                    f"edit: expected SparseLatents with leading shape {list(latents[0].shape[:-1])} "
                    f"for {entry.key!r}, got {type(edited).__name__}"
                )
            edited = SparseLatents(*edited)
        if self.error_term:
            new = y if edited is None else y + (decode(entry.sae, edited, x) - recon).to(y.device, y.dtype)
        else:
            new = (recon if edited is None else decode(entry.sae, edited, x)).to(y.device, y.dtype)
        mask = check_mask(str(entry.key), self.mask, y)
        return new if mask is None else torch.where(mask.unsqueeze(-1), new, y)

    def _close(self) -> None:
        for entry in self.entries:
            entry.pending = None
        super()._close()


class _Steering:
    """The edit behind :func:`steer`: every row's activation of each steered latent becomes
    ``a + value`` (add) or ``value`` (clamp); a latent that was inactive counts as a = 0."""

    def __init__(self, latents: Mapping[int, float], mode: str, n_latents: int) -> None:
        if mode not in STEER_MODES:
            raise ValueError(f"mode: expected one of {', '.join(STEER_MODES)}, got {mode!r}")
        if not isinstance(latents, Mapping) or not latents:
            raise ValueError(f"latents: expected a non-empty mapping {{latent id: value}}, got {latents!r}")
        for latent, value in latents.items():
            if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < n_latents:
                raise ValueError(f"latents: latent ids are ints in [0, {n_latents}), got {latent!r}")
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(f"latents: the value of latent {latent} must be a finite number, got {value!r}")
        self.mode = mode
        self.ids = torch.tensor(list(latents), dtype=torch.int32)
        self.values = torch.tensor([float(v) for v in latents.values()], dtype=torch.float64)

    def __call__(self, _key: Any, latents: SparseLatents) -> SparseLatents:
        values, indices = latents
        ids = self.ids.to(indices.device)
        steered = self.values.to(device=values.device, dtype=values.dtype)
        hit = indices.unsqueeze(-1) == ids  # [..., m, s]: slot j holds steered latent s
        current = (values.unsqueeze(-1) * hit).sum(-2)  # [..., s]
        target = current + steered if self.mode == "add" else steered.expand_as(current)
        taken = hit.any(-1)
        # the steered latents leave their slots (now empty: value 0, index -1) and come back at the end
        kept_values = values.masked_fill(taken, 0)
        kept_indices = indices.masked_fill(taken, -1)
        new_indices = ids.to(indices.dtype).expand(*indices.shape[:-1], len(ids))
        return SparseLatents(torch.cat([kept_values, target], -1), torch.cat([kept_indices, new_indices], -1))


def steer(
    model: nn.Module,
    hookpoint: str | tuple[str, str],
    sae: SAE,
    latents: Mapping[int, float],
    *,
    mode: str = "add",
    error_term: bool = True,
    mask: torch.Tensor | None = None,
) -> splice:
    """Context manager that steers a model through SAE latents, at every position (prompt and
    generated tokens alike; works during ``model.generate``).

        with flashsae.hooks.steer(model, "transformer.h.3", sae, {1234: 8.0}):
            tokens = model.generate(**prompt, max_new_tokens=20)

    Args:
        hookpoint: where ``sae`` reads and writes (a pair (input, output) for a transcoder).
        latents: ``{latent id: value}``. mode ``"add"`` adds value to the latent's activation (the
            output moves by value * W_dec[latent]; negative values steer away); ``"clamp"`` sets the
            activation to value wherever the latent is active or not (Templeton et al. 2024).
        error_term: True (default): the output is the model's own activation plus the decoded
            change, so only the steered direction changes (see the module docstring); False: the
            SAE's edited reconstruction replaces the activation.
        mask: as for :func:`splice` (positions left alone where False).

    Returns the :class:`splice` context (``.latents`` holds the unsteered latents).
    """
    check_sae("sae", sae)
    steering = _Steering(latents, mode, sae.n_latents)
    return splice(model, {hookpoint: sae}, error_term=error_term, edit=steering, mask=mask)


class ablate(HookContext):
    """Context manager that zero-ablates hookpoints: their activations become zeros (where
    ``mask`` is True, if given). The baseline of CE-loss-recovered.

        with flashsae.hooks.ablate(model, "transformer.h.3"):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
    """

    def __init__(self, model: nn.Module, hookpoints: str | Sequence[str], *, mask: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self.paths = hookpoint_keys(model, hookpoints)
        self.mask = validate_mask(mask)

    def _hooks(self) -> list[tuple[str, Callable[..., Any]]]:
        return [(path, self._hook(key)) for key, path in self.paths.items()]

    def _hook(self, key: str) -> Callable[..., Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            y = activation(key, output)
            mask = check_mask(key, self.mask, y)
            zeros = torch.zeros_like(y)
            return replace_output(output, zeros if mask is None else torch.where(mask.unsqueeze(-1), zeros, y))

        return hook
