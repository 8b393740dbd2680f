"""torch.func on flashsae's modules and ops: grad of a training loss through functional_call equals
autograd's for every registered architecture and backend; vmap of encode and of a training loss
equals the per-slice results; per-sample gradients (vmap of grad); transforms leave module state alone."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import flashsae
from flashsae.registry import REGISTRY
from helpers import assert_close, backends

D, N, K, ROWS = 16, 48, 4, 10

#: create() keywords of every registered architecture at the test size. A new architecture fails
#: test_every_architecture_is_covered until it is listed here (and so tested below).
ARCHITECTURES = {
    "topk": {"k": K},
    "topk_aux_multi": {"k": K, "multi_topk": True},
    "batchtopk": {"k": K},
    "matryoshka": {"k": K, "matryoshka_widths": [12, 24]},
    "jumprelu": {"threshold_init": 0.05, "bandwidth": 0.1},
    "jumprelu_tanh": {"threshold_init": 0.05, "bandwidth": 0.1, "sparsity_loss": "tanh", "pre_act_coefficient": 0.1},
    "relu": {},
    "gated": {},
    "transcoder": {"k": K, "d_out": 12, "skip": True},
    "clt": {"k": K, "n_layers": 3, "d_out": 12, "skip": True},
    "crosscoder": {"k": K, "n_sites": 2},
}
#: Layers of the CLT case and sites of the crosscoder case (their inputs are [..., L or S, d]).
SITES = {"clt": 3, "crosscoder": 2}
#: Fixed-k architectures (data-independent output shapes); the others pick their latents below the vmap.
FIXED_K = ("topk", "topk_aux_multi", "transcoder", "clt", "crosscoder")
BACKENDS = backends("cpu", "torch", "triton")


def _architecture(case: str) -> str:
    return case.split("_")[0]


def make(case: str, backend: str) -> flashsae.SAE:
    sae = flashsae.create(_architecture(case), d_in=D, n_latents=N, backend=backend, **ARCHITECTURES[case])
    with torch.no_grad():  # leave the init (zero decoder, zero biases) for weights that exercise every path
        for p in sae.parameters():
            if p.dim() == 2:
                p.add_(0.3 * torch.randn_like(p))
            elif "threshold" not in next(n for n, q in sae.named_parameters() if q is p):
                p.add_(0.05 * torch.randn_like(p))
    return sae


def inputs(sae: flashsae.SAE, *lead: int) -> tuple[torch.Tensor, ...]:
    sites = (SITES[sae.architecture],) if sae.architecture in SITES else ()
    x = torch.randn(*lead, *sites, D)
    if sae.architecture in ("transcoder", "clt"):
        return x, torch.randn(*lead, *sites, sae.d_out)
    return (x,)


def dead_mask(sae: flashsae.SAE) -> torch.Tensor:
    """Every third latent dead (a CLT's mask has one row per layer)."""
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    return dead.expand(SITES["clt"], N).clone() if sae.architecture == "clt" else dead


def test_every_architecture_is_covered():
    assert {_architecture(case) for case in ARCHITECTURES} == set(REGISTRY)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", list(ARCHITECTURES))
def test_grad_of_functional_call_equals_autograd(case, be):
    sae = make(case, be)
    args = inputs(sae, ROWS)
    kwargs = {"dead_mask": dead_mask(sae)}  # the AuxK / pre-activation terms take part too
    params = {name: p.detach() for name, p in sae.named_parameters()}

    grads = grad(lambda p: functional_call(sae, p, args, kwargs).loss)(params)

    sae.zero_grad()
    sae(*args, **kwargs).loss.backward()
    assert set(grads) == set(params)
    for name, p in sae.named_parameters():
        assert p.grad is not None, name
        assert_close(grads[name], p.grad, torch.float32, f"{case} grad {name}")
        assert grads[name].abs().max() > 0 or p.grad.abs().max() == 0, name


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", list(ARCHITECTURES))
@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
def test_vmap_of_encode_equals_per_slice(case, be, training):
    sae = make(case, be).train(training)  # BatchTopK: the batch top-k in training mode, its threshold in eval
    xs = inputs(sae, 3, ROWS)[0]
    values, indices = vmap(lambda x: tuple(sae.encode(x)))(xs)
    for i in range(3):
        expected = sae.encode(xs[i])
        # a variable-width encode pads every slice to the widest: the rest of the slots are empty
        m = expected.values.shape[-1]
        assert torch.equal(indices[i, :, :m], expected.indices), i
        assert (indices[i, :, m:] == -1).all() and (values[i, :, m:] == 0).all(), i
        assert_close(values[i, :, :m], expected.values, torch.float32, f"values of slice {i}")


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("case", list(ARCHITECTURES))
def test_vmap_of_training_loss_and_per_sample_grads(case, be):
    sae = make(case, be)
    slices = 3
    args = inputs(sae, slices, ROWS)
    params = {name: p.detach() for name, p in sae.named_parameters()}

    def loss(p, *a):
        return functional_call(sae, p, a).loss

    losses = vmap(loss, in_dims=(None, *[0] * len(args)))(params, *args)
    per_slice_grads = vmap(grad(loss), in_dims=(None, *[0] * len(args)))(params, *args)
    for i in range(slices):
        sliced = tuple(a[i] for a in args)
        sae.zero_grad()
        out = sae(*sliced)
        out.loss.backward()
        assert_close(losses[i], out.loss, torch.float32, f"loss of slice {i}")
        for name, p in sae.named_parameters():
            assert_close(per_slice_grads[name][i], p.grad, torch.float32, f"slice {i} grad {name}")


@pytest.mark.parametrize("be", backends("cpu", "torch"))
def test_vmap_over_an_ensemble_of_saes(be):
    # vmapped weights (several SAEs at once): the ops run once per member, same results as one by one
    members = [make("topk", be) for _ in range(3)]
    names = [name for name, _ in members[0].named_parameters()]
    stacked = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in members]) for name in names}
    x = torch.randn(ROWS, D)
    losses = vmap(lambda p: functional_call(members[0], p, (x,)).loss)(stacked)
    for i, member in enumerate(members):
        assert_close(losses[i], member(x).loss, torch.float32, f"member {i}")


