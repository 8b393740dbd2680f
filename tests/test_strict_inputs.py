"""Non-floating activations are refused with a TypeError naming the argument, at every entry point of
the table in docs/architectures.md ("What each entry point accepts") and on every backend; floating
ones of another dtype are cast by the modules. The table and the checks here list the same entry points."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import flashsae
from flashsae.ops import batch_topk, sae_loss, sparse_decode, threshold_encode, topk_encode
from flashsae.outputs import SparseLatents
from helpers import backends

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
D, N, K, ROWS = 8, 24, 3, 5
BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.uint8]
BACKENDS = backends("cpu", "torch", "triton")
ARCHITECTURES = {"topk": {"k": K}, "batchtopk": {"k": K}, "matryoshka": {"k": K}, "jumprelu": {}, "relu": {},
                 "gated": {}, "transcoder": {"k": K}}  # fmt: skip


def bad(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape).to(dtype)


def weights() -> dict[str, torch.Tensor]:
    return {"W_enc": torch.randn(N, D), "b_enc": torch.randn(N), "W_dec": torch.randn(N, D), "b_dec": torch.randn(D)}


def _module(arch: str, backend: str) -> flashsae.SAE:
    return flashsae.create(arch, d_in=D, n_latents=N, backend=backend, **ARCHITECTURES[arch])


def _latents(arch: str, backend: str) -> SparseLatents:
    return _module(arch, backend).encode(torch.randn(ROWS, D))


#: (entry point as the docs table writes it, argument) -> calls it with integer/bool `dtype` in that
#: argument, everything else valid, for one architecture / backend.
ENTRY_POINTS = {
    ("sae(x, dead_mask=None)", "x"): lambda arch, be, dt: _module(arch, be)(bad(dt, ROWS, D)),
    ("sae.encode(x)", "x"): lambda arch, be, dt: _module(arch, be).encode(bad(dt, ROWS, D)),
    ("sae.decode(latents)", "latents.values"): lambda arch, be, dt: _module(arch, be).decode(
        SparseLatents(_latents(arch, be).values.to(dt), _latents(arch, be).indices)
    ),
    ("sae.init_b_dec_(x)", "x"): lambda arch, be, dt: _module(arch, be).init_b_dec_(bad(dt, ROWS, D)),
    ("transcoder(x, y)", "y"): lambda arch, be, dt: _module("transcoder", be)(torch.randn(ROWS, D), bad(dt, ROWS, D)),
    # the decoders that read the input too: TopK with an input normalization, a skip transcoder
    ("sae.decode(latents, x)", "x"): lambda arch, be, dt: _decode_with_input(arch, be, dt),
}


def _decode_with_input(arch: str, backend: str, dtype: torch.dtype) -> torch.Tensor:
    options = {"input_norm": "layer_norm"} if arch == "topk" else {"skip": True}
    sae = flashsae.create(arch, d_in=D, n_latents=N, k=K, backend=backend, **options)
    return sae.decode(sae.encode(torch.randn(ROWS, D)), bad(dtype, ROWS, D))


OP_ENTRY_POINTS = {
    ("topk_encode(x, W_enc, b_enc, k, b_dec)", "x"): lambda w, be, x: topk_encode(
        x, w["W_enc"], w["b_enc"], K, w["b_dec"], backend=be
    ),
    ("sparse_decode(values, indices, W_dec, b_dec)", "values"): lambda w, be, x: sparse_decode(
        x[:, :K], torch.zeros(ROWS, K, dtype=torch.int32), w["W_dec"], w["b_dec"], backend=be
    ),
    ("sae_loss(x, values, indices, W_dec, b_dec)", "x"): lambda w, be, x: sae_loss(
        x, torch.rand(ROWS, K), torch.zeros(ROWS, K, dtype=torch.int32), w["W_dec"], w["b_dec"], backend=be
    ),
    ("batch_topk(x, W_enc, b_enc, k, b_dec)", "x"): lambda w, be, x: batch_topk(
        x, w["W_enc"], w["b_enc"], K, w["b_dec"], backend=be
    ),
    ("threshold_encode(x, W_enc, b_enc, threshold, b_dec)", "x"): lambda w, be, x: threshold_encode(
        x, w["W_enc"], w["b_enc"], torch.full((N,), 0.1), w["b_dec"], backend=be
    ),
}


def documented() -> set[tuple[str, str]]:
    """(entry point, argument) of every row of the docs table (one row may name several arguments)."""
    section = DOCS.read_text().split("## What each entry point accepts", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for argument in re.findall(r"`([^`]+)`", cells[1]):
                rows.add((cells[0].strip("`"), argument))
    return rows


def test_the_table_lists_exactly_the_checked_entry_points():
    checked = set(ENTRY_POINTS) | set(OP_ENTRY_POINTS)
    # rows about other argument kinds (masks, indices) are checked by their own tests
    others = {("sae(x, dead_mask=None)", "dead_mask"), ("sae.decode(latents)", "latents.indices"),
              ("sparse_decode(values, indices, W_dec, b_dec)", "indices"),
              ("sae_loss(x, values, indices, W_dec, b_dec)", "values")}  # fmt: skip
    assert documented() - others == checked


MODULE_CASES = [
    pytest.param(entry, arch, id=f"{entry[0]}:{entry[1]}-{arch}")
    for entry in ENTRY_POINTS
    for arch in ARCHITECTURES
    if arch == "transcoder" or not entry[0].startswith("transcoder")
    if arch in ("topk", "transcoder") or entry[0] != "sae.decode(latents, x)"
]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("entry, arch", MODULE_CASES)
def test_module_entry_points_refuse_non_floating_activations(entry, arch, dtype, be):
    # a transcoder's init_b_dec_ takes the target (its argument is y)
    name = "y" if entry[0].startswith("sae.init_b_dec_") and arch == "transcoder" else re.escape(entry[1])
    with pytest.raises(TypeError, match=rf"^{name}: expected a floating-point tensor .*got torch\.{str(dtype)[6:]}"):
        ENTRY_POINTS[entry](arch, be, dtype)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("entry", list(OP_ENTRY_POINTS), ids=lambda e: e[0].split("(")[0])
def test_ops_refuse_non_floating_activations(entry, dtype, be):
    expected = rf"^{re.escape(entry[1])}: expected dtype float32 .*got torch\.{str(dtype)[6:]}"
    with pytest.raises(TypeError, match=expected):
        OP_ENTRY_POINTS[entry](weights(), be, bad(dtype, ROWS, D))


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_refused_under_autocast_too(dtype):
    sae = _module("topk", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"^x: expected a floating-point"):
        sae(bad(dtype, ROWS, D))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_floating_activations_of_another_dtype_are_cast(dtype):
    sae = _module("topk", "cpu")
    x = torch.randn(ROWS, D)
    expected = sae.encode(x.to(dtype).float())
    got = sae.encode(x.to(dtype))
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.values, expected.values)
    rounded = got.values.to(dtype)
    as_float32 = SparseLatents(rounded.float(), got.indices)
    assert torch.equal(sae.decode(SparseLatents(rounded, got.indices)), sae.decode(as_float32))


def test_latent_indices_must_be_integers():
    sae = _module("relu", "cpu")
    latents = sae.encode(torch.randn(ROWS, D))
    with pytest.raises(TypeError, match=r"^latents\.indices: expected dtype int32 or int64, got torch\.float32"):
        sae.decode(SparseLatents(latents.values, latents.indices.float()))
    with pytest.raises(TypeError, match=r"^latents: expected a \(values, indices\) pair"):
        sae.decode(latents.values)
