"""Lottery tickets on digits: the dense network against its winning ticket and the random re-initialisation
control, at several sparsities, on the held-out test split.

For each seed a small MLP (PyTorch's default initialisation, so the control's fresh weights come from the same
distribution as the ticket's) is

* ``dense``  — trained once under the recipe;
* ``ticket`` — :func:`autoprune.lottery.find_ticket`: ``--rounds`` rounds of iterative magnitude pruning (one
  global threshold, the same fraction of survivors each round), rewinding the survivors to their values after
  ``--rewind-step`` steps (0: the initialisation) and retraining from there;
* ``reinit`` — :func:`autoprune.lottery.random_reinit`: the ticket's masks on freshly drawn weights, trained
  exactly as the ticket was.

Accuracies are on the digits test split (180 images, never trained on; one image is 0.56 points), mean ± standard
deviation over ``--seeds`` seeds; ``gap`` is ticket - reinit in points. ``s`` is the wall time of one seed's
find_ticket + control (``rounds + 2`` trainings). One torch thread.

    .venv/bin/python benchmarks/lottery.py [--sparsities 0.5 0.8 0.9 0.97] [--rounds 3] [--rewind-step 0]
        [--epochs 8] [--hidden 128 64] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from autoprune.data import Dataset, load_dataset
from autoprune.gradual import train
from autoprune.lottery import find_ticket, random_reinit
from autoprune.quality import Accuracy
from autoprune.recovery import RecoveryConfig


def mlp(hidden: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def test_accuracy(model: nn.Module, ds: Dataset) -> float:
    return 100.0 * Accuracy()(model, ds.test_view())


def cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {spread:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.97])
    parser.add_argument("--rounds", type=int, default=3, help="pruning rounds (each keeps the same fraction)")
    parser.add_argument("--rewind-step", type=int, default=0, help="optimizer step the survivors are rewound to")
    parser.add_argument("--epochs", type=float, default=8.0, help="epochs of every training")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (constant)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 64], help="hidden widths of the MLP")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    ds = load_dataset("digits")
    assert ds.has_test
    recipe = RecoveryConfig(finetune_epochs=args.epochs, finetune_lr=args.lr, batch_size=args.batch)
    steps = recipe.total_steps(ds.num_train)
    print(
        f"digits: {ds.num_train} train / {ds.num_test} test; MLP 64-{'-'.join(map(str, args.hidden))}-10; "
        f"{steps} steps a training (AdamW lr {args.lr}, batch {args.batch}); {args.rounds} rounds, "
        f"rewind to step {args.rewind_step}; {args.seeds} seeds; torch {torch.__version__}, 1 thread"
    )
    seeds = list(range(args.seeds))
    dense: list[float] = []
    t = time.perf_counter()
    for seed in seeds:
        model = mlp(args.hidden, seed)
        train(model, ds, recipe)
        dense.append(test_accuracy(model, ds))
    dense_s = (time.perf_counter() - t) / len(seeds)
    header = f"{'sparsity':>8} {'dense %':>14} {'ticket %':>14} {'reinit %':>14} {'gap pt':>13} {'s':>6}"
    print(header)
    print("-" * len(header))
    print(f"{0.0:8.2f} {cell(dense)} {'':>14} {'':>14} {'':>13} {dense_s:6.1f}")
    for target in args.sparsities:
        tickets: list[float] = []
        controls: list[float] = []
        took: list[float] = []
        achieved = 0.0
        for seed in seeds:
            t = time.perf_counter()
            result = find_ticket(
                mlp(args.hidden, seed), ds, recipe, sparsity=target, rounds=args.rounds, rewind_step=args.rewind_step
            )
            control = random_reinit(result, ds, recipe, seed=10_000 + seed)
            took.append(time.perf_counter() - t)
            achieved = result.sparsity
            tickets.append(test_accuracy(result.model, ds))
            controls.append(test_accuracy(control, ds))
        gaps = [a - b for a, b in zip(tickets, controls, strict=True)]
        print(
            f"{achieved:8.3f} {cell(dense)} {cell(tickets)} {cell(controls)} {cell(gaps):>13} "
            f"{statistics.mean(took):6.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
