"""SparseAdam (flashsae.optim): the optimizer around sparse_adam_ and the row-sparse gradients.

- fed the same gradients, it is torch.optim.Adam on every touched row after each step and on every
  row after flush(), with a changing lr, dense 1-D parameters and several groups;
- when every latent fires (k = n) a whole TopKSAE training run equals one with torch's Adam;
- its state survives a JSON + safetensors round trip (the trainer's checkpoint format) bit for bit,
  keeping float32 master weights and bfloat16 moments in their dtypes;
- the decoder-row helpers equal the dense SAE methods.
"""

import json

import pytest
import torch

from flashsae import TopKSAE
from flashsae.optim import (
    SparseAdam,
    normalize_rows_,
    remove_parallel_row_grads_,
    row_grads_of,
)
from flashsae.train.checkpoint import load_optimizer_state, optimizer_state

LR, BETAS, EPS = 3e-3, (0.9, 0.999), 1e-8


def clone(sae: TopKSAE) -> TopKSAE:
    twin = TopKSAE(sae.d_in, sae.n_latents, sae.k, aux_k=sae.aux_k, dtype=sae.dtype)
    twin.load_state_dict(sae.state_dict())
    return twin


def test_same_gradients_same_result_as_torch_adam():
    torch.manual_seed(0)
    sae = TopKSAE(33, 300, 4, aux_k=6, dtype=torch.float64)
    dense = clone(sae)
    optimizer = SparseAdam(
        [{"params": [sae.W_enc, sae.b_enc]}, {"params": [sae.W_dec, sae.b_dec], "lr": LR / 2}], lr=LR, eps=EPS
    )
    reference = torch.optim.Adam(
        [{"params": [dense.W_enc, dense.b_enc]}, {"params": [dense.W_dec, dense.b_dec], "lr": LR / 2}],
        lr=LR, eps=EPS, foreach=False,
    )  # fmt: skip
    pairs = [(getattr(sae, n), getattr(dense, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
    for step in range(1, 9):
        x = torch.randn(16, 33, dtype=torch.float64)
        dead = torch.rand(300) < 0.2
        sae(x, dead_mask=dead).loss.backward()
        for mine, theirs in pairs:  # the same gradient, as a dense tensor for torch's Adam
            collector = row_grads_of(mine)
            if collector is None:
                theirs.grad = mine.grad.clone()
            else:
                assert mine.grad is None
                rows, grads = collector.coalesced()
                theirs.grad = torch.zeros_like(theirs).index_put_((rows,), grads)
        for group, ref_group in zip(optimizer.param_groups, reference.param_groups, strict=True):
            group["lr"] = ref_group["lr"] = ref_group["lr"] * (0.8 if step % 3 == 0 else 1.1)
        optimizer.step()
        reference.step()
        touched = optimizer.updated_rows(sae.W_enc)
        assert touched is not None and 0 < touched.numel() < 300
        assert optimizer.updated_rows(sae.b_enc) is None, "dense parameters update every element"
        for mine, theirs in pairs:
            rows = optimizer.updated_rows(mine)
            a, b = (mine, theirs) if rows is None else (mine[rows], theirs[rows])
            assert torch.allclose(a, b, rtol=0, atol=1e-14), f"step {step}: touched rows differ from torch's Adam"
        optimizer.zero_grad()
        reference.zero_grad()
        assert len(row_grads_of(sae.W_dec)) == 0, "zero_grad clears the collectors"
    stale = (optimizer.state[sae.W_enc]["last_step"] < 8).sum()
    assert stale > 0, "some rows skipped steps (so the flush has work to do)"
    optimizer.flush()
    for mine, theirs in pairs:
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-14)
        ours, torchs = optimizer.state[mine], reference.state[theirs]
        assert torch.allclose(ours["exp_avg"], torchs["exp_avg"], rtol=0, atol=1e-15)
        assert torch.allclose(ours["exp_avg_sq"], torchs["exp_avg_sq"], rtol=0, atol=1e-15)
    assert optimizer.updated_rows(sae.W_enc) is None


def test_a_training_run_where_every_latent_fires_is_torch_adams():
    torch.manual_seed(1)
    sae = TopKSAE(16, 40, 40, dtype=torch.float64)  # k = n: every row is touched at every step
    dense = clone(sae)
    optimizer = SparseAdam(sae.parameters(), lr=LR, eps=EPS)
    reference = torch.optim.Adam(dense.parameters(), lr=LR, eps=EPS, foreach=False)
    for _ in range(6):
        x = torch.randn(8, 16, dtype=torch.float64)
        for model, opt in ((sae, optimizer), (dense, reference)):
            model(x).loss.backward()
            opt.step()
            opt.zero_grad()
    for name, p in sae.named_parameters():
        assert torch.allclose(p, getattr(dense, name), rtol=0, atol=1e-13), name


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        (torch.float32, {}),
        (torch.float32, {"state_dtype": "bfloat16"}),
        (torch.bfloat16, {"master_weights": True, "state_dtype": "float32"}),
        (torch.bfloat16, {"catch_up": "moments"}),
        (torch.bfloat16, {"moments": "row-int8"}),
        (torch.float32, {"moments": "row", "state_dtype": "bfloat16"}),
    ],
    ids=["f32", "f32-bf16-state", "bf16-master", "bf16-lazy", "bf16-row-int8", "f32-row-bf16"],
)
def test_state_dict_round_trip_is_exact(dtype, options, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    batches = [torch.randn(12, 24) for _ in range(6)]

    def train(sae, optimizer, xs):
        for x in xs:
            sae(x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    sae = TopKSAE(24, 200, 3, dtype=dtype)
    start = {name: value.clone() for name, value in sae.state_dict().items()}
    straight = SparseAdam(sae.parameters(), lr=LR, **options)
    train(sae, straight, batches)

    first = TopKSAE(24, 200, 3, dtype=dtype)
    first.load_state_dict(start)
    optimizer = SparseAdam(first.parameters(), lr=LR, **options)
    train(first, optimizer, batches[:3])
    scalars, tensors = optimizer_state(optimizer, "optim")  # the trainer's checkpoint format
    (tmp_path / "state.json").write_text(json.dumps(scalars))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    if "master_weights" in options:
        assert tensors["optim/0/master"].dtype == torch.float32
    if options.get("state_dtype") == "bfloat16":
        assert tensors["optim/0/exp_avg"].dtype == torch.bfloat16
    if options.get("moments") == "row-int8":
        assert tensors["optim/0/exp_avg"].dtype == torch.int8 and tensors["optim/0/exp_avg_sq"].shape == (200,)
    assert tensors["optim/0/schedule"].dtype == torch.float64

    second = TopKSAE(24, 200, 3, dtype=dtype)
    second.load_state_dict(first.state_dict())
    resumed = SparseAdam(second.parameters(), lr=LR, **options)
    saved_scalars = json.loads((tmp_path / "state.json").read_text())
    load_optimizer_state(resumed, "optim", saved_scalars, load_file(str(tmp_path / "state.safetensors")))
    train(second, resumed, batches[3:])
    for name, value in sae.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    for p, q in zip(sae.parameters(), second.parameters(), strict=True):
        for key, value in straight.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other), key


def test_mixed_dense_and_row_sparse_gradient():
    W = torch.nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    optimizer = SparseAdam([W], lr=LR)
    row_grads_of(W).add(torch.tensor([2, 5]), torch.ones(2, 4, dtype=torch.float64))
    W.grad = torch.full((10, 4), 0.5, dtype=torch.float64)
    twin = torch.nn.Parameter(W.detach().clone())
    twin.grad = W.grad.clone()
    twin.grad[[2, 5]] += 1
    reference = torch.optim.Adam([twin], lr=LR, foreach=False)
    optimizer.step()
    reference.step()
    assert torch.allclose(W, twin, rtol=0, atol=1e-15)
    assert optimizer.updated_rows(W) is None


def test_options_and_errors():
    W = torch.nn.Parameter(torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"catch_up: expected one of exact, moments"):
        SparseAdam([W], catch_up="lazy")
    with pytest.raises(ValueError, match=r"state_dtype: expected None, 'float32' or 'bfloat16'"):
        SparseAdam([W], state_dtype="int8")
    with pytest.raises(ValueError, match=r"beta1\^2 < beta2"):
        SparseAdam([W], betas=(0.99, 0.95))
    SparseAdam([W], betas=(0.99, 0.95), catch_up="moments")  # fine without the replay
    with pytest.raises(ValueError, match=r"lr: expected a number >= 0"):
        SparseAdam([W], lr=-1.0)
    with pytest.raises(ValueError, match=r"moments: expected one of elementwise, row, row-int8, got 'int4'"):
        SparseAdam([W], moments="int4")
    W64 = torch.nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    W64.grad = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"moments: row-int8 is for float32/bfloat16/float16 parameters"):
        SparseAdam([W64], moments="row-int8", row_sparse=False).step()
    W = torch.nn.Parameter(torch.randn(10, 4))
    optimizer = SparseAdam([W], row_sparse=False)
    assert row_grads_of(W) is None
    W.grad = torch.randn(10, 4).to_sparse()
    with pytest.raises(ValueError, match=r"not torch sparse tensors"):
        optimizer.step()
    optimizer = SparseAdam([W])
    assert row_grads_of(W) is not None
    optimizer.release()
    assert row_grads_of(W) is None


