"""The sparse_rows primitives (gather_rows, dot_rows, scatter_rows and the latent_segments sort) on
every backend that has them, against their float64 definitions, including the options only the
backward passes use (gate, offset, coef_sum, a second residual matrix for the aux slots)."""

import pytest
import torch

from flashsae.ops import _sparse_rows
from helpers import assert_close, backends, randn

N, D = 40, 19


def slots(rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients and indices with empty (-1) slots and repeated latents (segments of many slots)."""
    coef = randn(rows, k)
    indices = torch.randint(0, N, (rows, k), dtype=torch.int32)
    indices[torch.rand(rows, k) < 0.2] = -1
    indices[:, 0] = 3
    return coef, indices


def definition_gather(coef, indices, M, gate=None, bias=None):
    c = coef * (indices >= 0) * (1.0 if gate is None else (gate > 0))
    out = (c.unsqueeze(-1) * M[indices.clamp_min(0).long()]).sum(1)
    return out if bias is None else out + bias


def definition_scatter(coef, indices, R, n, gate=None, offset=None, R2=None, main_slots=None):
    rows, k = indices.shape
    c = coef * (indices >= 0) * (1.0 if gate is None else (gate > 0))
    main = torch.arange(k) < (k if main_slots is None else main_slots)
    out = torch.zeros(n, R.shape[1], dtype=torch.float64)
    coef_sum = torch.zeros(n, dtype=torch.float64)
    for b in range(rows):
        for j in range(k):
            i = int(indices[b, j])
            if i < 0:
                continue
            r = R[b] if main[j] else R2[b]
            out[i] += c[b, j] * (r if offset is None else r - offset)
            coef_sum[i] += c[b, j]
    return out, coef_sum


def test_latent_segments_sort_slots_by_latent_and_leave_invalid_ones_out():
    indices = torch.tensor([[2, -1, 0], [2, 7, 0], [5, 2, -3]], dtype=torch.int32)  # n = 6: 7 and -3 invalid
    order, bounds = _sparse_rows.latent_segments(indices, 6)
    assert order.dtype == torch.int64 and bounds.dtype == torch.int64 and bounds.shape == (7,)
    segments = {i: order[bounds[i] : bounds[i + 1]].tolist() for i in range(6)}
    # flat slot ids b * 3 + j, ascending within a latent (a stable sort)
    assert segments == {0: [2, 5], 1: [], 2: [0, 3, 7], 3: [], 4: [], 5: [6]}
    assert int(bounds[-1]) == 6, "the empty and out-of-range slots sort past the last segment"


@pytest.mark.parametrize("be", backends("torch", "triton", "cuda_fake", "cuda"), indirect=True)
def test_primitives_match_their_definitions(be):
    rows, k = 13, 6
    coef, indices = slots(rows, k)
    gate = randn(rows, k)
    M, G, bias, offset = randn(N, D), randn(rows, D), randn(D), randn(D)
    dtype = torch.float64 if be.name == "torch" else torch.float32
    dev = [t.to(dtype).to(be.device) for t in (coef, M, G, bias, offset, gate)]
    c, M_, G_, bias_, offset_, gate_ = dev
    idx = indices.to(be.device)
    expected_gather = definition_gather(coef, indices, M, gate=gate, bias=bias)
    expected_dots = (M[indices.clamp_min(0).long()] @ G.unsqueeze(-1)).squeeze(-1) * (indices >= 0)
    expected_scatter, expected_sums = definition_scatter(coef, indices, G, N, gate=gate, offset=offset)
    if be.name == "torch":
        gathered = _sparse_rows.gather_rows(c * (gate_ > 0), idx, M_, bias_)
        dots = _sparse_rows.dot_rows(G_, idx, M_)
        scattered, sums = _sparse_rows.scatter_rows(c * (gate_ > 0), idx, G_, N, offset=offset_)
    else:
        launchers = _sparse_rows.row_kernels(be.name)
        flag = _sparse_rows.new_flag(be.device)
        gathered = torch.full((rows, D), float("nan"), device=be.device)
        launchers.gather_rows(c, idx, M_, gathered, flag, gate=gate_, bias=bias_)
        dots = torch.full((rows, k), float("nan"), device=be.device)
        launchers.dot_rows(G_, idx, M_, dots, flag)
        scattered = torch.full((N, D), float("nan"), device=be.device)
        sums = torch.full((N,), float("nan"), device=be.device)
        launchers.scatter_rows(c, idx, G_, scattered, gate=gate_, offset=offset_, coef_sum=sums)
        assert int(flag.sum()) == 0
    assert_close(gathered.cpu(), expected_gather, dtype, "gather_rows")
    assert_close(dots.cpu(), expected_dots, dtype, "dot_rows")
    assert_close(scattered.cpu(), expected_scatter, dtype, "scatter_rows")
    assert_close(sums.cpu(), expected_sums, dtype, "coef_sum")


@pytest.mark.parametrize("be", backends("triton", "cuda_fake", "cuda"), indirect=True)
def test_scatter_rows_reads_the_second_residual_past_the_main_slots(be):
    # sae_loss sums its main slots (residual gradient G) and aux slots (H) in one scatter
    rows, k, aux_k = 11, 4, 3
    coef, indices = slots(rows, k + aux_k)
    R1, R2 = randn(rows, D), randn(rows, D)
    out = torch.full((N, D), float("nan"), device=be.device)
    _sparse_rows.row_kernels(be.name).scatter_rows(
        coef.float().to(be.device), indices.to(be.device), R1.float().to(be.device), out,
        R2=R2.float().to(be.device), main_slots=k,
    )  # fmt: skip
    expected, _ = definition_scatter(coef, indices, R1, N, R2=R2, main_slots=k)
    assert_close(out.cpu(), expected, torch.float32, "scatter_rows with R2")


@pytest.mark.parametrize("be", backends("triton", "cuda_fake", "cuda"), indirect=True)
def test_out_of_range_indices_raise_the_flag(be):
    coef, indices = slots(5, 3)
    indices[4, 2] = N
    launchers = _sparse_rows.row_kernels(be.name)
    for run in (
        lambda flag: launchers.gather_rows(coef.float().to(be.device), indices.to(be.device),
                                           randn(N, D).float().to(be.device),
                                           torch.empty(5, D, device=be.device), flag),  # fmt: skip
        lambda flag: launchers.dot_rows(randn(5, D).float().to(be.device), indices.to(be.device),
                                        randn(N, D).float().to(be.device), torch.empty(5, 3, device=be.device),
                                        flag),  # fmt: skip
    ):
        flag = _sparse_rows.new_flag(be.device)
        run(flag)
        assert int(flag[0]) == 1
        with pytest.raises(ValueError, match=r"^indices: some index is out of range; expected a latent in \[0, 40\)"):
            _sparse_rows.raise_on_index_flags(flag, N, "indices")
