"""torch.distributed on CPU (gloo, 2 processes): latent-sharded and data-parallel training give the same
weights as single-process training, DDP wraps a TopKSAE, and sharded checkpoints reload on another
world size.

Each test spawns 2 ranks; every rank also runs the single-process reference itself (float64, same seed,
same data) and compares: a mismatch raises in the rank and fails the test with its traceback.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashsae import TopKSAE
from flashsae.distributed import (
    DeadLatents,
    ShardedTopKSAE,
    consolidate,
    init_layout,
    load_optimizer_sharded,
    load_sharded,
    reduce_gradients,
    save_sharded,
    single_process,
)
from flashsae.optim import SparseAdam, normalize_rows_, remove_parallel_row_grads_

D, N, K, AUX_K, BATCH, STEPS, LR = 24, 61, 5, 7, 16, 4, 3e-3  # n = 61: shards of 31 and 30 latents
TOL = 1e-10

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ------------------------------------------------------------------------------------------ helpers


def full_sae() -> TopKSAE:
    torch.manual_seed(1234)
    return TopKSAE(D, N, K, aux_k=AUX_K, dtype=torch.float64)


def batches(count: int, rows: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    return [torch.randn(rows, D, generator=generator, dtype=torch.float64) for _ in range(count)]


def dead_masks(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.rand(N, generator=generator) < 0.3 for _ in range(count)]


def make_optimizer(kind: str, sae: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sparse_adam":
        return SparseAdam(sae.parameters(), lr=LR)
    return torch.optim.Adam(sae.parameters(), lr=LR, foreach=False)


def finish_step(sae, optimizer) -> None:
    """The trainer's unit-norm decoder step: parallel-gradient removal, Adam, row renormalization."""
    sae.remove_decoder_parallel_grads_()
    remove_parallel_row_grads_(sae.W_dec)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rows = optimizer.updated_rows(sae.W_dec) if isinstance(optimizer, SparseAdam) else None
    if rows is None:
        sae.normalize_decoder_()
    else:
        normalize_rows_(sae.W_dec, rows)


def reference_run(kind: str, steps: int, *, halves: int = 1, start: TopKSAE | None = None) -> TopKSAE:
    """Single process: `steps` steps on the full batches; with halves=2 each step averages the
    gradients of the two halves of the batch (what 2 data-parallel replicas compute)."""
    sae = start or full_sae()
    optimizer = make_optimizer(kind, sae)
    for x, dead in zip(batches(steps, BATCH * halves), dead_masks(steps), strict=True):
        for part in x.chunk(halves):
            sae(part, dead_mask=dead).loss.backward()
        if halves > 1:
            for p in sae.parameters():
                if p.grad is not None:
                    p.grad /= halves
                collector = getattr(p, "_flashsae_row_grads", None)
                if collector is not None and len(collector):
                    rows, grads = collector.coalesced()
                    collector.set(rows, grads / halves)
        finish_step(sae, optimizer)
    return sae


def assert_same_weights(sae: TopKSAE, reference: TopKSAE, what: str) -> None:
    for name, value in reference.state_dict().items():
        got = sae.state_dict()[name]
        err = (got - value).abs().max().item()
        assert err <= TOL, f"{what}: {name} differs from single-process training by {err:.3e}"


def sharded_run(kind: str, layout, steps: int, sharded: ShardedTopKSAE | None = None, optimizer=None, first: int = 0):
    sharded = sharded or ShardedTopKSAE.from_full(full_sae(), layout)
    optimizer = optimizer or make_optimizer(kind, sharded)
    rows = BATCH * layout.dp_size
    reference = full_sae()
    for step, (x, dead) in enumerate(zip(batches(first + steps, rows), dead_masks(first + steps), strict=True)):
        if step < first:
            continue
        local_x = x.chunk(layout.dp_size)[layout.dp_rank]
        out = sharded(local_x, dead_mask=dead[sharded.start : sharded.end])
        if layout.dp_size == 1 and kind == "adam" and step == 0:  # the forward itself is TopKSAE's
            expected = reference(local_x, dead_mask=dead)
            assert torch.equal(out.latents.indices, expected.latents.indices), "global top-k selection"
            assert abs(out.loss.item() - expected.loss.item()) <= TOL and out.auxk_loss.item() > 0
        out.loss.backward()
        reduce_gradients(sharded, layout)
        finish_step(sharded, optimizer)
    return sharded, optimizer


