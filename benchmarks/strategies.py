"""The product's claim, measured: searched per-group ratios versus one uniform ratio, at equal budget.

For each workload (ResNet-20 on digits, the 1-D CNN on MNIST-1D, pretrained MiniLM sentence embeddings), every
registered strategy runs at the same evaluation budget and on the same seeds, against one shared
:class:`~autoprune.objective.Objective` per workload with a real latency meter (torch eager, one pinned thread,
each candidate timed interleaved with the unpruned model). Per strategy it reports, as mean ± std over seeds:

* **HV**: hypervolume of (quality, measured latency ratio) up to (0, 1) (``SearchResult.hypervolume``);
* **lat@1%**: the lowest measured latency ratio among points with <= 1% relative quality loss
  (``best("latency", max_quality_drop=0.01)``; 1.000 when nothing beat the unpruned model);
* **q@0.5x**: the best quality among points at <= 0.5x the unpruned latency (``—`` when none got there);
* **pred. lat err med/max**: for strategies whose plans carry a predicted latency ratio (``knapsack``), the median
  and worst relative error ``|predicted - measured| / measured`` over every planned candidate of every seed
  (``SearchResult.latency_prediction_errors``; the goal is within 10%);
* wall time per run and per evaluation.

The last line per workload compares the best strategy with ``uniform`` on lat@1% (the goal is >= 1.3x lower
latency than uniform at the same quality loss); the ratio is printed whatever it is.

One Objective per workload means the unpruned model is measured once, the reference outputs of the quality
metric are computed once, and the latency cache (keyed by pruned shape) is shared by every run of that workload:
a shape that two strategies both reach is timed once, in the same job. Progress goes to stderr; tables to
stdout, and all of them again as Markdown at the end.

    .venv/bin/python benchmarks/strategies.py --quick                  # smoke test, ~minutes
    .venv/bin/python benchmarks/strategies.py --budget 24 --seeds 3    # the full comparison
    .venv/bin/python benchmarks/strategies.py --out runs.jsonl         # record every evaluation
    .venv/bin/python benchmarks/strategies.py --replay runs.jsonl      # answer recorded plans from the record
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import agents
from agents.base import Budget, Progress
from autoprune.latency import LatencyConfig
from autoprune.objective import Evaluation, Objective
from autoprune.recovery import RecoveryConfig

if TYPE_CHECKING:
    from agents.result import SearchResult

WORKLOADS = ("resnet20-digits", "cnn1d-mnist1d", "minilm", "resnet56-digits")
QUALITY_DROP = 0.01
LATENCY_TARGET = 0.5
GOAL = 1.3


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Validation / training subset sizes per workload (chosen so one evaluation takes ~0.2-1 s)."""

    n_train: int
    n_val: int


FULL_SIZES = {
    "resnet20-digits": Sizes(n_train=512, n_val=359),  # all of digits' validation split
    "cnn1d-mnist1d": Sizes(n_train=512, n_val=1000),  # all of MNIST-1D's test split
    "minilm": Sizes(n_train=64, n_val=64),
    "resnet56-digits": Sizes(n_train=512, n_val=359),
}
QUICK_SIZES = {
    "resnet20-digits": Sizes(n_train=512, n_val=200),
    "cnn1d-mnist1d": Sizes(n_train=512, n_val=300),
    "minilm": Sizes(n_train=32, n_val=32),
    "resnet56-digits": Sizes(n_train=512, n_val=200),
}


def build_objective(
    name: str, sizes: Sizes, latency: LatencyConfig, criterion: str, recovery_steps: int = 0
) -> tuple[Objective, str]:
    """The shared Objective of one workload and a one-line description of it."""
    if name == "minilm":
        import minilm  # benchmarks/minilm.py: this script's directory is on sys.path

        if not minilm.available():
            raise ModuleNotFoundError(f"{minilm.PACKAGE} or transformers is not installed")
        mw = minilm.load_minilm_workload(n_train=sizes.n_train, n_val=sizes.n_val)
        objective = Objective(
            mw.model,
            mw.example_inputs,
            mw.dataset,
            metric=mw.metric,
            latency=latency,
            recovery=RecoveryConfig(bn_recalibration_batches=0),  # no BatchNorm in BERT; no labels to fine-tune on
            keep=mw.keep,
            criterion=criterion,
        )
        desc = (
            f"all-MiniLM-L6-v2, {sizes.n_val} docstring sentences x {mw.example_inputs.shape[1]} tokens, "
            f"metric {mw.metric} (label-free fidelity), attention heads and FFN units pruned, hidden size kept"
        )
        return objective, desc
    from autoprune.workloads import load_workload

    wl = load_workload(name)
    dataset = wl.dataset.subset(sizes.n_train, sizes.n_val, seed=0)
    recovery = RecoveryConfig(finetune_steps=recovery_steps, distill=True, finetune_lr=2e-3)
    objective = Objective(
        wl.model, wl.example_inputs, dataset, metric="accuracy", latency=latency, criterion=criterion, recovery=recovery
    )
    desc = (
        f"{name}, {dataset.num_val} validation samples, metric accuracy, BatchNorm re-estimated on "
        f"{objective.recovery.bn_recalibration_batches} batches"
        + (f", {recovery_steps} distilled fine-tune steps per candidate" if recovery_steps else "")
    )
    return objective, desc


