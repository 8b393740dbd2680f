"""flashsae and SAELens in one process: convert loaded SAEs both ways, and train with SAELens'
trainer on flashsae's kernels.

    import flashsae.integrations.saelens as fs_saelens

    sae = fs_saelens.from_saelens(saelens_sae)       # a SAELens SAE object -> a flashsae SAE
    saelens_sae = fs_saelens.to_saelens(sae)         # and back: a sae_lens.SAE, same outputs

    cfg = fs_saelens.FlashTopKTrainingSAEConfig(d_in=768, d_sae=16384, k=32)
    # cfg goes wherever SAELens takes a TopKTrainingSAEConfig (LanguageModelSAERunnerConfig(sae=cfg),
    # TrainingSAE.from_dict({"architecture": "flashsae_topk", ...}), SAETrainer(...)).

The conversion is the on-disk SAELens converter (:mod:`flashsae.io.saelens`) without the files: the
same field mapping (``from_parts`` / ``to_parts``), so ``from_saelens(sae)`` is what saving ``sae``
with SAELens and ``flashsae.load`` of that directory give.

The training architecture ``"flashsae_topk"`` is registered in SAELens' own registry
(``sae_lens.register_sae_training_class``) the first time anything here needs SAELens. It is SAELens'
TopK training SAE (same config fields, same initialization, same losses and gradients: mse_loss =
sum over features of the squared error, mean over tokens; SAELens' AuxK loss over the top d_in / 2
dead pre-activations; rescale_acts_by_decoder_norm) whose training step runs flashsae's ops:
``topk_encode`` selects the k latents without the dense [batch, d_sae] pre-activations, ``sae_loss``
decodes them and scores the reconstruction in one fused sparse pass, and the AuxK term multiplies
the dead latents' encoder columns only (a [batch, n_dead] GEMM) and decodes with ``sparse_decode``.
``feature_acts`` and ``hidden_pre`` in its TrainStepOutput are sparse COO tensors holding the k
selected latents (SAELens' trainer reads them with ``.bool()`` and sums, which COO supports); the
dense pre-activations are exactly what flashsae never builds. The encoder weight is stored as the
transpose of a [d_sae, d_in] matrix, the layout topk_encode reads, behind SAELens' [d_in, d_sae]
``W_enc`` (saved contiguous). Saved inference SAEs are plain SAELens ``topk`` SAEs.

SAELens' normalize_activations "layer_norm" and "constant_norm_rescale" run inside the SAE's forward
and are refused by this architecture (ValueError); "none", "expected_average_only_in" and
"covariance_whitening" are applied by SAELens' trainer outside the SAE and work.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from ..io import _common
from ..io import saelens as saelens_format
from ._peers import require

#: SAELens' architecture name for the flashsae-backed TopK training SAE.
ARCHITECTURE = "flashsae_topk"
#: normalize_activations values SAELens applies outside the SAE's forward (in its trainer).
TRAINER_SIDE_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")

_CLASSES: dict[str, type] = {}


def _sae_lens():
    return require("sae_lens", package="sae-lens", extra="saelens", purpose="flashsae.integrations.saelens")


# ------------------------------------------------------------------------------------ conversion


def from_saelens(
    sae: Any,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
):
    """A flashsae SAE computing what the loaded SAELens SAE `sae` computes (``sae_lens.SAE`` or a
    training SAE, any of SAELens' standard, topk, jumprelu and gated architectures, and
    ``flashsae_topk``). dtype / device default to `sae`'s; backend: flashsae's kernel backend."""
    sae_lens = _sae_lens()
    if not isinstance(sae, sae_lens.SAE):
        raise TypeError(f"sae: expected a sae_lens.SAE, got {type(sae).__name__}")
    config = sae.cfg.to_dict()
    if config.get("architecture") == ARCHITECTURE:  # trained here: SAELens TopK weights and fields
        config["architecture"] = "topk"
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    # an SAE built in memory carries no format version; it is this SAELens' (>= 6) layout
    metadata.setdefault("sae_lens_version", importlib.metadata.version("sae-lens"))
    config["metadata"] = metadata
    tensors = {name: tensor.detach() for name, tensor in sae.state_dict().items()}
    placement = _common.Placement(device=device if device is not None else sae.W_dec.device, dtype=dtype,
                                  backend=backend)  # fmt: skip
    return saelens_format.from_parts(config, tensors, placement=placement, where="sae.cfg", weights_where="sae")


def to_saelens(sae: Any, *, device: torch.device | str | None = None):
    """A ``sae_lens.SAE`` computing what the flashsae SAE `sae` computes (architectures SAELens can
    express: topk, relu, jumprelu, gated, batchtopk, matryoshka; a FormatError names what it cannot).
    Its config is what ``sae.save(path, format="saelens")`` writes; device defaults to `sae`'s."""
    from ..modules import SAE

    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a flashsae SAE, got {type(sae).__name__}")
    sae_lens = _sae_lens()
    config, tensors, _state = saelens_format.to_parts(sae)
    config["device"] = str(device if device is not None else sae.device)
    result = sae_lens.SAE.from_dict(config)
    result.load_state_dict({name: tensor.to(result.device) for name, tensor in tensors.items()})
    return result


