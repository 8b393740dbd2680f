"""Cross-layer transcoders: forward and gradients against a dense float64 reference (every CPU
backend, and triton under the interpreter), encode / decode, the decoder layout, configs, checkpoints, and row-sparse gradients with SparseAdam."""

import pytest
import torch

import flashsae
from flashsae import CrossLayerTranscoder
from flashsae.optim import SparseAdam, row_grads_of
from helpers import assert_close, backends

L, D_IN, D_OUT, N, K, AUX_K = 3, 13, 11, 37, 5, 7


def make_clt(dtype=torch.float64, backend=None, **options):
    options = {"d_out": D_OUT, "k": K, "aux_k": AUX_K, **options}
    clt = flashsae.create("clt", n_layers=L, d_in=D_IN, n_latents=N, dtype=dtype, backend=backend, **options)
    with torch.no_grad():  # the zero init would make most gradients vanish: give every weight a value
        for name, p in clt.named_parameters():
            if not name.startswith("W_enc"):
                p.normal_(0, 0.3)
    return clt


def reference(params, x, y, config, dead_mask=None, thresholds=None):
    """The CLT written densely in float64: per layer relu pre-activations, a stable top-k (or the
    JumpReLU mask), dense latents [rows, n], and y_hat_j = b_dec_j + sum_{i<=j} f_i W_dec_i[:, j - i]."""
    n_layers, d_out, k = config.n_layers, config.d_out, config.k
    latents, pre_acts = [], []
    for i in range(n_layers):
        pre = x[:, i] @ params[f"W_enc_{i}"].T + params[f"b_enc_{i}"]
        if thresholds is None:
            act = pre.relu()
            top = torch.sort(act, dim=1, descending=True, stable=True)
            f = torch.zeros_like(act).scatter(1, top.indices[:, :k], top.values[:, :k])
        else:
            f = pre * (pre > thresholds[i].clamp_min(0))
        latents.append(f)
        pre_acts.append(pre.relu())
    outputs = []
    for j in range(n_layers):
        total = params[f"b_dec_{j}"].expand(x.shape[0], d_out)
        for i in range(j + 1):
            W = params[f"W_dec_{i}"].view(-1, n_layers - i, d_out)[:, j - i]
            total = total + latents[i] @ W
        if f"W_skip_{j}" in params:
            total = total + x[:, j] @ params[f"W_skip_{j}"].T
        outputs.append(total)
    y_hat = torch.stack(outputs, 1)
    variance = (y - y.mean(0)).pow(2).sum(dim=(0, 2))
    fvu_per_layer = (y_hat - y).pow(2).sum(dim=(0, 2)) / variance
    auxk = torch.zeros((), dtype=x.dtype)
    if dead_mask is not None:
        residual = (y - y_hat).detach()
        for i in range(n_layers):
            act = pre_acts[i]
            dead = torch.sort(act.masked_fill(~dead_mask[i], float("-inf")), dim=1, descending=True, stable=True)
            aux_f = torch.zeros_like(act).scatter(
                1, dead.indices[:, : config.aux_k], dead.values[:, : config.aux_k].clamp_min(0)
            )
            r = residual[:, i:].reshape(x.shape[0], -1)
            sse = (aux_f @ params[f"W_dec_{i}"] - r).pow(2).sum()
            auxk = auxk + sse / (r - r.mean(0)).pow(2).sum() * min(int(dead_mask[i].sum()) / config.aux_k, 1.0)
        auxk = auxk / n_layers
    fvu = fvu_per_layer.mean()
    return {
        "x_hat": y_hat,
        "latents": latents,
        "fvu": fvu,
        "fvu_per_layer": fvu_per_layer,
        "mse": (y_hat - y).pow(2).sum() / y.numel(),
        "auxk_loss": auxk,
        "loss": fvu + config.auxk_alpha * auxk,
    }


def check(clt, x, y, dtype, dead_mask=None, thresholds=None):
    out = clt(x, y, dead_mask=dead_mask)
    out.loss.backward()
    params = {n: p.detach().double().clone().requires_grad_(True) for n, p in clt.named_parameters()}
    rows_x, rows_y = x.reshape(-1, L, D_IN).double(), y.reshape(-1, L, D_OUT).double()
    expected = reference(params, rows_x, rows_y, clt.config, dead_mask, thresholds)
    expected["loss"].backward()
    assert out.x_hat.shape == y.shape
    assert_close(out.x_hat.reshape(-1, L, D_OUT), expected["x_hat"], dtype, "y_hat")
    for field in ("fvu", "mse", "auxk_loss", "loss", "fvu_per_layer"):
        assert_close(getattr(out, field), expected[field], dtype, field)
    for i in range(L):
        layer = flashsae.SparseLatents(out.latents.values[..., i, :], out.latents.indices[..., i, :])
        assert_close(layer.to_dense(N).reshape(-1, N), expected["latents"][i], dtype, f"latents of layer {i}")
    for name, p in clt.named_parameters():
        assert_close(p.grad, params[name].grad, dtype, f"grad {name}")
    return out


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_forward_and_gradients_match_dense_reference_float64(backend, skip, with_dead):
    clt = make_clt(backend=backend, skip=skip, auxk_alpha=0.5)
    x = torch.randn(2, 9, L, D_IN, dtype=torch.float64)
    y = torch.randn(2, 9, L, D_OUT, dtype=torch.float64) * 2 + 1
    dead = torch.rand(L, N) < 0.3 if with_dead else None
    out = check(clt, x, y, torch.float64, dead_mask=dead)
    assert out.latents.values.shape == (2, 9, L, K)
    if with_dead:
        assert out.auxk_loss > 0


