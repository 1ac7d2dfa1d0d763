"""Per-candidate wall time of the evaluation pipeline against its floor.

For ResNet-20 on digits and the 1-D CNN on MNIST-1D, a few seeded random plans are evaluated through the
``Objective``; each candidate's wall time is split into prune / recover / evaluate / measure / cost, and compared
with the *floor*: the forward passes that cannot be avoided (BatchNorm re-estimation batches and the evaluation
pass over the validation split, re-timed bare on the same pruned model) plus the timing runs themselves
(warm-up and repeats of the candidate and of the interleaved unpruned model). Overhead = total - floor.

oneDNN creates a primitive per new layer shape and batch size on first use (~0.5-1 ms a forward here): a cost
of running any new architecture, not of this pipeline. The benchmark runs the floor's forward passes once on
cold caches before each evaluation and once warm after it; the difference is printed as ``first_use``, and the
evaluation itself runs warm, so ``overhead`` is what the pipeline adds beyond forward passes and timing runs. The
cold passes include one forward at the timing batch size, whose shapes are new too. The timing runs count as they
ran: ``Latency.timed_ms`` is the wall time of every warm-up and timed run of the candidate and the reference.

    .venv/bin/python benchmarks/overhead.py [--candidates 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from autoprune.latency import LatencyConfig, batched
from autoprune.objective import Objective
from autoprune.recovery import RecoveryConfig
from autoprune.workloads import load_workload


def first_forward(objective: Objective, model: torch.nn.Module) -> None:
    """One forward at the timing batch size (creates that batch size's oneDNN primitives for new shapes)."""
    inputs = batched(objective.example_inputs, objective.meter.config.batch_size)
    with torch.inference_mode():
        model.eval()(*inputs)


def bare_floor(objective: Objective, model: torch.nn.Module, recovery: RecoveryConfig) -> tuple[float, float]:
    """Seconds of the unavoidable forward passes: BN re-estimation batches and the validation pass."""
    ds = objective.dataset
    assert ds is not None
    batches = list(
        ds.train_batches(recovery.batch_size, seed=recovery.seed, max_batches=recovery.bn_recalibration_batches)
    )
    t = time.perf_counter()
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    recover_floor = time.perf_counter() - t
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, ds.num_val, objective.eval_batch_size):
            model(ds.x_val[i : i + objective.eval_batch_size])
    return recover_floor, time.perf_counter() - t


def run(workload: str, candidates: int, seed: int) -> dict[str, float]:
    wl = load_workload(workload)
    recovery = RecoveryConfig()
    objective = Objective(
        wl.model, wl.example_inputs, wl.dataset, recovery=recovery, latency=LatencyConfig(), round_to=8
    )
    rng = random.Random(seed)
    rows = []
    for _ in range(candidates):
        plan = objective.plan({g: rng.choice([0.0, 0.25, 0.5, 0.75]) for g in objective.group_names})
        # the floor's forward passes on cold caches first: the difference to the same passes on warm caches is
        # the first use of each new layer shape (oneDNN primitive creation), which any tool pays on a new
        # architecture; it is reported apart, and the evaluation below runs with those primitives made
        cold = objective.prune(plan)
        start = time.perf_counter()
        first_forward(objective, cold)
        cold_batch = time.perf_counter() - start
        cold_rec, cold_eval = bare_floor(objective, cold, recovery)
        ev = objective(plan)
        model = objective.prune(plan)
        start = time.perf_counter()
        first_forward(objective, model)
        warm_batch = time.perf_counter() - start
        rec_floor, eval_floor = bare_floor(objective, model, recovery)
        lat = ev.latency
        # every warm-up and timed run as it actually ran (spread included); a cached shape was not timed
        assert lat.cached or lat.timed_ms is not None
        timing_floor = 0.0 if lat.cached else (lat.timed_ms or 0.0) / 1e3
        floor = rec_floor + eval_floor + timing_floor
        first_use = max(0.0, cold_batch + cold_rec + cold_eval - warm_batch - rec_floor - eval_floor)
        rows.append({**ev.timings, "floor": floor, "overhead": ev.timings["total"] - floor, "first_use": first_use})
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["overhead_pct"] = 100 * statistics.median(r["overhead"] / r["floor"] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cols = [
        "prune",
        "recover",
        "evaluate",
        "measure",
        "cost",
        "total",
        "floor",
        "first_use",
        "overhead",
        "overhead_pct",
    ]
    print(f"median seconds per candidate over {args.candidates} random plans (torch 1 thread)")
    print(f"{'workload':<18}" + "".join(f"{c:>13}" for c in cols))
    for workload in ("resnet20-digits", "cnn1d-mnist1d"):
        r = run(workload, args.candidates, args.seed)
        print(f"{workload:<18}" + "".join(f"{r[c]:>13.3f}" for c in cols[:-1]) + f"{r['overhead_pct']:>12.1f}%")


if __name__ == "__main__":
    main()
