"""Row-sparse gradients (ops/_row_grads.py): the opt-in side channel from the ops' backward.

With collection on, W_enc / W_dec get no .grad; their collector holds exactly the touched rows with
the dense gradient's values there (every backend, AuxK and Multi-TopK included), the other gradients
are unchanged, and no [n, d] tensor is created in the backward pass.
"""

import pytest
import torch

from flashsae import TopKSAE, _backend
from flashsae.ops import sae_loss, sparse_decode, topk_encode
from flashsae.ops._row_grads import RowGrads, collect_row_grads, compact_indices, row_grads_of, stop_collecting
from helpers import RTOL, LargestTensorMode, sae_tensors

TRITON = _backend.triton_installed() and (_backend.triton_interpreting() or torch.cuda.is_available())
BACKENDS = ["cpu", "torch", *(["triton"] if TRITON else [])]


def dense_of(collector: RowGrads) -> torch.Tensor:
    rows, grads = collector.coalesced()
    dense = torch.zeros(collector.n_rows, collector.width, dtype=torch.float64)
    dense[rows] = grads.double()
    return dense


def both_ways(fn, tensors: dict[str, torch.Tensor], sparse_names: tuple[str, ...]):
    """Runs fn(**leaves).backward() with dense gradients and with row-sparse ones on sparse_names;
    returns ({name: dense grad}, {name: grad or collector}) and the touched rows of the sparse run."""
    results = []
    for sparse in (False, True):
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}
        collectors = {name: collect_row_grads(leaves[name]) for name in sparse_names} if sparse else {}
        fn(**leaves).backward()
        results.append({name: collectors.get(name, leaf.grad) for name, leaf in leaves.items() if leaf.requires_grad})
        for name in sparse_names:
            if sparse:
                assert leaves[name].grad is None, f"{name}.grad was materialized"
                stop_collecting(leaves[name])
                assert row_grads_of(leaves[name]) is None
    return results


def check(dense, sparse, sparse_names, dtype, touched_rows):
    for name, grad in dense.items():
        if name in sparse_names:
            rows, _ = sparse[name].coalesced()
            assert torch.equal(rows, touched_rows), f"{name}: collected rows are not the touched latents"
            got = dense_of(sparse[name])
            err = (got - grad.double()).abs().max().item()
            assert err <= RTOL[dtype] * max(grad.double().abs().max().item(), 1e-12), f"{name}: {err:.3e}"
        else:
            assert torch.allclose(sparse[name].double(), grad.double(), rtol=0, atol=RTOL[dtype] * 10), name


