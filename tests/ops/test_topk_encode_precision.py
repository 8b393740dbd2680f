"""topk_encode's precisions on the cpu backend: "certified" equals "exact" bit for bit, both equal the
canonical definition (the float64 pre-activation rounded once to float32), the bound holds on
adversarial inputs (near-ties at the k-th place, rows and latents of extreme norms), rows it cannot
certify are recomputed and counted, gradients are unchanged; "fast" stays within bfloat16 accuracy."""

import importlib

import pytest
import torch

from flashsae.modules import TopKConfig, TopKSAE
from flashsae.ops import topk_encode, topk_encode_stats
from flashsae.train import TrainConfig
from helpers import assert_valid_topk, f64, sae_tensors

cpu_path = importlib.import_module("flashsae.ops._topk_encode_cpu")

LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37, 97, 1000, 7, 0), (64, 50, 777, 11, 13), (5, 8, 40, 40, 3), (1, 33, 300, 5, 0)]
SHAPE_IDS = ["odd", "aux", "k_eq_n", "one_row"]


def canonical_topk(x, W_enc, b_enc, k, b_dec, dead_mask=None, aux_k=0):
    """The definition: S = float32((x - b_dec) . W + b_enc evaluated in float64), top-k of relu(S)
    by a stable descending sort, values rounded to x's dtype; aux slots past the dead latents (0, -1)."""
    xd, Wd = x.double(), W_enc.double()
    bias = b_enc.double() - (Wd @ b_dec.double() if b_dec is not None else 0.0)
    act = (xd @ Wd.T + bias).float().clamp_min(0.0)
    top = torch.sort(act, dim=1, descending=True, stable=True)
    out = [top.values[:, :k].to(x.dtype), top.indices[:, :k].to(torch.int32)]
    if aux_k:
        masked = act.masked_fill(~dead_mask, float("-inf"))
        aux = torch.sort(masked, dim=1, descending=True, stable=True)
        empty = aux.values[:, :aux_k] == float("-inf")
        out += [aux.values[:, :aux_k].masked_fill(empty, 0.0).to(x.dtype), aux.indices[:, :aux_k].to(torch.int32).masked_fill(empty, -1)]
    return out


def encode_all(t, k, dead_mask=None, aux_k=0, precisions=("exact", "certified")):
    return {
        p: topk_encode(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead_mask=dead_mask, aux_k=aux_k, backend="cpu", precision=p)
        for p in precisions
    }


