"""The demo: prune the shipped ResNet-20 (trained on sklearn's digits) and show what changed, measured.

Everything runs on one pinned torch thread: on a small shared machine two spinning OpenMP threads made the
fine-tune ~8x slower, and one thread is also what the latencies are measured with. The fine-tuned model is
evaluated once and handed to the exporter as it is (``keep_model``), not fine-tuned a second time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autoprune.export import export_model
from autoprune.latency import LatencyConfig
from autoprune.objective import Evaluation, Objective
from autoprune.recovery import RecoveryConfig
from autoprune.runtime import torch_threads
from autoprune.workloads import load_workload


def run_demo(
    *,
    ratio: float = 0.5,
    finetune_steps: int = 300,
    out: Path = Path("out/demo"),
    console: Console | None = None,
    threads: int = 1,
) -> list[Evaluation]:
    """Prune every group of the shipped ResNet-20 by ``ratio``; print accuracy and measured latency of the
    unpruned model, the pruned model after BatchNorm re-estimation and after a short distilled fine-tune;
    export the last one and re-measure the exported ONNX file in ONNX Runtime. ``threads`` pins torch."""
    console = console or Console()
    t0 = time.perf_counter()

    def step(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - t0:5.1f} s[/]  {message}", highlight=False)

    with torch_threads(threads):
        return _run(ratio, finetune_steps, out, console, step, t0)


def _run(
    ratio: float, finetune_steps: int, out: Path, console: Console, step: Callable[[str], None], t0: float
) -> list[Evaluation]:
    step("loading the shipped ResNet-20 and the digits data")
    wl = load_workload("resnet20-digits")
    console.print(
        f"[bold]ResNet-20 on digits[/] ({wl.dataset.num_train} train / {wl.dataset.num_val} val images, 8x8), shipped weights"
    )
    step("tracing the dependency graph; scoring and timing the unpruned model")
    objective = Objective(wl.model, wl.example_inputs, wl.dataset, metric="accuracy", round_to=8)
    console.print(
        f"{len(objective.group_names)} prunable groups (coupled layers pruned together); uniform ratio {ratio}"
    )
    plan = objective.plan({g: ratio for g in objective.group_names})
    rows: list[tuple[str, Evaluation]] = [("unpruned", objective.baseline)]
    step(f"pruning by {ratio}, re-estimating BatchNorm; scoring and timing it")
    rows.append(("pruned + BN re-estimation", objective.evaluate(plan, keep_model=finetune_steps == 0)))
    tuned: RecoveryConfig | None = None
    if finetune_steps > 0:
        tuned = RecoveryConfig(finetune_steps=finetune_steps, distill=True, finetune_lr=2e-3)
        step(f"fine-tuning {finetune_steps} steps (distilled from the unpruned model)")
        finetuned = objective.evaluate(plan, recovery=tuned, stage="finetuned", keep_model=True)
        rows.append((f"pruned + {finetune_steps} fine-tune steps (distilled)", finetuned))

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
    model = objective.materialize(best_plan, recovery=tuned)  # the model evaluated above, not a second fine-tune
    step("exporting ONNX, safetensors + plan, .pt2; timing ONNX in ONNX Runtime")
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
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(
        f"accuracy {best.base_quality:.4f} -> {best.quality:.4f}; done in {time.perf_counter() - t0:.0f} s",
        highlight=False,
    )
    return [e for _, e in rows]
