"""Trains one peer SAE (SAELens or dictionary_learning) on a `flashsae cache` directory: the peer half
of benchmarks/quality.py, run with the Python of a separate venv that has the peer installed (never
a flashsae dependency):

    /path/to/peers-venv/bin/python benchmarks/quality_peers.py --library saelens --architecture topk \
        --activations CACHE --out DIR [--tokens 262144 --n-latents 3072 --k 32 --coefficient C]

It imports nothing from flashsae: it reads the cache's train shards with safetensors, feeds the same
token budget in batches of 1024 in a seeded shuffle, trains with the library's own trainer and its
own defaults (learning rate, initialisation, auxiliary losses, normalisation), and saves the SAE in
the library's format under DIR/sae plus DIR/train.json (wall time, settings). Only what a 256-step
run cannot use as given is scaled to the run: warm-up and sparsity warm-up are 5% of the steps (the
libraries' 1000 / 2000-step defaults are longer than the whole run), learning-rate decay starts at
80%, and dictionary_learning's BatchTopK threshold estimate starts at step 64 instead of 1000 (at
its default the threshold would never be estimated and the saved SAE would encode with none).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

LIBRARIES = ("saelens", "dictionary_learning")
ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "gated")
#: Architectures whose sparsity is set by a coefficient (the others by k); quality.py searches it.
PENALTY_ARCHITECTURES = ("jumprelu", "relu", "gated")


def train_activations(cache: Path) -> tuple[torch.Tensor, dict]:
    manifest = json.loads((cache / "manifest.json").read_text())
    (hookpoint,) = manifest["hookpoints"]
    parts = [load_file(str(cache / shard["files"][hookpoint]["path"]))["activations"] for shard in manifest["shards"]]
    return torch.cat(parts).float(), manifest


def batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches: each pass over the rows in a fresh seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]


def matryoshka_widths(n_latents: int) -> list[int]:
    # flashsae's default prefixes (n/8, n/4, n/2, n), used for every library so the nesting is the same
    return [n_latents // 8, n_latents // 4, n_latents // 2, n_latents]


def train_saelens(args, rows: torch.Tensor, out: Path) -> dict:
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedTrainingSAE,
        GatedTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = args.tokens // args.batch_size
    common = {"d_in": rows.shape[1], "d_sae": args.n_latents, "dtype": "float32", "device": "cpu",
              "normalize_activations": "expected_average_only_in"}  # fmt: skip
    warm = max(1, steps // 20)
    if args.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=args.k, **common))
    elif args.architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=args.k, **common))
    elif args.architecture == "matryoshka":
        widths = matryoshka_widths(args.n_latents)
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(k=args.k, matryoshka_widths=widths, **common)
        )
    elif args.architecture == "jumprelu":
        sae = JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(l0_coefficient=args.coefficient, l0_warm_up_steps=warm, **common)
        )
    elif args.architecture == "relu":
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(l1_coefficient=args.coefficient, l1_warm_up_steps=warm, **common)
        )
    else:
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(l1_coefficient=args.coefficient, l1_warm_up_steps=warm, **common))
    trainer_config = SAETrainerConfig(
        total_training_samples=steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=3e-4,  # SAELens' runner default, and lr_end lr / 10 as its runner sets it
        lr_end=3e-5,
        lr_warm_up_steps=warm,
        lr_decay_steps=steps // 5,
        device="cpu",
        n_batches_for_norm_estimate=64,
    )
    trainer = SAETrainer(cfg=trainer_config, sae=sae, data_provider=batches(rows, args.batch_size, args.seed))
    started = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - started
    trained.save_inference_model(out / "sae")
    return {"seconds": seconds, "steps": steps, "lr": trainer_config.lr, "format": "saelens"}


def train_dictionary_learning(args, rows: torch.Tensor, out: Path) -> dict:
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import (
        MatryoshkaBatchTopKSAE,
        MatryoshkaBatchTopKTrainer,
    )
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    steps = args.tokens // args.batch_size
    warm = max(1, steps // 20)
    config = {"steps": steps, "activation_dim": rows.shape[1], "dict_size": args.n_latents, "layer": 3,
              "lm_name": "sentence-transformers/all-MiniLM-L6-v2", "device": "cpu", "seed": args.seed,
              "warmup_steps": warm, "decay_start": int(0.8 * steps)}  # fmt: skip
    threshold = {"threshold_start_step": steps // 4}
    if args.architecture == "topk":
        config |= {"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "k": args.k, **threshold}
    elif args.architecture == "batchtopk":
        config |= {"trainer": BatchTopKTrainer, "dict_class": BatchTopKSAE, "k": args.k, **threshold}
    elif args.architecture == "matryoshka":
        widths = matryoshka_widths(args.n_latents)
        fractions = [(b - a) / args.n_latents for a, b in zip([0, *widths[:-1]], widths, strict=True)]
        config |= {"trainer": MatryoshkaBatchTopKTrainer, "dict_class": MatryoshkaBatchTopKSAE, "k": args.k,
                   "group_fractions": fractions, **threshold}  # fmt: skip
    elif args.architecture == "jumprelu":
        # dictionary_learning's JumpReLU trainer has its own L0 target: no coefficient search needed
        config |= {"trainer": JumpReluTrainer, "dict_class": JumpReluAutoEncoder, "target_l0": float(args.k),
                   "sparsity_warmup_steps": warm}  # fmt: skip
    elif args.architecture == "relu":
        config |= {"trainer": StandardTrainerAprilUpdate, "dict_class": AutoEncoder, "l1_penalty": args.coefficient,
                   "sparsity_warmup_steps": warm}  # fmt: skip
    else:
        config |= {"trainer": GatedSAETrainer, "dict_class": GatedAutoEncoder, "l1_penalty": args.coefficient,
                   "sparsity_warmup_steps": warm}  # fmt: skip
    started = time.perf_counter()
    trainSAE(batches(rows, args.batch_size, args.seed), [config], steps=steps, save_dir=str(out / "run"),
             normalize_activations=True, device="cpu")  # fmt: skip
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "steps": steps, "format": "dictionary_learning", "path": "run/trainer_0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", required=True, choices=LIBRARIES)
    parser.add_argument("--architecture", required=True, choices=ARCHITECTURES)
    parser.add_argument("--activations", required=True, type=Path, help="a flashsae cache directory")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n-latents", type=int, default=3072)
    parser.add_argument("--k", type=int, default=32, help="k of the TopK family; the L0 target of JumpReLU (DL)")
    parser.add_argument("--coefficient", type=float, help="sparsity coefficient of jumprelu / relu / gated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.architecture in PENALTY_ARCHITECTURES and args.coefficient is None:
        if not (args.library == "dictionary_learning" and args.architecture == "jumprelu"):
            parser.error(f"--coefficient: {args.library} {args.architecture} needs a sparsity coefficient")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows, manifest = train_activations(args.activations)
    args.out.mkdir(parents=True, exist_ok=True)
    train = train_saelens if args.library == "saelens" else train_dictionary_learning
    record = train(args, rows, args.out)
    record |= {"library": args.library, "architecture": args.architecture, "tokens": args.tokens,
               "n_latents": args.n_latents, "k": args.k, "coefficient": args.coefficient,
               "train_rows": rows.shape[0], "torch": torch.__version__,
               "threads": torch.get_num_threads()}  # fmt: skip
    try:
        from importlib.metadata import version

        record["version"] = version("sae-lens" if args.library == "saelens" else "dictionary-learning")
    except Exception:  # noqa: BLE001 - a version is a nicety for the record, not a requirement
        record["version"] = None
    if not math.isfinite(record["seconds"]):
        raise RuntimeError("training time is not finite")
    (args.out / "train.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
