"""The demo: prune the shipped ResNet-20 (trained on sklearn's digits) and show what changed, measured."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autoprune.export import export_model
from autoprune.latency import LatencyConfig
from autoprune.objective import Evaluation, Objective
from autoprune.recovery import RecoveryConfig
from autoprune.workloads import load_workload


def run_demo(
    *, ratio: float = 0.5, finetune_steps: int = 300, out: Path = Path("out/demo"), console: Console | None = None
) -> list[Evaluation]:
    console = console or Console()
    t0 = time.perf_counter()
    wl = load_workload("resnet20-digits")
    console.print(
        f"[bold]ResNet-20 on digits[/] ({wl.dataset.num_train} train / {wl.dataset.num_val} val images, 8x8), shipped weights"
    )
    objective = Objective(wl.model, wl.example_inputs, wl.dataset, metric="accuracy", round_to=8)
    console.print(
        f"{len(objective.group_names)} prunable groups (coupled layers pruned together); uniform ratio {ratio}"
    )
    plan = objective.plan({g: ratio for g in objective.group_names})
    rows: list[tuple[str, Evaluation]] = [("unpruned", objective.baseline)]
    rows.append(("pruned + BN re-estimation", objective(plan)))
    tuned = RecoveryConfig(finetune_steps=finetune_steps, distill=True, finetune_lr=2e-3)
    if finetune_steps > 0:
        rows.append(
            (
                f"pruned + {finetune_steps} fine-tune steps (distilled)",
                objective.evaluate(plan, recovery=tuned, stage="finetuned"),
            )
        )

    table = Table(title="accuracy and measured latency (torch eager, 1 thread, batch 1)")
    for col in ("model", "accuracy", "latency (median)", "IQR", "speed-up", "MACs", "params"):
        table.add_column(col)
    for label, e in rows:
        table.add_row(
            label,
            f"{e.quality:.4f}",
            f"{e.latency_ms:.3f} ms",
            f"{100 * e.latency.spread:.0f}%",
            f"{e.speedup:.2f}x",
            f"{e.macs:,}",
            f"{e.params:,}",
        )
    console.print(table)
    console.print(
        "speed-ups are medians of pruned/unpruned timing pairs run interleaved in the same window", highlight=False
    )

    best_plan, best = rows[-1][1].plan, rows[-1][1]
    model = objective.materialize(best_plan, recovery=tuned if finetune_steps > 0 else None)
    report = export_model(
        model, wl.example_inputs, out, plan=best_plan, base=objective.base, latency=LatencyConfig(runtime="onnxruntime")
    )
    assert report.latency is not None and report.base_latency_ms is not None
    console.print(
        f"exported {', '.join(Path(p).name for p in report.files.values())} to {out}/; ONNX output matches torch "
        f"(max diff {report.max_abs_diff:.1e}); in ONNX Runtime: {report.latency.median_ms:.3f} ms vs unpruned "
        f"{report.base_latency_ms:.3f} ms -> {report.speedup:.2f}x faster",
        highlight=False,
    )
    console.print(
        f"accuracy {best.base_quality:.4f} -> {best.quality:.4f}; done in {time.perf_counter() - t0:.0f} s",
        highlight=False,
    )
    return [e for _, e in rows]