def touched(*slots):
    """The latents named by a slot with a non-zero value: (values, indices) pairs."""
    named = [idx[(vals != 0) & (idx >= 0)].long() for vals, idx in zip(slots[::2], slots[1::2], strict=True)]
    return torch.unique(torch.cat(named))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_encode_with_aux(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    t = sae_tensors(37, 97, 1000, dtype)
    dead = torch.rand(1000) < 0.3
    weights = torch.randn(37, 7 + 5, dtype=torch.float64).to(dtype)
    leaves = {k: t[k] for k in ("x", "W_enc", "b_enc", "b_dec")}

    def loss(x, W_enc, b_enc, b_dec):
        values, _, aux_values, _ = topk_encode(x, W_enc, b_enc, 7, b_dec, dead_mask=dead, aux_k=5, backend=backend)
        return (torch.cat([values, aux_values], 1) * weights).sum()

    vals, idx, aux_vals, aux_idx = topk_encode(t["x"], t["W_enc"], t["b_enc"], 7, t["b_dec"], dead_mask=dead, aux_k=5)
    dense, sparse = both_ways(loss, leaves, ("W_enc",))
    check(dense, sparse, ("W_enc",), dtype, touched(vals, idx, aux_vals, aux_idx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_with_empty_slots(backend):
    dtype = torch.float32
    t = sae_tensors(37, 97, 1000, dtype)
    indices = torch.randint(0, 1000, (37, 7), dtype=torch.int32)
    indices[:, -2:] = -1
    leaves = {"values": torch.randn(37, 7), "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    target = torch.randn(37, 97)

    def loss(values, W_dec, b_dec):
        return (sparse_decode(values, indices, W_dec, b_dec, backend=backend) * target).sum()

    dense, sparse = both_ways(loss, leaves, ("W_dec",))
    check(dense, sparse, ("W_dec",), dtype, touched(leaves["values"], indices))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_loss_with_aux(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    t = sae_tensors(37, 97, 1000, dtype)
    indices = torch.randint(0, 1000, (37, 7), dtype=torch.int32)
    aux_indices = torch.randint(0, 1000, (37, 5), dtype=torch.int32)
    aux_indices[3] = -1
    leaves = {
        "x": t["x"],
        "values": torch.rand(37, 7, dtype=torch.float64).to(dtype),
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
        "aux_values": torch.rand(37, 5, dtype=torch.float64).to(dtype),
    }

    def loss(x, values, W_dec, b_dec, aux_values):
        out = sae_loss(x, values, indices, W_dec, b_dec, aux_values, aux_indices, backend=backend)
        return out.fvu + 0.5 * out.auxk_loss + (out.x_hat.float() ** 2).mean()

    dense, sparse = both_ways(loss, leaves, ("W_dec",))
    check(dense, sparse, ("W_dec",), dtype, touched(leaves["values"], indices, leaves["aux_values"], aux_indices))


def test_topk_sae_multi_topk_and_aux_collect_several_parts():
    torch.manual_seed(0)
    sae = TopKSAE(97, 1000, 7, aux_k=11, multi_topk=True, dtype=torch.float64)
    x = torch.randn(37, 97, dtype=torch.float64)
    dead = torch.rand(1000) < 0.3
    sae(x, dead_mask=dead).loss.backward()
    dense = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    enc, dec = collect_row_grads(sae.W_enc), collect_row_grads(sae.W_dec)
    sae(x, dead_mask=dead).loss.backward()
    assert sae.W_enc.grad is None and sae.W_dec.grad is None
    assert len(dec) == 2, "sae_loss of k and of 4k each add a part"
    wide_vals, wide, aux_vals, aux = topk_encode(x, sae.W_enc, sae.b_enc, 28, sae.b_dec, dead_mask=dead, aux_k=11)
    for name, collector in (("W_enc", enc), ("W_dec", dec)):
        assert torch.allclose(dense_of(collector), dense[name], rtol=0, atol=1e-12), name
        assert torch.equal(collector.coalesced()[0], touched(wide_vals, wide, aux_vals, aux)), name
    for name in ("b_enc", "b_dec"):
        assert torch.allclose(getattr(sae, name).grad, dense[name], rtol=0, atol=1e-12)
    enc.clear()
    assert len(enc) == 0 and enc.coalesced()[0].numel() == 0


def test_no_n_by_d_tensor_in_the_backward():
    # n * d = 2^21 elements; the batch touches at most 64 * 8 = 512 rows
    n, d, rows, k = 1 << 14, 128, 64, 8
    sae = TopKSAE(d, n, k)
    collect_row_grads(sae.W_enc)
    collect_row_grads(sae.W_dec)
    x = torch.randn(rows, d)
    out = sae(x)
    with LargestTensorMode() as mode:
        out.loss.backward()
    assert mode.largest < n * d // 8, f"{mode.largest_op} made a tensor of {mode.largest} elements"
    assert mode.largest >= n, "b_enc's dense [n] gradient is the largest (sanity: the mode saw the backward)"


def test_rows_without_a_contribution_are_not_collected():
    # a slot whose value is exactly 0 adds nothing to its row's gradient: the row is left out (its
    # optimizer update is then the same as if no slot named it), while d_values stays exact
    W = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    collector = collect_row_grads(W)
    values = torch.tensor([[1.5, 0.0, -2.0], [0.0, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[3, 7, 9], [7, 3, 20]], dtype=torch.int32)
    target = torch.randn(2, 8, dtype=torch.float64)
    (sparse_decode(values, indices, W) * target).sum().backward()
    rows, _ = collector.coalesced()
    assert rows.tolist() == [3, 9], "rows 7 and 20 are named only by zero values"
    assert torch.allclose(values.grad, (target.unsqueeze(1) * W.detach()[indices.long()]).sum(-1))


def test_compact_indices():
    a = torch.tensor([[5, -1, 2], [2, 9, -1]], dtype=torch.int32)
    b = torch.tensor([[9, 0]], dtype=torch.int64)
    rows, count, (ca, cb) = compact_indices(a, b)
    assert rows.tolist() == [0, 2, 5, 9] and count == 4
    assert ca.tolist() == [[2, -1, 1], [1, 3, -1]] and cb.tolist() == [[3, 0]]
    assert ca.dtype == cb.dtype == torch.int32
    rows, count, (ce,) = compact_indices(torch.full((2, 3), -1, dtype=torch.int32))
    assert rows.tolist() == [0] and count == 0 and (ce == -1).all()


def test_all_slots_empty_adds_nothing():
    W = torch.randn(50, 8, requires_grad=True)
    collector = collect_row_grads(W)
    values = torch.randn(4, 3, requires_grad=True)
    sparse_decode(values, torch.full((4, 3), -1, dtype=torch.int32), W).sum().backward()
    assert len(collector) == 0 and W.grad is None
    assert (values.grad == 0).all()


def test_collector_checks_its_parts():
    collector = collect_row_grads(torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"grads: expected shape \[2, 4\] for 2 rows"):
        collector.add(torch.tensor([1, 2]), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"param: row-sparse gradients need an \[n, d\] parameter"):
        collect_row_grads(torch.zeros(10))
    collector.add(torch.tensor([1, 5]), torch.ones(2, 4))
    collector.add(torch.tensor([0, 5]), torch.ones(2, 4))
    rows, grads = collector.coalesced()
    assert rows.tolist() == [0, 1, 5] and grads[:, 0].tolist() == [1, 1, 2]


def test_copies_of_a_parameter_get_dense_gradients():
    import copy
    import pickle

    sae = TopKSAE(16, 64, 4)
    collect_row_grads(sae.W_enc)
    for twin in (copy.deepcopy(sae), pickle.loads(pickle.dumps(sae))):
        assert row_grads_of(twin.W_enc) is None
        twin(torch.randn(8, 16)).loss.backward()
        assert twin.W_enc.grad is not None and twin.W_enc.grad.shape == (64, 16)
    assert row_grads_of(sae.W_enc) is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_db_dec_without_dx_is_summed_a_chunk_of_rows_at_a_time(backend, dtype, monkeypatch):
    # x without a gradient (training data): the row-sparse encoder backward gathers no [m, d] block of
    # W_enc; db_dec = -sum_i db_enc[i] W_enc[i] is summed over chunks of 3 rows here
    from flashsae.ops import _row_grads

    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16")
    monkeypatch.setattr(_row_grads, "DB_DEC_CHUNK_ELEMENTS", 3 * 97)
    t = sae_tensors(37, 97, 1000, dtype)
    x = t["x"]
    weights = torch.randn(37, 7, dtype=torch.float64).to(dtype)
    results = []
    for sparse in (False, True):
        W_enc, b_enc, b_dec = (t[k].detach().clone().requires_grad_() for k in ("W_enc", "b_enc", "b_dec"))
        if sparse:
            collect_row_grads(W_enc)
        values, _ = topk_encode(x, W_enc, b_enc, 7, b_dec, backend=backend)
        (values * weights).sum().backward()
        grad_W = dense_of(row_grads_of(W_enc)) if sparse else W_enc.grad.double()
        results.append((grad_W, b_enc.grad.double(), b_dec.grad.double()))
    for name, dense, sparse in zip(("W_enc", "b_enc", "b_dec"), results[0], results[1], strict=True):
        err = (dense - sparse).abs().max().item()
        assert err <= 4 * RTOL[dtype] * max(dense.abs().max().item(), 1e-12), f"{name}: {err:.3e}"
