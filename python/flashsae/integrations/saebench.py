"""Any flashsae SAE as the object SAEBench's evaluations take for a custom SAE.

    from flashsae.integrations.saebench import to_saebench

    custom = to_saebench(sae, model_name="gpt2", hook_layer=3)   # hook_name: blocks.3.hook_resid_post
    # pass `custom` wherever SAEBench takes an SAE object, e.g. its evals' run_eval(...,
    # selected_saes=[("my_sae", custom)], ...)

What SAEBench reads from a custom SAE (its ``custom_saes/base_sae.py`` interface): ``W_enc``
[d_in, d_sae] and ``W_dec`` [d_sae, d_in] (here views of the flashsae SAE's parameters: no copy,
edits show through), ``b_enc`` [d_sae], ``b_dec`` [d_in], ``encode(x)`` -> dense [..., d_sae]
activations, ``decode(acts)`` -> [..., d_in], ``forward(x)`` -> the reconstruction, ``cfg`` (a
SAEBench ``CustomSAEConfig``: model_name, d_in, d_sae, hook_layer, hook_name, architecture, dtype,
device), ``device`` and ``dtype``. encode runs the SAE's own sparse encoder and scatters its k
latents into the dense tensor SAEBench expects; decode gathers the nonzero activations of each row
(at most the row's count of nonzeros, k for a TopK SAE) and runs flashsae's ``sparse_decode``;
forward decodes the SAE's sparse latents directly (sparse end to end). The adapter is a ``torch.nn.Module`` holding
the SAE as ``adapter.sae``; ``.to(...)`` moves it.

``cfg.architecture`` is SAELens' name of the architecture (standard, topk, jumprelu, gated; the
flashsae name for the rest), which is what SAEBench keys its gated-SAE special case on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules import SAE
from ..ops import sparse_decode
from ._peers import require

#: SAELens / SAEBench architecture names of flashsae's.
SAELENS_NAMES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


class SAEBenchSAE(nn.Module):
    """A flashsae SAE in SAEBench's custom-SAE interface (module docstring). Build with
    :func:`to_saebench`."""

    def __init__(self, sae: SAE, cfg: Any) -> None:
        super().__init__()
        self.sae = sae
        self.cfg = cfg

    # ------------------------------------------------------------------------- SAEBench's fields

    @property
    def W_enc(self) -> torch.Tensor:
        """[d_in, d_sae] view of the SAE's encoder ([d_sae, d_in] rows in flashsae)."""
        return self.sae.W_enc.T

    @property
    def W_dec(self) -> torch.Tensor:
        return self.sae.W_dec

    @property
    def b_enc(self) -> torch.Tensor:
        return self.sae.b_enc

    @property
    def b_dec(self) -> torch.Tensor:
        return self.sae.b_dec

    @property
    def b_mag(self) -> torch.Tensor:
        """A gated SAE's magnitude bias (what SAEBench reports as the encoder bias of gated SAEs)."""
        if self.sae.architecture != "gated":
            raise AttributeError(f"b_mag: a {self.sae.architecture} SAE has none")
        return self.sae.b_mag

    @property
    def device(self) -> torch.device:
        return self.sae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.dtype

    def _apply(self, fn, *args, **kwargs):
        # SAEBench moves SAEs with .to(dtype=the model's dtype, device=...) and reads cfg.dtype / cfg.device
        result = super()._apply(fn, *args, **kwargs)
        self.cfg.dtype = str(self.sae.dtype).removeprefix("torch.")
        self.cfg.device = str(self.sae.device)
        return result

    # ------------------------------------------------------------------------------- computing

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense [..., d_sae] activations of x [..., d_in], from the SAE's sparse encoder."""
        return self.sae.encode(x).to_dense(self.sae.n_latents)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """[..., d_in] reconstruction from dense [..., d_sae] activations, decoded sparsely: each
        row's nonzero activations (padded to the densest row's count) through sparse_decode."""
        if not isinstance(feature_acts, torch.Tensor):
            raise TypeError(f"feature_acts: expected a torch.Tensor, got {type(feature_acts).__name__}")
        if feature_acts.dim() == 0 or feature_acts.shape[-1] != self.sae.n_latents:
            raise ValueError(
                f"feature_acts: expected shape [..., d_sae={self.sae.n_latents}], got {list(feature_acts.shape)}"
            )
        lead = feature_acts.shape[:-1]
        acts = feature_acts.reshape(-1, self.sae.n_latents).to(self.dtype)
        width = max(int((acts != 0).sum(dim=1).max()) if acts.shape[0] else 0, 1)
        # the `width` largest magnitudes of a row hold all of its nonzeros (zeros fill the rest)
        indices = acts.abs().topk(width, dim=1).indices
        values = acts.gather(1, indices).contiguous()
        x_hat = sparse_decode(values, indices.to(torch.int32).contiguous(), self.sae.W_dec, self.sae.b_dec)
        return x_hat.reshape(*lead, self.sae.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's reconstruction of x [..., d_in]: its sparse latents decoded, the same sums in the
        same order as ``decode(encode(x))`` (SAEBench checks that they agree) without the dense
        activations in between."""
        return self.sae.decode(self.sae.encode(x))


def to_saebench(
    sae: SAE,
    *,
    model_name: str,
    hook_layer: int,
    hook_name: str | None = None,
    context_size: int | None = None,
) -> SAEBenchSAE:
    """`sae` as a SAEBench custom SAE for `model_name` (a TransformerLens model name) at layer
    `hook_layer`; hook_name defaults to ``blocks.{hook_layer}.hook_resid_post`` (SAEBench's own
    default). Transcoders (their output is not their input) are refused."""
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a flashsae SAE, got {type(sae).__name__}")
    if sae.architecture == "transcoder":
        raise TypeError("sae: SAEBench evaluates SAEs that reconstruct their input; a transcoder does not")
    if getattr(sae.config, "input_norm", "none") != "none":
        raise ValueError(
            f"sae: input_norm={sae.config.input_norm!r} needs each input's statistics to decode, which "
            "SAEBench's decode(feature_acts) does not pass"
        )
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name: expected a non-empty str, got {model_name!r}")
    if isinstance(hook_layer, bool) or not isinstance(hook_layer, int) or hook_layer < 0:
        raise ValueError(f"hook_layer: expected an int >= 0, got {hook_layer!r}")
    if hook_name is not None and (not isinstance(hook_name, str) or not hook_name):
        raise TypeError(f"hook_name: expected a non-empty str or None, got {hook_name!r}")
    config_module = require(
        "sae_bench.custom_saes.custom_sae_config", package="sae-bench", extra="saebench",
        purpose="flashsae.integrations.saebench",
    )  # fmt: skip
    cfg = config_module.CustomSAEConfig(
        model_name,
        d_in=sae.d_in,
        d_sae=sae.n_latents,
        hook_layer=hook_layer,
        hook_name=hook_name or f"blocks.{hook_layer}.hook_resid_post",
    )
    cfg.architecture = SAELENS_NAMES.get(sae.architecture, sae.architecture)
    cfg.dtype = str(sae.dtype).removeprefix("torch.")
    cfg.device = str(sae.device)
    cfg.apply_b_dec_to_input = bool(getattr(sae.config, "apply_b_dec_to_input", True))
    if context_size is not None:
        cfg.context_size = context_size
    return SAEBenchSAE(sae, cfg)


__all__ = ["SAEBenchSAE", "to_saebench"]