def _worker(rank: int, world: int, init_file: str, scenario: str, directory: str) -> None:
    os.environ["FLASHSAE_POISON_OUTPUTS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        SCENARIOS[scenario](directory)
    finally:
        dist.destroy_process_group()


def spawn(scenario: str, world: int = 2) -> None:
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "rendezvous")
        mp.spawn(_worker, args=(world, init_file, scenario, directory), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------- scenarios


def latent_sharded(directory: str) -> None:
    layout = init_layout(tensor_parallel=2)
    assert (layout.tensor_parallel, layout.dp_size) == (2, 1)
    for kind in ("adam", "sparse_adam"):
        sharded, _ = sharded_run(kind, layout, STEPS)
        assert sharded.n_local == (31 if layout.tp_rank == 0 else 30)
        gathered = sharded.gather_full()
        if layout.rank == 0:
            assert_same_weights(gathered, reference_run(kind, STEPS), f"tensor parallel, {kind}")
        else:
            assert gathered is None
    # dead-latent counters: sharded, and the global fraction is the whole SAE's
    sharded = ShardedTopKSAE.from_full(full_sae(), layout)
    tracker = DeadLatents(sharded.n_local, layout)
    x = batches(1, BATCH)[0]
    sharded(x)
    tracker.update(sharded.last_fired, BATCH)
    latents = full_sae().encode(x)
    fired = torch.zeros(N, dtype=torch.bool)
    fired[latents.indices[latents.values > 0].long()] = True  # the latents that fire in one process
    assert torch.equal(tracker.since_fired == 0, fired[sharded.start : sharded.end])
    assert tracker.dead_fraction(BATCH) == pytest.approx(float((~fired).float().mean()))


def data_parallel(directory: str) -> None:
    layout = init_layout(tensor_parallel=1)
    assert (layout.tensor_parallel, layout.dp_size) == (1, 2)
    for kind in ("sparse_adam", "adam"):
        sharded, _ = sharded_run(kind, layout, STEPS)
        assert_same_weights(sharded.gather_full(), reference_run(kind, STEPS, halves=2), f"data parallel, {kind}")
    # torch's DDP wraps a TopKSAE as it is (dense gradients, averaged in its backward hooks)
    sae = full_sae()
    model = torch.nn.parallel.DistributedDataParallel(sae)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR, foreach=False)
    for x, dead in zip(batches(STEPS, 2 * BATCH), dead_masks(STEPS), strict=True):
        model(x.chunk(2)[layout.rank], dead_mask=dead).loss.backward()
        finish_step(sae, optimizer)
    assert_same_weights(sae, reference_run("adam", STEPS, halves=2), "DistributedDataParallel")


def checkpoints(directory: str) -> None:
    layout = init_layout(tensor_parallel=2)
    path = os.path.join(directory, "sharded")
    half = STEPS // 2
    sharded, optimizer = sharded_run("sparse_adam", layout, half)
    tracker = DeadLatents(sharded.n_local, layout)
    tracker.since_fired += torch.arange(sharded.n_local) + sharded.start  # recognizable counters
    save_sharded(path, sharded, optimizer, since_fired=tracker.since_fired, extra={"step": half})
    straight = reference_run("sparse_adam", STEPS)

    # same world size: continue in 2 shards
    again, counters = load_sharded(path, layout)
    assert torch.equal(counters, tracker.since_fired)
    resumed_optimizer = SparseAdam(again.parameters(), lr=LR)
    load_optimizer_sharded(path, again, resumed_optimizer)
    again, _ = sharded_run("sparse_adam", layout, STEPS - half, again, resumed_optimizer, first=half)
    gathered = again.gather_full()

    if layout.rank == 0:
        assert_same_weights(gathered, straight, "2 shards -> 2 shards")
        # another world size: one process continues the 2-shard checkpoint
        one, counters = load_sharded(path, single_process())
        assert torch.equal(counters, torch.arange(N))
        optimizer = SparseAdam(one.parameters(), lr=LR)
        load_optimizer_sharded(path, one, optimizer)
        one, _ = sharded_run("sparse_adam", single_process(), STEPS - half, one, optimizer, first=half)
        assert_same_weights(one.gather_full(), straight, "2 shards -> 1 process")
        assert consolidate(path).W_enc.shape == (N, D)
        # and one process writes a checkpoint the 2 shards continue
        single, single_optimizer = sharded_run("sparse_adam", single_process(), half)
        save_sharded(os.path.join(directory, "single"), single, single_optimizer)
    dist.barrier()
    two, _ = load_sharded(os.path.join(directory, "single"), layout)
    optimizer = SparseAdam(two.parameters(), lr=LR)
    load_optimizer_sharded(os.path.join(directory, "single"), two, optimizer)
    two, _ = sharded_run("sparse_adam", layout, STEPS - half, two, optimizer, first=half)
    gathered = two.gather_full()
    if layout.rank == 0:
        assert_same_weights(gathered, straight, "1 process -> 2 shards")