# ---------------------------------------------------------------------------------------------------------
# runs and statistics
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    strategy: str
    seed: int
    hypervolume: float
    latency_at_drop: float
    quality_at_latency: float | None
    wall_s: float
    evaluations: int
    cached: int
    stop_reason: str
    latency_errors: list[float] = field(default_factory=list)
    """Relative predicted-vs-measured latency errors of the run's planned candidates (empty: no predictions)."""


@dataclass
class StrategyRow:
    strategy: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def values(self, attr: str) -> list[float]:
        return [float(v) for r in self.runs if (v := getattr(r, attr)) is not None]

    def latency_errors(self) -> list[float]:
        """Every run's predicted-vs-measured latency errors, sorted (empty: the strategy predicts nothing)."""
        return sorted(e for r in self.runs for e in r.latency_errors)


def summarize(result: SearchResult) -> Run:
    fast = result.best("latency", max_quality_drop=QUALITY_DROP)
    good = result.best("quality", max_latency_ratio=LATENCY_TARGET)
    return Run(
        strategy=result.strategy,
        seed=result.seed,
        hypervolume=result.hypervolume(),
        latency_at_drop=fast.latency_ratio,
        quality_at_latency=None if good is result.baseline else good.quality,
        wall_s=result.wall_s,
        evaluations=len(result.evaluations),
        cached=sum(e.latency.cached for e in result.evaluations),
        stop_reason=result.stop_reason,
        latency_errors=result.latency_prediction_errors(),
    )


def mean_std(values: Sequence[float], fmt: str = ".3f") -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {std:{fmt}}"


def strategy_available(name: str) -> str | None:
    """None if the strategy's class imports, else why not."""
    try:
        agents.strategy_options(name)
    except ImportError as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
    except Exception as exc:  # a half-written module may fail in other ways
        return f"not loadable ({type(exc).__name__}: {exc})"
    return None


def progress_logger(prefix: str, every: int) -> Callable[[Progress], None]:
    def callback(p: Progress) -> None:
        if p.done % every and p.done != p.total:
            return
        e = p.evaluation
        log(
            f"  {prefix} {p.done}/{p.total}: q={e.quality:.4f} lat={e.latency_ratio:.3f}"
            f"{' (cached)' if e.latency.cached else ''} best-reward q={p.best.quality:.4f} "
            f"lat={p.best.latency_ratio:.3f} front={p.front_size} {p.elapsed:.1f}s"
        )

    return callback


