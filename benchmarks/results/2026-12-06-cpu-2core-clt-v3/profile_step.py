"""The per-phase and per-op breakdown of clt_step.md: one provider of flashsae.bench.clt_step, 2 warm-up
steps, 3 steps with manual timers (forward / backward, which includes SparseAdam's row updates
during backward / optimizer.step + zero_grad) and minor page faults, then one step under
torch.profiler (self CPU time per op).

    PYTHONSAFEPATH=1 python benchmarks/results/2026-12-06-cpu-2core-clt-v3/profile_step.py flashsae --prof
"""

import resource
import sys
import time

import torch

from flashsae.bench.clt_step import CLTBenchConfig, prepare

torch.set_num_threads(2)
provider = sys.argv[1] if len(sys.argv) > 1 else "flashsae"
model, opt, loss_fn = prepare(provider, CLTBenchConfig())


def step():
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(2):
    step()
for _ in range(3):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    loss = loss_fn()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(f"fwd {1e3 * (t1 - t0):.0f} bwd(+eager adam) {1e3 * (t2 - t1):.0f} step {1e3 * (t3 - t2):.0f} "
          f"total {1e3 * (t3 - t0):.0f} ms, minor faults {faults}", flush=True)
if "--prof" in sys.argv:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=50))