def both(directory: str) -> None:
    layout = init_layout(tensor_parallel=2)
    assert (layout.tensor_parallel, layout.dp_size) == (2, 2)
    sharded, _ = sharded_run("sparse_adam", layout, STEPS)
    gathered = sharded.gather_full()
    if layout.tp_rank == 0:
        assert_same_weights(gathered, reference_run("sparse_adam", STEPS, halves=2), "2 replicas x 2 shards")


SCENARIOS = {"latent_sharded": latent_sharded, "data_parallel": data_parallel, "checkpoints": checkpoints, "both": both}


# -------------------------------------------------------------------------------------------- tests


def test_latent_sharded_training_matches_one_process():
    spawn("latent_sharded")


def test_data_parallel_and_ddp_match_one_process():
    spawn("data_parallel")


def test_sharded_checkpoints_reload_on_another_world_size():
    spawn("checkpoints")


def test_data_parallel_times_latent_sharded():
    spawn("both", world=4)


def test_reference_checks_can_fail():
    # the comparison the ranks run is strict: one step of difference is caught
    with pytest.raises(AssertionError, match=r"differs from single-process training"):
        assert_same_weights(reference_run("adam", 1), reference_run("adam", 2), "sanity")


def test_torch_adam_state_round_trips(tmp_path):
    # the sharded checkpoint also carries torch.optim.Adam's state (one process: a world of one)
    steps = list(zip(batches(4, BATCH), dead_masks(4), strict=True))

    def train(sae, optimizer, chosen):
        for x, dead in chosen:
            sae(x, dead_mask=dead).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    straight = ShardedTopKSAE.from_full(full_sae(), single_process())
    train(straight, torch.optim.Adam(straight.parameters(), lr=LR), steps)
    first = ShardedTopKSAE.from_full(full_sae(), single_process())
    optimizer = torch.optim.Adam(first.parameters(), lr=LR)
    train(first, optimizer, steps[:2])
    save_sharded(tmp_path / "adam", first, optimizer)
    resumed, counters = load_sharded(tmp_path / "adam")
    assert counters is None
    optimizer = torch.optim.Adam(resumed.parameters(), lr=LR)
    load_optimizer_sharded(tmp_path / "adam", resumed, optimizer)
    train(resumed, optimizer, steps[2:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"the checkpoint holds Adam state, not SparseAdam"):
        load_optimizer_sharded(tmp_path / "adam", resumed, SparseAdam(resumed.parameters()))


def test_sharded_sae_refuses_options_it_does_not_implement():
    from flashsae.modules.topk import TopKConfig

    for options in ({"multi_topk": True}, {"apply_b_dec_to_input": False}, {"input_norm": "layer_norm"}):
        with pytest.raises(ValueError, match=r"config: "):
            ShardedTopKSAE(TopKConfig(d_in=8, n_latents=16, k=2, **options), single_process())
    with pytest.raises(ValueError, match=r"n_latents \(3\) must be at least the number of shards"):
        from flashsae.distributed import Layout

        ShardedTopKSAE(TopKConfig(d_in=8, n_latents=3, k=1), Layout(4, 0, 4, 0, 1, 0))


@pytest.mark.parametrize("precision", ["certified", "auto"])
def test_sharded_sae_encodes_at_its_precision(monkeypatch, precision):
    # the shards' candidate pass runs at the config's precision, with the exact precision's results
    import importlib

    from flashsae.modules.topk import TopKConfig

    cpu_path = importlib.import_module("flashsae.ops._topk_encode_cpu")
    monkeypatch.setattr(cpu_path, "bf16_gemm_share", lambda: 0.3)  # "auto" = certified
    seen = []
    encode = cpu_path.encode
    monkeypatch.setattr(cpu_path, "encode", lambda *a: seen.append(a[7]) or encode(*a))
    saes = {}
    for p in ("exact", precision):
        torch.manual_seed(0)
        saes[p] = ShardedTopKSAE(TopKConfig(d_in=24, n_latents=300, k=5, precision=p), single_process())
    x = torch.randn(40, 24)
    seen.clear()
    exact, other = saes["exact"](x), saes[precision](x)
    assert seen == ["exact", "certified"]
    assert torch.equal(exact.x_hat, other.x_hat) and torch.equal(exact.latents.indices, other.latents.indices)
    assert torch.equal(saes["exact"].encode(x).values, saes[precision].encode(x).values)