def load_history(path: Path) -> dict[tuple[str, str, int], list[Evaluation]]:
    """Evaluations recorded with ``--out``, per (workload, strategy, seed)."""
    history: dict[tuple[str, str, int], list[Evaluation]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("kind") != "evaluation":
                continue
            key = (row["workload"], row["strategy"], int(row["seed"]))
            history.setdefault(key, []).append(Evaluation.from_json(row["evaluation"]))
    return history


def write_run(out: IO[str], workload: str, name: str, result: SearchResult) -> None:
    """``name`` is the strategy as given on the command line, options included (the key of ``--replay``)."""
    head = {"workload": workload, "strategy": name, "seed": result.seed}
    out.write(json.dumps({**head, "kind": "summary", "summary": result.summary()}) + "\n")
    out.write(json.dumps({**head, "kind": "baseline", "evaluation": result.baseline.to_json()}) + "\n")
    for e in result.evaluations:
        out.write(json.dumps({**head, "kind": "evaluation", "evaluation": e.to_json()}) + "\n")
    out.flush()


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------
HEADER = (
    "strategy",
    "HV",
    "lat@1% drop",
    "q@0.5x lat",
    "reached 0.5x",
    "pred. lat err med/max",
    "wall s/run",
    "s/eval",
    "runs",
)
PREDICTION_GOAL = 0.10
"""The latency table should predict measured latency within this relative error."""


def prediction_error(row: StrategyRow) -> str:
    """Median and worst relative predicted-vs-measured latency error over every planned candidate of every seed
    (``—`` for a strategy that predicts nothing)."""
    errors = row.latency_errors()
    if not errors:
        return "—"
    return f"{100 * statistics.median(errors):.1f}% / {100 * errors[-1]:.1f}% (n={len(errors)})"


def table_rows(rows: list[StrategyRow]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for row in rows:
        if row.error is not None:
            out.append((row.strategy, "skipped", row.error[:90], "", "", "", "", "", "0"))
            continue
        n_evals = sum(r.evaluations for r in row.runs)
        reached = sum(r.quality_at_latency is not None for r in row.runs)
        out.append(
            (
                row.strategy,
                mean_std(row.values("hypervolume"), ".4f"),
                mean_std(row.values("latency_at_drop")),
                mean_std(row.values("quality_at_latency"), ".4f"),
                f"{reached}/{len(row.runs)}",
                prediction_error(row),
                mean_std(row.values("wall_s"), ".1f"),
                f"{sum(r.wall_s for r in row.runs) / n_evals:.2f}" if n_evals else "—",
                str(len(row.runs)),
            )
        )
    return out


def comparison(rows: list[StrategyRow]) -> str:
    """Best strategy vs uniform on mean lat@1% drop (lower is better)."""
    ran = {r.strategy: statistics.fmean(r.values("latency_at_drop")) for r in rows if r.runs}
    if "uniform" not in ran:
        return "no comparison: uniform did not run"
    others = {k: v for k, v in ran.items() if k != "uniform"}
    if not others:
        return "no comparison: no strategy besides uniform ran"
    best = min(others, key=lambda k: others[k])
    if min(ran.values()) >= 1.0:
        return (
            f"best vs uniform at <= {QUALITY_DROP:.0%} quality loss: no strategy found a point within "
            f"{QUALITY_DROP:.0%} of the unpruned quality that is faster than it (all latency ratios 1.000): no gain"
        )
    gain = ran["uniform"] / others[best]
    verdict = "meets" if gain >= GOAL else "does NOT meet"
    return (
        f"best vs uniform at <= {QUALITY_DROP:.0%} quality loss: {best} reaches latency ratio {others[best]:.3f} "
        f"vs uniform {ran['uniform']:.3f} -> uniform/best = {gain:.2f}x ({verdict} the goal of {GOAL}x lower "
        "latency than uniform)"
    )


def prediction_line(rows: list[StrategyRow]) -> str | None:
    """Whether the latency table's predictions (the strategies that carry them) are within the goal."""
    parts = []
    for row in rows:
        errors = row.latency_errors()
        if errors:
            worst = errors[-1]
            verdict = "within" if worst <= PREDICTION_GOAL else "NOT within"
            parts.append(
                f"{row.strategy}: median {100 * statistics.median(errors):.1f}%, worst {100 * worst:.1f}% over "
                f"{len(errors)} planned candidates ({verdict} the goal of {PREDICTION_GOAL:.0%})"
            )
    return "predicted vs measured latency ratio: " + "; ".join(parts) if parts else None


def plain_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [s.name for s in agents.list_strategies()]
    p = argparse.ArgumentParser(description="Compare every search strategy at the same budget and seeds.")
    p.add_argument("--budget", type=int, help="evaluations per run (default 24; 3 with --quick)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 for every strategy (default 3; 2 with --quick)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated ({', '.join(WORKLOADS)})")
    p.add_argument(
        "--strategies",
        default=",".join(names),
        help=f"comma-separated ({', '.join(names)}); options as name:key=value;key=value",
    )
    p.add_argument("--criterion", default="l1", help="channel importance criterion of every objective (l1)")
    p.add_argument("--max-ratio", type=float, default=0.8, help="largest per-group ratio a strategy may pick")
    p.add_argument(
        "--recovery-steps",
        type=int,
        default=0,
        help="distilled fine-tune steps per candidate on the labelled workloads (default 0: BatchNorm only)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the timed input (default 1)")
    p.add_argument("--runtime", default="torch", help="latency runtime: torch or onnxruntime (default torch)")
    p.add_argument("--out", type=Path, help="write every evaluation as JSON lines (replayable with --replay)")
    p.add_argument("--replay", type=Path, help="answer plans recorded in this --out file instead of re-running")
    p.add_argument("--quick", action="store_true", help="smoke mode: budget 3, 2 seeds, small data, 1 s timings")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 3 if args.quick else 24
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for s in args.strategies:
        if s.partition(":")[0] not in names:
            p.error(f"unknown strategy {s!r}; choose from {', '.join(names)}")
    if args.budget < 1 or args.seeds < 1:
        p.error("--budget and --seeds must be >= 1")
    return args


def run_workload(
    workload: str,
    args: argparse.Namespace,
    latency: LatencyConfig,
    history: dict[tuple[str, str, int], list[Evaluation]],
    out: IO[str] | None,
) -> tuple[str, list[StrategyRow]] | None:
    sizes = (QUICK_SIZES if args.quick else FULL_SIZES)[workload]
    t = time.perf_counter()
    try:
        objective, desc = build_objective(workload, sizes, latency, args.criterion, args.recovery_steps)
    except ModuleNotFoundError as exc:
        print(f"\n## {workload}\n\nskipped: {exc}\n", flush=True)
        return None
    base = objective.baseline
    log(
        f"[{workload}] objective built in {time.perf_counter() - t:.1f}s: {len(objective.group_names)} groups, "
        f"base quality {base.quality:.4f}, base latency {base.latency.median_ms:.2f} ms"
    )
    rows: list[StrategyRow] = []
    for name in args.strategies:
        row = StrategyRow(name)
        rows.append(row)
        registered, _, spec = name.partition(":")  # "optuna-tpe:warm_start=6;n_startup_trials=3"
        options = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in spec.split(";") if kv)}
        why = strategy_available(registered)
        if why is not None:
            row.error = why
            log(f"[{workload}] {name}: skipped, {why}")
            continue
        for seed in range(args.seeds):
            prefix = f"[{workload}] {name} seed {seed}"
            log(f"{prefix}: start")
            try:
                result = agents.run_search(
                    objective,
                    agents.make_strategy(registered, **options),
                    Budget(evaluations=args.budget),
                    seed=seed,
                    max_ratio=args.max_ratio,
                    callbacks=[progress_logger(prefix, max(1, args.budget // 6))],
                    history=history.get((workload, name, seed), ()),
                )
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                row.error = f"failed on seed {seed}: {type(exc).__name__}: {exc}"
                log(f"{prefix}: FAILED\n{traceback.format_exc()}")
                break
            run = summarize(result)
            row.runs.append(run)
            log(
                f"{prefix}: done in {run.wall_s:.1f}s, {run.evaluations} evals ({run.cached} cached latencies), "
                f"HV {run.hypervolume:.4f}, lat@1% {run.latency_at_drop:.3f}, stop {run.stop_reason}"
                f"{f', {result.replayed} replayed from --replay' if result.replayed else ''}"
            )
            if out is not None:
                write_run(out, workload, name, result)
    cache = getattr(objective.meter, "cache", None)
    note = (
        f"{workload}: {desc}; base quality {base.quality:.4f}, base latency {base.latency.median_ms:.2f} ms "
        f"({latency.runtime}, {latency.threads} thread, batch {latency.batch_size}); "
        f"{len(objective.group_names)} groups; budget {args.budget} x {args.seeds} seeds; "
        f"{len(cache) if cache is not None else '?'} distinct shapes timed (latency cached by shape across runs)"
    )
    return note, rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    timing = {"batch_size": args.batch_size, "runtime": args.runtime}
    latency = LatencyConfig(max_seconds=1.0, **timing) if args.quick else LatencyConfig(**timing)
    history = load_history(args.replay) if args.replay else {}
    out = args.out.open("w", encoding="utf-8") if args.out else None
    log(
        f"budget {args.budget} evaluations x {args.seeds} seeds; workloads {', '.join(args.workloads)}; "
        f"strategies {', '.join(args.strategies)}; load average {os.getloadavg()[0]:.2f}"
    )
    sections: list[str] = []
    started = time.perf_counter()
    try:
        for workload in args.workloads:
            done = run_workload(workload, args, latency, history, out)
            if done is None:
                sections.append(f"## {workload}\n\nskipped (model package missing)\n")
                continue
            note, rows = done
            cells = table_rows(rows)
            line = comparison(rows)
            predicted = prediction_line(rows)
            if predicted is not None:
                line += "\n" + predicted
            print(f"\n{note}\n{plain_table(cells)}\n{line}\n", flush=True)
            sections.append(f"## {workload}\n\n{note}\n\n{markdown_table(cells)}\n\n{line}\n")
    finally:
        if out is not None:
            out.close()
    total = time.perf_counter() - started
    print("\n# Strategy comparison\n")
    print(
        f"HV: hypervolume of (quality, latency ratio) up to (0, 1); lat@1% drop: lowest measured latency ratio "
        f"with <= {QUALITY_DROP:.0%} relative quality loss (1.000 = no faster point qualified); q@0.5x lat: best "
        f"quality at <= {LATENCY_TARGET}x the unpruned latency (— when no run got there); pred. lat err: median / worst "
        f"relative error of the predicted latency ratio over every planned candidate. mean ± std over seeds. "
        f"Total wall time {total:.0f}s{' (--quick smoke mode: tiny budget, not a result)' if args.quick else ''}.\n"
    )
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
