"""flashsae's benchmarks: the plain-PyTorch baselines, the memory meter, the timer, the training-step
comparison behind ``flashsae bench`` (:mod:`flashsae.bench.train_step`), the per-op cases of the
benchmark suite in ``benchmarks/`` (:mod:`flashsae.bench.op_cases`) and their report
(:mod:`flashsae.bench.report`: markdown + PNG plots).

The submodules that run benchmarks are imported on use: ``python -m flashsae.bench.train_step`` is
the per-run worker process and must not be imported by the package first.
"""

from .baselines import DenseTopKSAE, SparsifyStyleEncoder, SparsifyStyleTopKSAE, embedding_bag_decode
from .environment import environment
from .memory import PeakMemory
from .timer import Spread, synchronized, time_ms

__all__ = [
    "DenseTopKSAE",
    "PeakMemory",
    "SparsifyStyleEncoder",
    "SparsifyStyleTopKSAE",
    "Spread",
    "embedding_bag_decode",
    "environment",
    "synchronized",
    "time_ms",
]