@pytest.mark.parametrize("chunk_elements", [1 << 24, 40], ids=["one-chunk", "two-rows-a-chunk"])
def test_decoder_row_helpers_match_the_dense_methods(chunk_elements, monkeypatch):
    from flashsae.optim import rows as row_helpers

    monkeypatch.setattr(row_helpers, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(3)
    sae = TopKSAE(20, 100, 3, dtype=torch.float64)
    dense = clone(sae)
    x = torch.randn(9, 20, dtype=torch.float64)
    dense(x).loss.backward()
    dense.remove_decoder_parallel_grads_()
    SparseAdam(sae.parameters())
    sae(x).loss.backward()
    remove_parallel_row_grads_(sae.W_dec)
    rows, grads = row_grads_of(sae.W_dec).coalesced()
    assert torch.allclose(grads, dense.W_dec.grad[rows], rtol=0, atol=1e-15)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[rows] = False
    assert (dense.W_dec.grad[untouched] == 0).all()

    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(100, 1, dtype=torch.float64) + 0.5)
        dense.W_dec.copy_(sae.W_dec)
    dense.normalize_decoder_()
    normalize_rows_(sae.W_dec, rows)
    assert torch.equal(sae.W_dec[rows], dense.W_dec[rows])
    assert not torch.allclose(sae.W_dec[untouched], dense.W_dec[untouched]), "only the given rows"
    normalize_rows_(sae.W_dec)  # every row; the given ones again (unit up to the dense method's float32 norm)
    assert torch.equal(sae.W_dec[untouched], dense.W_dec[untouched])
    assert torch.allclose(sae.W_dec, dense.W_dec, rtol=0, atol=1e-7)

    W = torch.randn(6, 4, dtype=torch.bfloat16) * 3
    master = W.float() * 1.001
    normalize_rows_(W, torch.tensor([1, 4]), master=master)
    assert torch.allclose(master[[1, 4]].norm(dim=1), torch.ones(2))
    assert torch.equal(W[[1, 4]], master[[1, 4]].bfloat16())


