"""SAE modules: plain torch.nn.Modules on flashsae's sparse kernels, built by name through a
registry (flashsae.create / flashsae.load).

Registered architectures: ``topk`` (TopKSAE, optional Multi-TopK), ``batchtopk`` (BatchTopKSAE),
``matryoshka`` (MatryoshkaSAE), ``jumprelu`` (JumpReLUSAE), ``relu`` (ReLUSAE, ReLU-L1), ``gated``
(GatedSAE), ``transcoder`` (Transcoder, optional skip connection), ``clt``
(CrossLayerTranscoder: one dictionary per layer decoding to that layer and every later one) and
``crosscoder`` (Crosscoder: one dictionary read from and decoded to several sites).

Every SAE has ``unit_norm_decoder`` (True on the base class): True when a training loop should
call remove_decoder_parallel_grads_ before each optimizer step and normalize_decoder_ after it;
False for ReLU-L1 and JumpReLU with the tanh penalty, whose penalties weigh activations by decoder
norms (renormalizing would defeat them).

Schedule state lives in buffers, so checkpoints carry it: ``num_steps`` (L1/L0 warm-ups, the start
of the BatchTopK threshold estimate) and BatchTopK's ``threshold``. A forward in training mode with
autograd enabled counts as one step and updates them, so the plain loop ``out = sae(x, dead_mask=...);
out.loss.backward(); ...`` needs nothing more; with gradient accumulation or a resumed run, set the
count directly: ``sae.num_steps.fill_(step)``. Transcoders take the target too: ``tc(x, y, dead_mask=...)``.

Options that express other libraries' SAEs exactly (flashsae.io loads SAELens, sparsify, dictionary_learning,
OpenAI and lm-saes files with them; each defaults to flashsae's own forward, which a config without the field gets):
TopK ``apply_b_dec_to_input`` and ``input_norm`` ("layer_norm" as OpenAI's TopK SAEs, "constant_norm_rescale"),
Gated ``apply_b_dec_to_input``, JumpReLU ``threshold_parametrization="direct"`` (thresholds stored as given).
"""

from ..registry import REGISTRY, register
from .base import SAE, SAEConfig, create, geometric_median, load
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .clt import CLTOutput, CrossLayerTranscoder, CrossLayerTranscoderConfig
from .crosscoder import Crosscoder, CrosscoderConfig
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
from .relu import ReLUConfig, ReLUSAE
from .topk import TopKConfig, TopKSAE
from .transcoder import Transcoder, TranscoderConfig

__all__ = [
    "REGISTRY",
    "SAE",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "CLTOutput",
    "CrossLayerTranscoder",
    "CrossLayerTranscoderConfig",
    "Crosscoder",
    "CrosscoderConfig",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "TopKConfig",
    "TopKSAE",
    "Transcoder",
    "TranscoderConfig",
    "create",
    "geometric_median",
    "load",
    "register",
]
