"""The interface every flashsae SAE shares, and the registry that builds and loads them by name.

An architecture is a subclass of :class:`SAE` with a config dataclass (a docstring per field,
validated on construction) and a registered name::

    sae = flashsae.create("topk", d_in=768, n_latents=24576, k=32)
    out = sae(x)                 # ForwardOutput(..., loss): loss is the whole training objective
    out.loss.backward()
    sae.save("run/sae")          # cfg.json + sae.safetensors, atomically
    sae = flashsae.load("run/sae")   # the right class, from cfg.json
    sae.save("out", format="saelens")        # or "sparsify" (flashsae.io: every format)
    sae = flashsae.load("gemma-scope-dir")   # SAELens, sparsify, dictionary_learning, OpenAI, lm-saes

Every SAE holds ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d] (one row per latent in both
matrices) and ``b_dec`` [d]; architectures add their own parameters or buffers.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import _backend
from .._checks import FLOAT_DTYPES, check_floating, positive_int
from ..io import api as io_api
from ..ops._common import row_blocks
from ..outputs import ForwardOutput, SparseLatents
from ..registry import architecture_class


#: Rows of a weight matrix initialized at a time (16M elements: a 64 MiB float32 block). Whole at once,
#: the float32 draw of a 5.6M x 4096 bf16 SAE would add 88 GiB to the 88 GiB of weights.
INIT_CHUNK_ELEMENTS = 1 << 24


def unit_rows(block: torch.Tensor) -> torch.Tensor:
    """The rows of a float32 block scaled to unit L2 norm (in place)."""
    return block.div_(block.norm(dim=1, keepdim=True))


class ConfigField:
    """A read-only SAE attribute that is the config field of the same name (``sae.k`` is
    ``sae.config.k``), declared as ``k = ConfigField()`` in the class body."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else getattr(instance.config, self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        raise AttributeError(f"{self.name} is a config field; build a new SAE to change it")


@dataclass
class SAEConfig:
    """Fields every architecture has. Subclasses add theirs and extend ``__post_init__``."""

    d_in: int
    """Width d of the activations the SAE encodes."""
    n_latents: int
    """Dictionary size n (number of latents)."""

    def __post_init__(self) -> None:
        positive_int("d_in", self.d_in)
        positive_int("n_latents", self.n_latents)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def geometric_median(points: torch.Tensor, *, max_iter: int = 100, rtol: float = 1e-6) -> torch.Tensor:
    """Geometric median of the rows of `points` [m, d] by Weiszfeld's iteration, started at the mean
    (float64 math). More robust to outlier activations than the mean (Bricken et al. 2023)."""
    pts = points.detach().to(torch.float64)
    guess = pts.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (pts - guess).norm(dim=1).clamp_min(1e-12)
        new = (weights.unsqueeze(1) * pts).sum(0) / weights.sum()
        moved = (new - guess).norm()
        guess = new
        if moved <= rtol * guess.norm().clamp_min(1e-12):
            break
    return guess


def sample_center(rows: torch.Tensor, method: str) -> torch.Tensor:
    """The center of a data sample [m, d] that b_dec starts at: its geometric median or its mean
    (float64)."""
    if method == "geometric_median":
        return geometric_median(rows)
    if method == "mean":
        return rows.to(torch.float64).mean(0)
    raise ValueError(f"method: expected 'geometric_median' or 'mean', got {method!r}")