def assert_equal_outputs(a, b, what):
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.dtype == v.dtype and torch.equal(u, v), f"{what}: output {i} differs"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_certified_equals_exact_equals_definition(dtype, shape, tile_elements):
    rows, d, n, k, aux_k = shape
    t = sae_tensors(rows, d, n, dtype)
    dead = torch.rand(n) < 0.3 if aux_k else None
    out = encode_all(t, k, dead, aux_k)
    assert_equal_outputs(out["exact"], out["certified"], "certified vs exact")
    assert_equal_outputs(out["exact"], canonical_topk(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead, aux_k), "exact vs definition")
    r = f64(t)
    acts = ((r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]).relu()
    assert_valid_topk(acts, out["exact"][0], out["exact"][1], dtype)  # and against the float64 reference


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_fast_is_within_low_precision_accuracy(dtype):
    t = sae_tensors(40, 64, 900, dtype)
    values, indices = topk_encode(t["x"], t["W_enc"], t["b_enc"], 9, t["b_dec"], backend="cpu", precision="fast")
    r = f64(t)
    acts = ((r["x"] - r["b_dec"]) @ r["W_enc"].T + r["b_enc"]).relu()
    picked = acts.gather(1, indices.long())
    # bfloat16 scores: each value within a few bf16 roundings of its latent's exact activation, and the
    # k-th value within that of the exact k-th
    scale = acts.abs().max()
    assert (values.double() - picked).abs().max() <= 2e-2 * scale
    assert (values.double()[:, -1] - acts.topk(9, dim=1).values[:, -1]).abs().max() <= 2e-2 * scale


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_near_ties_at_the_kth_place(dtype):
    # 60 latents that are one latent scaled by 1 + j * 2^-20: their scores differ by far less than the
    # bfloat16 bound, and more of them than the margin straddle the k-th place, so certification must
    # fail for those rows and the recompute decide, down to float32 ties broken by index
    rows, d, n, k = 24, 48, 500, 10
    t = sae_tensors(rows, d, n, dtype)
    W = t["W_enc"].double()
    group = torch.arange(100, 160)
    W[group] = W[7] * (1 + (group - 100).double().unsqueeze(1) * 2.0**-20)
    W[200:260] = W[7]  # exact duplicates: exact ties
    t["W_enc"] = W.to(dtype)
    t["b_enc"] = torch.zeros(n, dtype=dtype)
    t["x"][: rows // 2] = (W[7] * 3).to(dtype)  # rows whose top-k are all inside the tied groups
    out = encode_all(t, k, precisions=("exact",))
    topk_encode_stats(reset=True)
    out.update(encode_all(t, k, precisions=("certified",)))
    assert topk_encode_stats().recomputed_rows >= rows // 2  # the bfloat16 bound cannot separate them
    assert_equal_outputs(out["exact"], out["certified"], "certified vs exact")
    assert_equal_outputs(out["exact"], canonical_topk(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"]), "exact vs definition")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_rows_and_latents_of_extreme_norms(dtype):
    rows, d, n, k, aux_k = 30, 40, 600, 8, 6
    t = sae_tensors(rows, d, n, dtype)
    span = 1e3 if dtype == torch.float16 else 1e6  # float16 overflows past ~6e4
    t["x"] = (t["x"].double() * torch.logspace(-3, 3, rows).clamp(max=span).unsqueeze(1)).to(dtype)
    W = t["W_enc"].double()
    W[::50] *= 1e2  # huge latents: they dominate their rows' bounds only through their own keys
    W[1::50] *= 1e-4
    t["W_enc"] = W.to(dtype)
    dead = torch.rand(n) < 0.5
    out = encode_all(t, k, dead, aux_k)
    assert_equal_outputs(out["exact"], out["certified"], "certified vs exact")
    assert_equal_outputs(out["exact"], canonical_topk(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead, aux_k), "exact vs definition")


def test_forced_recompute_is_exact_and_counted(monkeypatch):
    rows, d, n, k, aux_k = 50, 64, 2000, 16, 8
    t = sae_tensors(rows, d, n, torch.float32)
    dead = torch.rand(n) < 0.2
    topk_encode_stats(reset=True)
    natural = encode_all(t, k, dead, aux_k, precisions=("certified",))["certified"]
    assert topk_encode_stats(reset=True).recomputed_rows == 0  # easy random data: every row certified
    forced = torch.zeros(rows, dtype=torch.bool)
    forced[::3] = True
    monkeypatch.setattr(cpu_path, "_force_uncertified", lambda count: forced[:count])
    recomputed = encode_all(t, k, dead, aux_k, precisions=("certified",))["certified"]
    stats = topk_encode_stats()
    assert (stats.calls, stats.rows, stats.recomputed_rows) == (1, rows, int(forced.sum()))
    assert_equal_outputs(recomputed, natural, "recomputed rows vs certified rows")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_gradients_unchanged(dtype):
    t = sae_tensors(17, 24, 300, dtype)
    dead = torch.rand(300) < 0.3
    grads = {}
    for precision in ("exact", "certified"):
        leaves = {name: t[name].clone().requires_grad_() for name in ("x", "W_enc", "b_enc", "b_dec")}
        out = topk_encode(
            leaves["x"], leaves["W_enc"], leaves["b_enc"], 6, leaves["b_dec"], dead_mask=dead, aux_k=5,
            backend="cpu", precision=precision,
        )  # fmt: skip
        (out[0].double().square().sum() + out[2].double().sum()).backward()
        grads[precision] = [leaves[name].grad for name in ("x", "W_enc", "b_enc", "b_dec")]
    for a, b in zip(grads["exact"], grads["certified"], strict=True):
        assert torch.equal(a, b)


def test_reduced_precision_float32_matmul_stays_exact():
    t = sae_tensors(33, 80, 700, torch.float32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        out = encode_all(t, 9)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_equal_outputs(out["exact"], canonical_topk(t["x"], t["W_enc"], t["b_enc"], 9, t["b_dec"]), "exact vs definition")


def test_precision_is_validated():
    t = sae_tensors(3, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="precision: expected one of auto, exact, fast, certified, got 'bf16'"):
        topk_encode(t["x"], t["W_enc"], t["b_enc"], 2, precision="bf16")
    with pytest.raises(ValueError, match="precision: expected one of"):
        TopKConfig(d_in=8, n_latents=20, k=2, precision="half")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="half")
    assert TopKConfig(d_in=8, n_latents=20, k=2).precision == "exact"


@pytest.mark.parametrize(("share", "dtype", "expected"), [
    (0.3, torch.float32, "certified"), (0.3, torch.float16, "certified"), (2.0, torch.float32, "exact"),
    (0.3, torch.bfloat16, "exact"),  # bfloat16 operands' exact already scores with the bfloat16 GEMM
])  # fmt: skip
def test_auto_is_certified_only_where_the_bf16_gemm_is_fast(monkeypatch, share, dtype, expected):
    """"auto" reaches the cpu backend as the precision this CPU's GEMM speeds call for (CPUs that
    emulate bfloat16 would run "certified" several times slower), through the op and the module, with
    exact's results either way."""
    monkeypatch.setattr(cpu_path, "bf16_gemm_share", lambda: share)
    seen = []
    encode = cpu_path.encode
    monkeypatch.setattr(cpu_path, "encode", lambda *a: seen.append(a[7]) or encode(*a))
    t = sae_tensors(16, 24, 200, dtype)
    auto = topk_encode(t["x"], t["W_enc"], t["b_enc"], 5, t["b_dec"], backend="cpu", precision="auto")
    assert seen == [expected]
    exact = topk_encode(t["x"], t["W_enc"], t["b_enc"], 5, t["b_dec"], backend="cpu", precision="exact")
    assert_equal_outputs(auto, exact, "auto vs exact")
    sae = TopKSAE(24, 200, 5, dtype=dtype, precision="auto")
    sae.encode(t["x"])
    assert seen[-1] == expected


def test_bf16_gemm_share_is_measured(monkeypatch):
    share = cpu_path.bf16_gemm_share()
    assert 0.0 < share < 100.0 and cpu_path.bf16_gemm_share() == share  # once per process
    mm = torch.mm

    def without_bf16(a, b, **kwargs):
        if a.dtype == torch.bfloat16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'BFloat16'")
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", without_bf16)
    assert cpu_path.bf16_gemm_share.__wrapped__() == float("inf")  # then "auto" is "exact"


@pytest.mark.parametrize("precision", ["fast", "certified"])
def test_backends_without_a_candidate_pass_compute_exactly(precision):
    t = sae_tensors(9, 16, 120, torch.float32)
    exact = topk_encode(t["x"], t["W_enc"], t["b_enc"], 4, t["b_dec"], backend="torch")
    other = topk_encode(t["x"], t["W_enc"], t["b_enc"], 4, t["b_dec"], backend="torch", precision=precision)
    assert_equal_outputs(exact, other, f"torch backend, precision={precision}")


@pytest.mark.parametrize("precision", ["certified", "fast", "auto"])
def test_opcheck_cpu_precisions(precision):
    from torch.library import opcheck

    t = {k: v.clone().requires_grad_() for k, v in sae_tensors(9, 12, 70, torch.float32).items()}
    dead = torch.rand(70) < 0.3
    args = (t["x"], t["W_enc"], t["b_enc"], t["b_dec"], 5, dead, 4, "cpu", precision)
    opcheck(torch.ops.flashsae.topk_encode.default, args)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("main_zeros", [False, True], ids=["aux-zeros", "main-zeros-too"])
def test_zero_ties_are_certified_without_recompute(dtype, main_zeros):
    # a few dead latents, fewer of them positive than aux_k: the aux_k-th value is 0 and so is the
    # heap root, so the slots past the positives are the lowest-index dead latents (no recompute)
    rows, d, n, k, aux_k = 37, 24, 601, 7, 41
    t = sae_tensors(rows, d, n, dtype)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:67]] = True
    if main_zeros:  # most latents never fire: the main top-k has zero slots too
        b_enc = torch.full((n,), -1e3, dtype=torch.float64)
        b_enc[torch.randperm(n)[:5]] = 0.0  # at most 5 positives per row, k = 7
        t["b_enc"] = b_enc.to(dtype)
    topk_encode_stats(reset=True)
    out = encode_all(t, k, dead, aux_k)
    assert topk_encode_stats(reset=True).recomputed_rows == 0
    assert (out["exact"][2][:, -1] == 0).any() and (out["exact"][3][:, -1] >= 0).all()
    if main_zeros:
        assert (out["exact"][0][:, -1] == 0).any()
    assert_equal_outputs(out["exact"], out["certified"], "certified vs exact")
    reference = canonical_topk(t["x"], t["W_enc"], t["b_enc"], k, t["b_dec"], dead, aux_k)
    assert_equal_outputs(out["exact"], reference, "exact vs definition")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("d", [97, 256], ids=["d97", "d256"])
def test_rescore_by_latent_matches_row_by_row_and_float64(dtype, d):
    """topk_rescore with per-row candidates (grouped by latent inside) gives, bit for bit, what the
    shared-candidate path gives row by row, and the float64 score rounded once to float32; empty
    slots (-1, INT32_MAX) come back as -inf and the output is poisoned first."""
    from flashsae._native import _C, DTYPE_CODES, addr

    rows, n, m = 29, 301, 13
    g = torch.Generator().manual_seed(d)
    x = torch.randn(rows, d, generator=g).to(dtype)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    bias64 = torch.randn(n, generator=g, dtype=torch.float64)
    idx = torch.randint(0, n, (rows, m), generator=g, dtype=torch.int32)
    idx[:, 0] = 7  # one latent in every row
    idx[3, 5], idx[4, 12] = -1, torch.iinfo(torch.int32).max
    out = torch.full((rows, m), float("nan"))
    _C.topk_rescore(
        x=addr(x), W=addr(W), bias64=addr(bias64), indices=addr(idx), idx_ld=m, rows=rows, m=m, n_latents=n, d=d,
        dtype=DTYPE_CODES[dtype], out=addr(out),
    )  # fmt: skip
    row_by_row = torch.full((rows, m), float("nan"))
    for b in range(rows):
        ids = idx[b].contiguous()
        _C.topk_rescore(
            x=addr(x[b : b + 1]), W=addr(W), bias64=addr(bias64), indices=addr(ids), idx_ld=0, rows=1, m=m,
            n_latents=n, d=d, dtype=DTYPE_CODES[dtype], out=addr(row_by_row[b]),
        )  # fmt: skip
    assert torch.equal(out, row_by_row)
    valid = (idx >= 0) & (idx < n)
    assert torch.isneginf(out[~valid]).all()
    ids = idx.clamp(0, n - 1).long()
    reference = ((x.double().unsqueeze(1) * W.double()[ids]).sum(-1) + bias64[ids]).float()
    torch.testing.assert_close(out[valid], reference[valid], rtol=2**-23, atol=1e-6)