# -------------------------------------------------------------------------------------- training


def register() -> tuple[type, type]:
    """Defines the ``flashsae_topk`` training SAE and its config and registers them in SAELens'
    training registry (once; later calls return the same classes)."""
    if not _CLASSES:
        _define_training_classes()
    return _CLASSES["FlashTopKTrainingSAE"], _CLASSES["FlashTopKTrainingSAEConfig"]


def __getattr__(name: str) -> Any:
    if name in ("FlashTopKTrainingSAE", "FlashTopKTrainingSAEConfig"):
        register()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_training_classes() -> None:
    from dataclasses import dataclass

    from torch import nn

    from ..ops import sae_loss, sparse_decode, topk_encode

    sae_lens = _sae_lens()
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
    from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    @dataclass
    class FlashTopKTrainingSAEConfig(TopKTrainingSAEConfig):
        """SAELens' TopKTrainingSAEConfig, trained on flashsae's kernels (architecture "flashsae_topk")."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.normalize_activations not in TRAINER_SIDE_NORMALIZATIONS:
                raise ValueError(
                    f"normalize_activations: {self.normalize_activations!r} runs inside the SAE's forward, which "
                    f"flashsae_topk does not; use one of {', '.join(TRAINER_SIDE_NORMALIZATIONS)} or SAELens' topk"
                )

        @classmethod
        def architecture(cls) -> str:
            return ARCHITECTURE

        def get_inference_config_class(self) -> type:
            return TopKSAEConfig  # the trained SAE is a plain SAELens topk SAE

    class FlashTopKTrainingSAE(TopKTrainingSAE):
        """SAELens' TopKTrainingSAE whose training step runs flashsae's sparse ops (module docstring)."""

        def initialize_weights(self) -> None:
            super().initialize_weights()
            # same values (and random draws) as SAELens' TopK; stored [d_sae, d_in] row-major, the
            # layout topk_encode reads, so W_enc.T costs no copy per step
            self.W_enc = nn.Parameter(self.W_enc.data.T.contiguous().T)

        def _encoder_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            """(encoder rows [d_sae, d_in], encoder bias, decoder norms or None): with
            rescale_acts_by_decoder_norm the scores are pre * |W_dec_i|, i.e. rows and bias times it."""
            rows = self.W_enc.T
            if not rows.is_contiguous():  # e.g. after SAELens' fold_W_dec_norm rewrote W_enc
                rows = rows.contiguous()
            if not self.cfg.rescale_acts_by_decoder_norm:
                return rows, self.b_enc, None
            norms = self.W_dec.norm(dim=-1)
            return rows * norms.unsqueeze(1), self.b_enc * norms, norms

        def _input_rows(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 0 or x.shape[-1] != self.cfg.d_in:
                raise ValueError(f"x: expected shape [..., d_in={self.cfg.d_in}], got {list(x.shape)}")
            return self.hook_sae_input(x.to(self.dtype)).reshape(-1, self.cfg.d_in).contiguous()

        def _input_bias(self) -> torch.Tensor | None:
            return self.b_dec if self.cfg.apply_b_dec_to_input else None

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            """Dense [..., d_sae] feature activations (SAELens' interface), selected by topk_encode."""
            rows = self._input_rows(x)
            weight, bias, _ = self._encoder_rows()
            values, indices = topk_encode(rows, weight, bias, self.cfg.k, self._input_bias())
            dense = torch.zeros(rows.shape[0], self.cfg.d_sae, dtype=values.dtype, device=values.device)
            dense = dense.scatter(1, indices.long(), values)
            return self.hook_sae_acts_post(dense.reshape(*x.shape[:-1], self.cfg.d_sae))

        def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
            x = step_input.sae_in
            rows = self._input_rows(x)
            weight, bias, norms = self._encoder_rows()
            k = self.cfg.k
            values, indices = topk_encode(rows, weight, bias, k, self._input_bias())
            # decode divides by the decoder norm again: x_hat = sum_j (v_j / |W_dec_j|) W_dec_j + b_dec
            decoded = values if norms is None else values / norms[indices.long()]
            loss = sae_loss(rows, decoded, indices, self.W_dec, self.b_dec)
            mse_loss = loss.mse * self.cfg.d_in  # SAELens: squared error summed over features, mean over rows
            aux = self._aux_loss(rows, loss.x_hat, step_input.dead_neuron_mask, weight, bias, norms)
            batch = rows.shape[0]
            coordinates = torch.stack(
                [torch.arange(batch, device=rows.device).repeat_interleave(k), indices.reshape(-1).long()]
            )
            # valid by construction (row ids, topk_encode's latent ids): torch's invariant check is skipped
            selected = torch.sparse_coo_tensor(
                coordinates, values.detach().reshape(-1), (batch, self.cfg.d_sae), check_invariants=False
            )
            return TrainStepOutput(
                sae_in=x,
                sae_out=self.hook_sae_recons(loss.x_hat).reshape(x.shape),
                feature_acts=selected,
                hidden_pre=selected,
                loss=mse_loss + aux,
                losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux},
            )

        def _aux_loss(self, rows, x_hat, dead_mask, weight, bias, norms) -> torch.Tensor:
            """SAELens' TopK AuxK loss: the top min(d_in // 2, n_dead) dead pre-activations (signed, as
            SAELens takes them) reconstruct the detached residual; weight aux_loss_coefficient times
            min(n_dead / (d_in // 2), 1). Only the dead latents' encoder rows are multiplied."""
            if dead_mask is None or (n_dead := int(dead_mask.sum())) == 0:
                return x_hat.new_zeros(())
            k_aux = self.cfg.d_in // 2
            scale = min(n_dead / k_aux, 1.0)
            k_aux = min(k_aux, n_dead)
            dead = dead_mask.nonzero().squeeze(1)
            centered = rows - self.b_dec if self.cfg.apply_b_dec_to_input else rows
            pre = torch.addmm(bias[dead], centered, weight[dead].T)
            top = pre.topk(k_aux, dim=-1, sorted=False)
            aux_indices = dead[top.indices]
            aux_values = top.values if norms is None else top.values / norms[aux_indices]
            zero_bias = torch.zeros_like(self.b_dec, requires_grad=False)
            recons = sparse_decode(aux_values, aux_indices.to(torch.int32), self.W_dec, zero_bias)
            residual = (rows - x_hat).detach()
            return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

        def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
            super().process_state_dict_for_saving(state_dict)
            state_dict["W_enc"] = state_dict["W_enc"].contiguous()  # safetensors writes contiguous tensors

        def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
            state_dict["W_enc"] = state_dict["W_enc"].contiguous()
            super().process_state_dict_for_saving_inference(state_dict)

    FlashTopKTrainingSAEConfig.__module__ = __name__
    FlashTopKTrainingSAE.__module__ = __name__
    if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        sae_lens.register_sae_training_class(ARCHITECTURE, FlashTopKTrainingSAE, FlashTopKTrainingSAEConfig)
    _CLASSES["FlashTopKTrainingSAE"] = FlashTopKTrainingSAE
    _CLASSES["FlashTopKTrainingSAEConfig"] = FlashTopKTrainingSAEConfig


__all__ = ["ARCHITECTURE", "from_saelens", "register", "to_saelens"]