class SAE(nn.Module):
    """Base class of flashsae's sparse autoencoders (plain ``nn.Module``s).

    Subclasses set ``architecture`` (the registry name) and ``config_class``, create their
    parameters in ``__init__`` (after calling ``super().__init__(config, ...)``), and implement
    :meth:`encode`, :meth:`decode` and :meth:`forward`.

    ``metadata`` is a JSON-serializable dict saved with the checkpoint (model name, hookpoint,
    training settings...); flashsae never interprets it.
    """

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    #: Whether a training loop keeps decoder rows at unit norm: remove_decoder_parallel_grads_()
    #: before each optimizer step and normalize_decoder_() after it. Architectures whose penalty
    #: weighs activations by decoder norms (ReLU-L1, JumpReLU with tanh) set it False.
    unit_norm_decoder: bool = True

    def __init__(
        self,
        config: SAEConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config: expected a {self.config_class.__name__}, got {type(config).__name__}")
        dtype = dtype or torch.float32
        if dtype not in FLOAT_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            raise TypeError(f"dtype: expected one of {names}, got {dtype}")
        self.config = config
        self.backend = None if backend is None else _backend.requested_backend(backend)
        self.metadata: dict[str, Any] = {}
        self._init_dtype, self._init_device = dtype, device

    # ------------------------------------------------------------------------------ parameters

    def init_weights_(self) -> None:
        """Creates W_enc, b_enc, W_dec, b_dec as Gao et al. (2024) initialize them: decoder rows
        random with unit norm, encoder = decoder (tied at init), zero biases."""
        n, d = self.config.n_latents, self.config.d_in
        dtype, device = self._init_dtype, self._init_device
        W_dec = torch.empty(n, d, dtype=dtype, device=device)
        W_enc = torch.empty_like(W_dec)
        for rows in row_blocks(n, d, INIT_CHUNK_ELEMENTS):
            decoder = unit_rows(torch.randn(rows.stop - rows.start, d, dtype=torch.float32, device=device))
            W_dec[rows] = decoder
            W_enc[rows] = decoder
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    d_in = ConfigField()
    n_latents = ConfigField()

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
        return f"{fields}, dtype={self.dtype}"

    # ------------------------------------------------------------------------- the interface

    def encode(self, x: torch.Tensor) -> SparseLatents:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    def decode(self, latents: SparseLatents) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement decode")

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def _rows(
        self, x: torch.Tensor, name: str = "x", width: int | None = None, width_name: str = "d_in"
    ) -> torch.Tensor:
        """x [..., width] (default d_in) as contiguous [rows, width] in the SAE's dtype. Floating
        inputs of any dtype are cast; integer or bool ones raise TypeError naming `name`."""
        width = self.d_in if width is None else width
        check_floating(name, x)
        if x.dim() == 0 or x.shape[-1] != width:
            raise ValueError(f"{name}: expected shape [..., {width_name}={width}], got {list(x.shape)}")
        return x.reshape(-1, width).to(self.dtype).contiguous()

    # ---------------------------------------------------------------------- training helpers

    @torch.no_grad()
    def init_b_dec_(self, x: torch.Tensor, method: str = "geometric_median") -> None:
        """Sets b_dec from a data sample x [..., d_in]: its geometric median (default) or mean."""
        rows = self._rows(x)
        self.b_dec.copy_(sample_center(rows, method).to(self.dtype))

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Rescales every decoder row to unit L2 norm (rows of norm < eps are left as they are)."""
        norms = self.W_dec.float().norm(dim=1, keepdim=True)
        self.W_dec.div_(torch.where(norms < eps, torch.ones_like(norms), norms).to(self.dtype))

    @torch.no_grad()
    def remove_decoder_parallel_grads_(self) -> None:
        """Removes from W_dec.grad its component along each decoder row, so a step followed by
        normalize_decoder_ moves rows along the unit sphere (Bricken et al. 2023). No-op without grad."""
        grad = self.W_dec.grad
        if grad is None:
            return
        rows = self.W_dec.float()
        along = torch.linalg.vecdot(grad.float(), rows) / torch.linalg.vecdot(rows, rows).clamp_min(1e-12)
        grad.sub_((along.unsqueeze(1) * rows).to(grad.dtype))

    # ------------------------------------------------------------------------------ save/load

    def save(self, path: str | os.PathLike, format: str = "native") -> None:
        """Writes the SAE to the directory `path`, atomically: the native checkpoint (cfg.json +
        sae.safetensors; every field round-trips) or, with format="saelens" / "sparsify", that
        library's layout (see flashsae.io; what it cannot express raises a FormatError naming the field)."""
        io_api.save(self, path, format=format)

    @classmethod
    def from_config(cls, config: SAEConfig, **placement: Any) -> SAE:
        """A fresh SAE of this class from its config; placement: dtype, device, backend as for
        :class:`SAE` (subclass constructors may take plain arguments; this is the uniform entry
        point the registry and load use)."""
        sae = cls.__new__(cls)
        SAE.__init__(sae, config, **placement)
        sae._build()
        return sae

    def _build(self) -> None:
        """Creates the parameters of a freshly configured SAE (default: init_weights_)."""
        self.init_weights_()

    @classmethod
    def load(cls, path: str | os.PathLike, **options: Any) -> SAE:
        """Loads an SAE saved by :meth:`save` or by another library; options (format, subfolder,
        device, dtype, backend) as for :func:`flashsae.load`. Called on SAE itself it picks the class;
        on a subclass the SAE must be of that architecture."""
        return io_api.load(path, sae_class=None if cls is SAE else cls, **options)


class KeywordConfigSAE(SAE):
    """An SAE whose constructor takes its config's fields, ``Cls(d_in, n_latents, *required, **options)``:
    one constructor for every architecture instead of a copy per class. ``required_fields`` names the
    config fields the constructor needs after n_latents (by position or keyword), e.g. TopK's k."""

    required_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *required: Any,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        **options: Any,
    ) -> None:
        name = type(self).__name__
        if len(required) > len(self.required_fields):
            expected = 2 + len(self.required_fields)
            raise TypeError(f"{name}: takes {expected} positional arguments, got {2 + len(required)}")
        for field, value in zip(self.required_fields, required, strict=False):
            if field in options:
                raise TypeError(f"{name}: got {field} both by position and by keyword")
            options[field] = value
        missing = [field for field in self.required_fields if field not in options]
        if missing:
            raise TypeError(f"{name}: missing required argument(s) {', '.join(missing)}")
        config = self.config_class(d_in=d_in, n_latents=n_latents, **options)
        super().__init__(config, dtype=dtype, device=device, backend=backend)
        self._build()


def create(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    **config: Any,
) -> SAE:
    """A new SAE of the architecture `name` (see ``REGISTRY``), configured by keyword arguments,
    e.g. ``create("topk", d_in=768, n_latents=24576, k=32)``."""
    cls = architecture_class(name)
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        fields = sorted(known)
        raise TypeError(f"{name}: unexpected config field(s) {unknown}; {cls.config_class.__name__} has {fields}")
    return cls.from_config(cls.config_class(**config), dtype=dtype, device=device, backend=backend)


#: flashsae.load: any SAE flashsae reads (see flashsae.io.api.load).
load = io_api.load
