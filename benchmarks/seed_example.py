"""The seed's example: 50% unstructured sparsity does not make dense kernels faster; structured pruning does.

Model and data: the dense MLP ``784-128-64-10`` (``nn.Sequential`` of Linear/ReLU) on the shipped ``digits``
dataset, its 8x8 images upsampled bilinearly to 28x28 and flattened to 784 features (1438 train / 179 val /
180 test, the splits of :func:`autoprune.data.load_dataset`). Every model below starts from one dense model
trained from a fixed seed with :func:`autoprune.gradual.train`:

* ``dense``        — as trained;
* ``sparse 50%``   — :func:`autoprune.gradual.gradual_magnitude_prune` trains a copy further while a cubic
  :class:`~autoprune.gradual.PolynomialDecay` (0 -> 50%) raises the global unstructured sparsity of its three
  weight matrices, then :func:`~autoprune.gradual.strip` folds the masks in: a plain model, half of its weights
  zero, the same shapes and MACs as the dense one;
* ``struct r``     — :func:`autoprune.gradual.iterative_prune` removes a fraction ``r`` of the neurons of both
  hidden layers (widths rounded to a multiple of 8) in three increments (cubic schedule), fine-tuning after
  each (the same number of steps, 3 x ``--recover-steps`` = ``--prune-steps``, and the same recipe as the
  sparse model). The fastest one whose test accuracy is within ``--tolerance`` points of the sparse model's is the
  structured model of equal accuracy (marked ``*``).

Each model is timed against the dense one with :class:`autoprune.latency.Meter`: one thread, warm-up, repeats
until the median settles, candidate and dense model interleaved pair by pair; ``ratio`` is the median of the
per-pair candidate/dense time ratios (below 1: faster), median [min-max] over ``--trials`` measurements;
``IQR %`` is the candidate's inter-quartile range over its median; ``dense ms`` the dense model's median in the
same window. Torch eager and ONNX Runtime (CPU execution provider), at batch 1 (an MLP this small is
overhead-bound there: the matmuls take microseconds, dispatch dominates) and batch 256 (compute-bound).
Accuracy is on the held-out test split.

    .venv/bin/python benchmarks/seed_example.py [--quick] [--ratios 0.25 0.5 0.75] [--batches 1 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.cost import count_macs
from autoprune.data import Dataset, load_dataset
from autoprune.gradual import PolynomialDecay, gradual_magnitude_prune, iterative_prune, sparsity, strip, train
from autoprune.latency import LatencyConfig, Meter, batched
from autoprune.plan import Plan
from autoprune.pruning import analyze
from autoprune.quality import Accuracy
from autoprune.recovery import RecoveryConfig


def digits_28x28(seed: int) -> Dataset:
    """The shipped digits dataset with its 8x8 images upsampled (bilinear) to 28x28 and flattened to 784."""
    ds = load_dataset("digits", seed=seed)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)

    assert ds.x_test is not None
    return Dataset("digits28", up(ds.x_train), ds.y_train, up(ds.x_val), ds.y_val, 10, up(ds.x_test), ds.y_test)


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter training and timing (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights, splits and batches")
    parser.add_argument("--train-steps", type=int, default=1500, help="training steps of the dense model")
    parser.add_argument("--prune-steps", type=int, default=1200, help="training steps of gradual pruning")
    parser.add_argument("--recover-steps", type=int, default=400, help="fine-tuning steps after each of 3 increments")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="structured ratios")
    parser.add_argument("--tolerance", type=float, default=0.5, help="accuracy points that count as equal")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256], help="batch sizes of the timed input")
    parser.add_argument("--trials", type=int, default=3, help="interleaved measurements per model, runtime, batch")
    parser.add_argument("--max-seconds", type=float, default=1.0, help="time cap of one measurement")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.prune_steps, args.recover_steps = 400, 240, 80
        args.trials, args.max_seconds = 1, 0.3
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    ds = digits_28x28(args.seed)
    test = ds.test_view()
    x = ds.x_val[:1]
    acc = {}

    # (1) the dense model
    dense = mlp(args.seed)
    train(dense, ds, RecoveryConfig(finetune_steps=args.train_steps, finetune_lr=1e-3, lr_schedule="cosine"))
    models: dict[str, nn.Module] = {"dense": dense.eval()}

    # (2) gradual magnitude pruning 0 -> 50% (cubic schedule) while training continues, then strip
    sparse = copy.deepcopy(dense)
    frequency = max(1, args.prune_steps // 30)
    end = int(0.6 * args.prune_steps) // frequency * frequency  # on the grid: the last update reaches 50%
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=end, power=3, frequency=frequency)
    recipe = RecoveryConfig(finetune_steps=args.prune_steps, finetune_lr=1e-3)
    report = gradual_magnitude_prune(sparse, ds, schedule, recipe)
    models["sparse 50%"] = strip(sparse).eval()
    print(
        f"gradual pruning: {len(report.updates)} mask updates over steps 0..{end} of {report.steps}; "
        f"stripped sparsity {100 * sparsity(models['sparse 50%']):.1f}% of the weights"
    )

    # (3) structured: hidden widths, iterative with recovery fine-tuning
    recovery = RecoveryConfig(finetune_steps=args.recover_steps, finetune_lr=1e-3)
    groups = analyze(dense, x).names
    widths: dict[str, str] = {"dense": "128-64", "sparse 50%": "128-64"}
    for ratio in args.ratios:
        plan = Plan.uniform(groups, ratio, round_to=8)
        result = iterative_prune(dense, x, ds, plan, steps=3, recovery=recovery, schedule="cubic")
        name = f"struct {ratio:g}"
        models[name] = result.model.eval()
        widths[name] = "-".join(str(w) for _, w in result.widths)
    for name, model in models.items():
        acc[name] = 100.0 * Accuracy()(model, test)
    built_s = time.perf_counter() - t_start

    # (4) timing, interleaved with the dense model
    timed: dict[tuple[str, str, int], tuple[float, float, float, list[float]]] = {}
    for batch in args.batches:
        for name, model in models.items():
            for runtime in args.runtimes:
                cfg = LatencyConfig(
                    runtime=runtime,
                    threads=1,
                    batch_size=batch,
                    warmup=10,
                    min_repeats=30,
                    max_repeats=500,
                    max_seconds=args.max_seconds,
                )
                trials = [Meter(cfg).measure(model, x, reference=dense) for _ in range(args.trials)]
                timed[(name, runtime, batch)] = (
                    statistics.median(t.median_ms for t in trials),
                    statistics.median(100.0 * t.spread for t in trials),
                    statistics.median(t.reference_median_ms or 0.0 for t in trials),
                    [t.ratio or 0.0 for t in trials],
                )
    protocol = trials[-1].protocol

    def ratio(name: str, runtime: str, batch: int) -> float:
        return statistics.median(timed[(name, runtime, batch)][3])

    big = max(args.batches)
    main_rt = "onnxruntime" if "onnxruntime" in args.runtimes else args.runtimes[0]
    structured = [n for n in models if n.startswith("struct")]
    equal = [n for n in structured if acc[n] >= acc["sparse 50%"] - args.tolerance]
    chosen = min(equal, key=lambda n: statistics.mean(ratio(n, r, big) for r in args.runtimes)) if equal else None

    print(
        f"\ndigits 28x28 (784 features), MLP 784-128-64-10; 1 thread; torch {torch.__version__}; {args.trials} "
        f"trial(s); built in {built_s:.0f} s; * = fastest structured model within {args.tolerance:g} pt of sparse"
        f"\ntest split {test.num_val} samples (1 sample = {100 / test.num_val:.2f} pt); sparse and structured get the "
        f"same training after the dense model ({args.prune_steps} vs 3 x {args.recover_steps} steps, AdamW lr 1e-3)"
    )
    header = (
        f"{'model':<12} {'hidden':>7} {'test acc':>8} {'zeros %':>7} {'nonzero':>8} {'MMACs':>6} "
        f"{'batch':>5} {'runtime':<11} {'median ms':>9} {'IQR %':>6} {'dense ms':>8} {'ratio vs dense [min-max]':>25}"
    )
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        for name, model in models.items():
            macs, _ = count_macs(model, batched(x, 1))
            mark = "*" if name == chosen else " "
            for i, runtime in enumerate(args.runtimes):
                median_ms, iqr, dense_ms, ratios = timed[(name, runtime, batch)]
                lead = (
                    f"{name + mark:<12} {widths[name]:>7} {acc[name]:8.2f} {100 * sparsity(model):7.1f} "
                    f"{nonzero(model):8d} {macs * batch / 1e6:6.2f}"
                    if i == 0
                    else " " * 52
                )
                print(
                    f"{lead} {batch:5d} {runtime:<11} {median_ms:9.4f} {iqr:6.1f} {dense_ms:8.4f} "
                    f"{statistics.median(ratios):9.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
                )
        print()
    print(f"load average {protocol.load_before} -> {protocol.load_after}; {protocol.machine}")

    small = min(args.batches)
    rts = ", ".join(f"{ratio('sparse 50%', r, big):.2f}x in {r}" for r in args.runtimes)
    print(
        f"\n50% sparse (acc {acc['sparse 50%']:.1f}%, same MACs): {rts} at batch {big}; "
        f"{ratio('sparse 50%', main_rt, small):.2f}x at batch {small} ({main_rt}): zeros do not speed up dense kernels."
    )
    if chosen is None:
        print(f"structured: no ratio reached the sparse accuracy within {args.tolerance:g} pt; try smaller --ratios.")
    else:
        rts = ", ".join(f"{ratio(chosen, r, big):.2f}x in {r}" for r in args.runtimes)
        print(
            f"{chosen} (hidden {widths[chosen]}, acc {acc[chosen]:.1f}%): {rts} at batch {big}; "
            f"{ratio(chosen, main_rt, small):.2f}x at batch {small} ({main_rt}, overhead-bound)."
        )


if __name__ == "__main__":
    main()