@pytest.mark.parametrize("backend", backends("triton"))
def test_triton_backend_matches_dense_reference_float32(backend):
    clt = make_clt(dtype=torch.float32, backend=backend)
    x = torch.randn(6, L, D_IN)
    y = torch.randn(6, L, D_OUT)
    check(clt, x, y, torch.float32, dead_mask=torch.rand(L, N) < 0.4)


def test_decoder_layout_encode_decode_and_arguments():
    clt = make_clt(skip=True)
    # W_dec_i is stored [n, (L - i) * d_out]: decoder(i) is circuit-tracer's [n, L - i, d_out] view of it
    for i in range(L):
        view = clt.decoder(i)
        assert view.shape == (N, L - i, D_OUT)
        assert view.data_ptr() == getattr(clt, f"W_dec_{i}").data_ptr()
    x = torch.randn(4, L, D_IN, dtype=torch.float64)
    y = torch.randn(4, L, D_OUT, dtype=torch.float64)
    out = clt(x, y)
    latents = clt.encode(x)
    assert torch.equal(latents.indices, out.latents.indices)
    assert_close(clt.decode(latents, x), out.x_hat, torch.float64, "decode(encode(x), x)")
    with pytest.raises(ValueError, match="x: a skip CLT's decode needs the inputs"):
        clt.decode(latents)
    with pytest.raises(ValueError, match=r"x: expected shape \[..., n_layers=3, d_in=13\]"):
        clt(torch.randn(4, 2, D_IN, dtype=torch.float64), y)
    with pytest.raises(ValueError, match="y: expected shape"):
        clt(x, torch.randn(5, L, D_OUT, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dead_mask: expected a bool tensor \[n_layers=3, n_latents=37\]"):
        clt(x, y, dead_mask=torch.zeros(N, dtype=torch.bool))
    with pytest.raises(AttributeError, match="W_dec"):
        _ = clt.W_dec


def test_config_validation():
    with pytest.raises(ValueError, match="n_layers"):
        flashsae.create("clt", d_in=8, n_latents=16, k=2)
    with pytest.raises(ValueError, match="activation"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, k=2, activation="gelu")
    with pytest.raises(ValueError, match="k: expected 1 <= k <= n_latents"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, k=17)
    with pytest.raises(ValueError, match="activation: a TopK CLT has no thresholds"):
        flashsae.create("clt", n_layers=2, d_in=8, n_latents=16, k=2).threshold(0)
    clt = CrossLayerTranscoder(2, 8, 16, k=2)
    assert clt.config.d_out == 8 and clt.config.aux_k == 4


def test_native_checkpoint_round_trip(tmp_path):
    clt = make_clt(activation="jumprelu", skip=True)
    with torch.no_grad():
        clt.threshold(1).fill_(0.25)
    clt.metadata = {"hookpoints": "a.*"}
    clt.save(tmp_path / "clt")
    loaded = flashsae.load(tmp_path / "clt")
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.config == clt.config
    assert loaded.metadata == clt.metadata
    for name, t in clt.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_unit_norm_decoder_rows_cover_every_target_layer():
    clt = make_clt()
    clt.normalize_decoder_()
    for W in clt.decoder_matrices():
        assert_close(W.norm(dim=1), torch.ones(N, dtype=torch.float64), torch.float64, "row norms")
    x, y = torch.randn(8, L, D_IN, dtype=torch.float64), torch.randn(8, L, D_OUT, dtype=torch.float64)
    clt(x, y).loss.backward()
    clt.remove_decoder_parallel_grads_()
    for W in clt.decoder_matrices():
        along = torch.linalg.vecdot(W.grad, W).abs().max()
        assert W.grad.abs().max() > 0 and along <= 1e-12 * W.grad.abs().max()


@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_sparse_adam_gets_row_sparse_gradients_equal_to_the_dense_ones(backend):
    """With SparseAdam every W_enc_i / W_dec_i gets its gradient through the row-sparse path (no
    [n, d] .grad), equal on the touched rows to the dense gradient; one step equals torch's Adam."""
    dense = make_clt(backend=backend)
    sparse = make_clt(backend=backend)
    sparse.load_state_dict(dense.state_dict())
    x, y = torch.randn(5, L, D_IN, dtype=torch.float64), torch.randn(5, L, D_OUT, dtype=torch.float64)
    dense(x, y).loss.backward()
    optimizer = SparseAdam(sparse.parameters(), lr=1e-2)
    sparse(x, y).loss.backward()
    for name, p in sparse.named_parameters():
        if p.dim() != 2:
            continue
        assert p.grad is None, name
        rows, grads = row_grads_of(p).coalesced()
        full = torch.zeros_like(p).index_add_(0, rows, grads)
        assert_close(full, dense.get_parameter(name).grad, torch.float64, f"row grads {name}")
    reference_optimizer = torch.optim.Adam(dense.parameters(), lr=1e-2)
    reference_optimizer.step()
    optimizer.step()
    optimizer.flush()
    for name, p in sparse.named_parameters():
        assert_close(p, dense.get_parameter(name), torch.float64, f"after one step: {name}")


@pytest.mark.parametrize("backend", backends("cpu", "torch", "triton"))
def test_sparse_adam_updating_during_backward_equals_torch_adam(backend, monkeypatch):
    """update_in_backward: every W_enc_i / W_dec_i is updated a chunk of rows at a time during the
    backward (chunks of 3 rows here, so each matrix takes many), AuxK included; two steps equal
    torch's Adam on the dense gradients, and no [n, d] gradient is ever made."""
    from flashsae.ops import _row_grads

    monkeypatch.setattr(_row_grads, "EAGER_CHUNK_ELEMENTS", 3 * L * D_OUT)
    dtype = torch.float32 if backend == "triton" else torch.float64
    dense = make_clt(dtype=dtype, backend=backend)
    eager = make_clt(dtype=dtype, backend=backend)
    eager.load_state_dict(dense.state_dict())
    reference_optimizer = torch.optim.Adam(dense.parameters(), lr=1e-2)
    optimizer = SparseAdam(eager.parameters(), lr=1e-2, update_in_backward=True)
    for _ in range(2):
        x, y = torch.randn(6, L, D_IN, dtype=dtype), torch.randn(6, L, D_OUT, dtype=dtype)
        dead = torch.rand(L, N) < 0.5
        dense(x, y, dead_mask=dead).loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        eager(x, y, dead_mask=dead).loss.backward()
        for name, p in eager.named_parameters():
            assert p.dim() != 2 or (p.grad is None and not len(row_grads_of(p))), name
        optimizer.step()
        optimizer.zero_grad()
    optimizer.flush()
    for name, p in eager.named_parameters():
        assert_close(p, dense.get_parameter(name), dtype, f"after two steps: {name}")


def test_update_in_backward_refuses_a_second_gradient_of_the_same_rows():
    clt = make_clt()
    optimizer = SparseAdam(clt.parameters(), lr=1e-2, update_in_backward=True)
    x, y = torch.randn(6, L, D_IN, dtype=torch.float64), torch.randn(6, L, D_OUT, dtype=torch.float64)
    clt(x, y).loss.backward()
    with pytest.raises(RuntimeError, match="update_in_backward: a row got a second gradient part in one step"):
        clt(x, y).loss.backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        optimizer.zero_grad()


@pytest.mark.parametrize("backend", backends("cpu", "torch"))
def test_eager_chunks_hand_over_the_dense_gradients_of_every_op_input(backend, monkeypatch):
    """With a consumer on the collectors, topk_encode and sparse_decode compute W's gradient a chunk
    of rows at a time (4 rows here): the chunks put together are the dense gradient, and the other
    inputs' gradients (x, b_enc, b_dec, values) are the dense backward's."""
    from flashsae.ops import _row_grads, sparse_decode, topk_encode
    from flashsae.optim import collect_row_grads

    monkeypatch.setattr(_row_grads, "EAGER_CHUNK_ELEMENTS", 4 * D_OUT)
    W_enc, b_enc = torch.randn(N, D_OUT, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    b_dec = torch.randn(D_OUT, dtype=torch.float64)
    W_dec = torch.randn(N, D_OUT, dtype=torch.float64)
    x = torch.randn(9, D_OUT, dtype=torch.float64)
    grads = {}
    for mode in ("dense", "eager"):
        leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec, W_dec)]
        parts = {}
        if mode == "eager":
            for i in (1, 4):
                collector = collect_row_grads(leaves[i])
                # a consumer uses or copies each chunk before it returns (the cpu backwards reuse one buffer)
                collector.consumer = lambda rows, g, i=i: parts.setdefault(i, []).append((rows, g.clone()))
        values, indices = topk_encode(leaves[0], leaves[1], leaves[2], K, leaves[3], backend=backend)
        out = sparse_decode(values, indices, leaves[4], None, backend=backend)
        out.pow(2).sum().backward()
        got = [t.grad for t in leaves]
        for i, chunks in parts.items():
            assert len(chunks) > 1 and got[i] is None
            got[i] = torch.zeros_like(leaves[i])
            for rows, g in chunks:
                got[i].index_add_(0, rows, g)
        grads[mode] = got
    names = ("x", "W_enc", "b_enc", "b_dec", "W_dec")
    for name, eager, dense in zip(names, grads["eager"], grads["dense"], strict=True):
        assert_close(eager, dense, torch.float64, name)
