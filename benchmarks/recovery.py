"""Recovery recipes against measured speed-up: what a pruned model is worth after BN-only, short and full
recovery, on a held-out test split the recipes never saw.

For each workload and uniform ratio, the plan is applied once and recovered three ways:

* ``bn``    — BatchNorm re-estimation only (what every search candidate gets);
* ``short`` — + 200 distilled AdamW steps at a constant LR (the search's former ``finetune_top`` recipe);
* ``full``  — + SGD (Nesterov) with warm-up and cosine LR for ``--epochs`` epochs, distilled from the unpruned
  model, early stopping on the validation loss with the best checkpoint restored.

Early stopping watches 10% of the training split, carved out of it with a seed; the dataset's own validation
split (which the reference weights never trained on) is the **test** split, seen by nothing but the final
figures. Latency: torch eager, one thread, interleaved
with the unpruned model (the speed-up is the median of per-pair ratios); ``--onnx`` also times the exported
ONNX files in ONNX Runtime, interleaved the same way.

    .venv/bin/python benchmarks/recovery.py [--workloads resnet20-digits cnn1d-mnist1d] [--ratios 0.3 0.5 0.7]
        [--batch 1] [--onnx] [--epochs 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from autoprune.data import Dataset
from autoprune.latency import LatencyConfig, Meter
from autoprune.objective import Objective
from autoprune.recovery import RecoveryConfig, recover
from autoprune.workloads import load_workload


def holdout(ds: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """(a dataset whose validation split is ``fraction`` of the training split, carved out of it, the
    original validation split as test inputs and labels). The reference weights never trained on the
    original validation split, and no recipe sees it: it is the test split."""
    assert ds.y_val is not None and ds.y_train is not None
    perm = torch.randperm(ds.num_train, generator=torch.Generator().manual_seed(seed))
    n = max(8, int(fraction * ds.num_train))
    va, tr = perm[:n].sort().values, perm[n:].sort().values
    split = Dataset(ds.name, ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va], num_classes=ds.num_classes)
    return split, ds.x_val, ds.y_val


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).float().mean())


def onnx_speedup(model: torch.nn.Module, base: torch.nn.Module, example: torch.Tensor) -> float:
    import numpy as np
    import onnxruntime as ort

    from autoprune.export import export_onnx

    if True:
        sessions = []
        for m in (model, base):
            data, _ = export_onnx(m, (example,))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            sessions.append(ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]))
        feed = {sessions[0].get_inputs()[0].name: example.numpy()}
        feed_b = {sessions[1].get_inputs()[0].name: example.numpy()}
        for _ in range(20):
            sessions[0].run(None, feed), sessions[1].run(None, feed_b)
        ratios = []
        for _ in range(200):
            t0 = time.perf_counter()
            sessions[0].run(None, feed)
            t1 = time.perf_counter()
            sessions[1].run(None, feed_b)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
        return float(np.median(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["resnet20-digits", "cnn1d-mnist1d"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--epochs", type=float, default=30.0, help="epochs of the full recipe")
    parser.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate of the full recipe")
    parser.add_argument("--onnx", action="store_true", help="also time the exported ONNX files in ONNX Runtime")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the timed input")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    recipes = {
        "bn": RecoveryConfig(seed=args.seed),
        "short": RecoveryConfig(finetune_steps=200, distill=True, finetune_lr=2e-3, seed=args.seed),
        "full": RecoveryConfig(
            finetune_epochs=args.epochs,
            optimizer="sgd",
            finetune_lr=args.lr,
            weight_decay=5e-4,
            lr_schedule="cosine",
            warmup_steps=20,
            distill=True,
            distill_alpha=0.7,
            early_stopping_patience=8,
            batch_size=64,
            seed=args.seed,
        ),
    }
    meter = Meter(LatencyConfig(threads=1, batch_size=args.batch, max_seconds=3.0))
    header = f"{'workload':<16} {'plan':<12} {'bn':>7} {'short':>7} {'full':>7} {'Δfull pt':>8} {'eager x':>8}"
    header += f" {'ORT x':>6}" if args.onnx else ""
    header += f" {'full s':>7}"
    print(header)
    print("-" * len(header))
    for name in args.workloads:
        wl = load_workload(name)
        val, x_test, y_test = holdout(wl.dataset, seed=args.seed)
        objective = Objective(wl.model, wl.example_inputs, val, metric="accuracy", round_to=8)
        base_acc = accuracy(objective.base, x_test, y_test)
        print(f"{name:<16} {'unpruned':<12} {base_acc:7.4f} {'':>7} {'':>7} {'':>8} {1.0:8.2f}")
        for ratio in args.ratios:
            plan = objective.plan(dict.fromkeys(objective.group_names, ratio))
            scores: dict[str, float] = {}
            model = None
            took = 0.0
            for label, recipe in recipes.items():
                model = objective.prune(plan)
                t = time.perf_counter()
                recover(model, val, recipe, teacher=objective.base)
                took = time.perf_counter() - t
                scores[label] = accuracy(model, x_test, y_test)
            assert model is not None
            latency = meter.measure(model, wl.example_inputs, reference=objective.base)
            row = (
                f"{'':<16} {f'uniform {ratio:.1f}':<12} {scores['bn']:7.4f} {scores['short']:7.4f} "
                f"{scores['full']:7.4f} {100 * (scores['full'] - base_acc):+8.2f} {latency.speedup or 0:8.2f}"
            )
            if args.onnx:
                timed = wl.example_inputs.expand(args.batch, *wl.example_inputs.shape[1:]).contiguous()
                row += f" {onnx_speedup(model, objective.base, timed):6.2f}"
            print(row + f" {took:7.1f}", flush=True)


if __name__ == "__main__":
    main()