def test_vmap_folds_rows_into_one_call(monkeypatch):
    # a vmap over activation batches alone runs each op once on [V * rows, d], not V times
    import importlib

    module = importlib.import_module("flashsae.ops.topk_encode")
    calls = []
    real = module._forward
    monkeypatch.setattr(module, "_forward", lambda x, *rest: calls.append(x.shape) or real(x, *rest))
    sae = make("topk", "torch")
    vmap(lambda x: sae.encode(x).values)(torch.randn(5, ROWS, D))
    assert calls == [torch.Size([5 * ROWS, D])]


def test_transforms_leave_module_state_alone():
    sae = make("jumprelu", "cpu")
    sae.config.l0_warmup_steps = 10
    x = torch.randn(ROWS, D)
    params = {name: p.detach() for name, p in sae.named_parameters()}
    grad(lambda p: functional_call(sae, p, (x,)).loss)(params)
    assert int(sae.num_steps) == 0  # a functional step does not count
    sae(x).loss.backward()
    assert int(sae.num_steps) == 1  # a plain training step does


def test_second_derivative_is_refused_clearly():
    sae = make("topk", "torch")
    x = torch.randn(ROWS, D)
    params = {name: p.detach() for name, p in sae.named_parameters()}
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        torch.func.jacrev(grad(lambda p: functional_call(sae, p, (x,)).loss))(params)


@pytest.mark.parametrize("case", [case for case in ARCHITECTURES if case not in FIXED_K])
def test_a_variable_width_selection_runs_below_the_vmap(case, monkeypatch):
    # the latents are chosen on plain tensors (once per slice for a batch-wide BatchTopK selection,
    # once on the folded rows otherwise); their values come from vmappable torch ops
    from flashsae.ops import _functorch

    calls = []
    real = _functorch._Select.forward
    monkeypatch.setattr(_functorch._Select, "forward", lambda *a: calls.append(a[2].shape) or real(*a))
    sae = make(case, "torch")
    vmap(lambda x: sae.encode(x).values)(torch.randn(4, ROWS, D))
    per_slice = _architecture(case) in ("batchtopk", "matryoshka")
    assert calls and all(shape[0] == (ROWS if per_slice else 4 * ROWS) for shape in calls), calls