def dense_rowwise_step(params, state, lr, betas, step):
    """The dense optimizer SparseAdam(moments="row") is a sparse form of: every row of a matrix
    stepped every step with a second moment per row (mean of g^2), vectors by torch's Adam math."""
    beta1, beta2 = betas
    for p in params:
        g = p.grad
        m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros(p.shape[:1] if p.dim() == 2 else p.shape,
                                                                          dtype=p.dtype)))  # fmt: skip
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).add_((g * g).mean(dim=1) if p.dim() == 2 else g * g, alpha=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5 + EPS).unsqueeze(-1 if p.dim() == 2 else 0)
        with torch.no_grad():
            p -= lr / (1 - beta1**step) * m / (denom if p.dim() == 2 else denom.squeeze(0))


@pytest.mark.parametrize("moments", ["row", "row-int8"])
def test_row_moments_equal_the_dense_rowwise_optimizer(moments):
    torch.manual_seed(5)
    dtype = torch.float64 if moments == "row" else torch.float32
    sae = TopKSAE(33, 300, 4, dtype=dtype)
    dense = clone(sae)
    start = [p.detach().double().clone() for p in sae.parameters()]
    optimizer = SparseAdam(sae.parameters(), lr=LR, moments=moments)
    state = {}
    params = [dense.W_enc, dense.b_enc, dense.W_dec, dense.b_dec]
    for step in range(1, 9):
        x = torch.randn(16, 33, dtype=dtype)
        sae(x).loss.backward()
        for mine, theirs in zip([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], params, strict=True):
            collector = row_grads_of(mine)
            if collector is None:
                theirs.grad = mine.grad.clone()
            else:
                rows, grads = collector.coalesced()
                theirs.grad = torch.zeros_like(theirs).index_put_((rows,), grads)
        optimizer.step()
        optimizer.zero_grad()
        dense_rowwise_step(params, state, LR, BETAS, step)
    assert optimizer.state[sae.W_enc]["exp_avg_sq"].shape == (300,), "one second moment per latent"
    if moments == "row-int8":
        assert optimizer.state[sae.W_dec]["exp_avg"].dtype == torch.int8
    optimizer.flush()
    # float64 state: exact to rounding. int8 first moment: each step's stored m is within a code step
    # (<= 0.8% of the row max) of the float one, so the weights part by a small fraction of how far
    # they moved (measured: 0.8% after 8 steps)
    for mine, theirs, before in zip(sae.parameters(), params, start, strict=True):
        err = (mine.double() - theirs.double()).abs().max().item()
        moved = (theirs.double() - before).abs().max().item()
        assert moved > 0
        tolerance = 1e-13 if moments == "row" else 0.03 * moved
        assert err <= tolerance, f"{moments}: {err:.2e} from the dense row-wise optimizer (moved {moved:.2e})"


def test_row_int8_state_is_a_byte_per_element():
    sae = TopKSAE(64, 1000, 4, dtype=torch.bfloat16)
    optimizer = SparseAdam(sae.parameters(), lr=LR, moments="row-int8")
    sae(torch.randn(8, 64, dtype=torch.bfloat16)).loss.backward()
    optimizer.step()
    state = optimizer.state[sae.W_dec]
    matrix_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k not in ("schedule", "step"))
    assert matrix_bytes == 1000 * 64 + 1000 * (4 + 4 + 8), "int8 m + float32 scale, v and int64 step per row"
    assert optimizer.state[sae.b_enc]["exp_avg"].shape == (1000,), "vectors keep elementwise moments"


def test_beta1_zero_row_moments_store_no_first_moment():
    sae = TopKSAE(16, 100, 4)
    optimizer = SparseAdam(sae.parameters(), lr=LR, betas=(0.0, 0.999), moments="row")
    sae(torch.randn(8, 16)).loss.backward()
    optimizer.step()
    assert "exp_avg" not in optimizer.state[sae.W_enc]
    assert optimizer.state[sae.W_enc]["exp_avg_sq"].shape == (100,)
