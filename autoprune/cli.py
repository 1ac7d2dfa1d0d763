"""The ``autoprune`` command line.

Every user error is printed as one line (``error: ...``) with exit status 2; nothing half-written is left.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from autoprune.errors import AutopruneError

app = typer.Typer(
    name="autoprune",
    help="Prune a PyTorch model for the hardware it runs on: real structural pruning, measured latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Built-in architecture name (see `autoprune architectures`) or a .pt2 file."),
]
KwOpt = Annotated[
    list[str] | None, typer.Option("--kw", help="Architecture keyword argument KEY=VALUE (JSON value), repeatable.")
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", "-w", help="Weights for the architecture (.safetensors).")
]
DataOpt = Annotated[
    str | None, typer.Option("--data", "-d", help="Built-in dataset (digits, mnist1d) or a .npz/.safetensors file.")
]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="Latency runtime: torch or onnxruntime.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="Threads pinned while timing.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size of the timed input.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"--kw expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _load(model: str, kwargs: dict[str, Any], weights: Path | None, data: str | None, train_epochs: int = 0) -> Any:
    """(model, example_inputs, dataset, note) from the command-line options."""
    import torch

    from autoprune.data import load_dataset
    from autoprune.models.registry import example_inputs
    from autoprune.models.weights import load_weights
    from autoprune.workloads import WORKLOADS, build_for_dataset, load_workload, shipped_workload_for, train_classifier

    dataset = load_dataset(data) if data else None
    note = ""
    if model.endswith(".pt2"):
        from autoprune.models.pt2 import load_pt2

        program, ex = load_pt2(Path(model))
        return program, ex[0] if len(ex) == 1 else ex, dataset, note
    if weights is None and train_epochs == 0 and dataset is not None:
        shipped = shipped_workload_for(model, dataset.name, kwargs)
        if shipped is not None:
            wl = load_workload(shipped)
            return wl.model, wl.example_inputs, dataset, f"using the shipped {shipped} reference weights"
    torch.manual_seed(0)
    net = build_for_dataset(model, dataset, **kwargs)
    if weights is not None:
        load_weights(net, weights)
    elif train_epochs > 0:
        if dataset is None:
            _fail("--train-epochs needs --data")
        assert dataset is not None
        train_classifier(net, dataset, epochs=train_epochs, lr=3e-3, batch_size=64, seed=0)
        note = f"trained for {train_epochs} epochs"
    else:
        note = "no --weights: the model is randomly initialised (quality figures are meaningless)"
        if dataset is not None and any(s.dataset == dataset.name for s in WORKLOADS.values()):
            note += "; pass --train-epochs N to train it first"
    return net.eval(), example_inputs(net), dataset, note


def _guard(fn: Any) -> Any:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AutopruneError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except FileNotFoundError as exc:
            _fail(f"no such file: {exc.filename}")
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


@app.command()
@_guard
def architectures() -> None:
    """List the built-in and registered architectures."""
    from autoprune.models.registry import list_architectures

    for name in list_architectures():
        console.print(name)


@app.command()
@_guard
def datasets() -> None:
    """List the built-in datasets."""
    from autoprune.data import builtin_datasets

    for name in builtin_datasets():
        console.print(name)


@app.command()
@_guard
def groups(
    model: ModelOpt, kw: KwOpt = None, weights: WeightsOpt = None, data: DataOpt = None, as_json: JsonOpt = False
) -> None:
    """List the prunable groups of a model (the names a plan uses)."""
    from autoprune.pruning import analyze

    net, ex, _, _ = _load(model, _parse_kwargs(kw), weights, data)
    structure = analyze(net, ex)
    if as_json:
        print(json.dumps([g.__dict__ for g in structure.groups], indent=2))
        return
    table = Table(title=f"{len(structure.groups)} prunable groups (kept intact: {', '.join(structure.kept)})")
    for col in ("#", "group", "kind", "units", "MACs", "layers"):
        table.add_column(col)
    for g in structure.groups:
        table.add_row(str(g.index), g.name, g.kind, str(g.units), f"{g.macs:,}", str(len(g.members)))
    console.print(table)


@app.command()
@_guard
def measure(
    model: ModelOpt,
    kw: KwOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = None,
    runtime: RuntimeOpt = "torch",
    threads: ThreadsOpt = 1,
    batch_size: BatchOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Measure a model's latency on this machine and print it with its protocol."""
    from autoprune.cost import measure_cost
    from autoprune.latency import LatencyConfig, Meter

    net, ex, _, _ = _load(model, _parse_kwargs(kw), weights, data)
    lat = Meter(LatencyConfig(runtime=runtime, threads=threads, batch_size=batch_size)).measure(net, ex)
    cost = measure_cost(net, ex)
    if as_json:
        print(json.dumps({"latency": lat.to_json(), "cost": cost.__dict__}, indent=2))
        return
    p = lat.protocol
    console.print(
        f"median {lat.median_ms:.3f} ms (IQR {lat.p25_ms:.3f}-{lat.p75_ms:.3f}, min {lat.min_ms:.3f}) | "
        f"{cost.macs:,} MACs, {cost.params:,} params, {cost.size_bytes:,} bytes"
    )
    console.print(
        f"protocol: {p.runtime}, {p.threads} thread(s), batch {p.batch_size}, {p.warmup} warm-up + {p.repeats} "
        f"repeats, load {p.load_before}->{p.load_after}, {p.versions}, {p.machine}",
        highlight=False,
    )


@app.command()
@_guard
def prune(
    model: ModelOpt,
    data: DataOpt = None,
    kw: KwOpt = None,
    weights: WeightsOpt = None,
    ratio: Annotated[float | None, typer.Option("--ratio", "-r", help="Uniform ratio for every group.")] = None,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="A plan JSON file ({'ratios': {group: ratio}, ...}).")
    ] = None,
    method: Annotated[str, typer.Option(help="structured or unstructured.")] = "structured",
    criterion: Annotated[str, typer.Option(help="l1, l2, taylor, bn_scale or random.")] = "l1",
    round_to: Annotated[int, typer.Option("--round-to", help="Round kept widths to a multiple of this.")] = 8,
    metric: Annotated[str, typer.Option(help="accuracy, agreement, kl or cosine.")] = "accuracy",
    bn_batches: Annotated[int, typer.Option("--bn-batches", help="Batches for BatchNorm re-estimation (0: off).")] = 8,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="Fine-tuning steps after pruning.")] = 0,
    distill: Annotated[bool, typer.Option(help="Distil from the unpruned model while fine-tuning.")] = False,
    train_epochs: Annotated[int, typer.Option("--train-epochs", help="Train the model first (no --weights).")] = 0,
    runtime: RuntimeOpt = "torch",
    threads: ThreadsOpt = 1,
    batch_size: BatchOpt = 1,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Export the pruned model (ONNX, safetensors+plan, .pt2) here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply a plan (or a uniform ratio) to a model and report quality, measured latency and size."""
    from autoprune.latency import LatencyConfig
    from autoprune.objective import Objective
    from autoprune.plan import MAX_RATIO, Plan
    from autoprune.recovery import RecoveryConfig

    if (ratio is None) == (plan is None):
        _fail("give exactly one of --ratio or --plan")
    if ratio is not None and not 0.0 <= ratio <= MAX_RATIO:
        _fail(f"--ratio must be in [0, {MAX_RATIO}], got {ratio}")
    net, ex, dataset, note = _load(model, _parse_kwargs(kw), weights, data, train_epochs)
    if dataset is None:
        _fail("--data is needed to evaluate quality")
    if note and not as_json:
        err_console.print(f"note: {note}", highlight=False)
    recovery = RecoveryConfig(bn_recalibration_batches=bn_batches, finetune_steps=finetune_steps, distill=distill)
    objective = Objective(
        net,
        ex,
        dataset,
        metric=metric,
        recovery=recovery,
        latency=LatencyConfig(runtime=runtime, threads=threads, batch_size=batch_size),
        method=method,
        criterion=criterion,
        round_to=round_to,
    )
    if plan is not None:
        loaded = Plan.from_json(plan.read_text(encoding="utf-8"))
        the_plan = objective.plan(loaded.as_dict()) if loaded.method == method else loaded
    else:
        assert ratio is not None
        names = objective.group_names if method == "structured" else ("*",)
        the_plan = objective.plan({n: ratio for n in names})
    evaluation = objective(the_plan)
    report: dict[str, Any] = {"baseline": objective.baseline.to_json(), "pruned": evaluation.to_json()}
    if out is not None:
        from autoprune.export import export_model

        pruned = objective.materialize(the_plan)
        exported = export_model(
            pruned,
            ex,
            out,
            plan=the_plan,
            base=objective.base,
            latency=LatencyConfig(runtime="onnxruntime", threads=threads, batch_size=batch_size),
        )
        report["export"] = exported.to_json()
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    _print_comparison(objective.baseline, evaluation)
    if out is not None:
        ex_rep = report["export"]
        console.print(
            f"exported to {out}: {', '.join(Path(f).name for f in ex_rep['files'].values())}; ONNX verified "
            f"(max diff {ex_rep['max_abs_diff']:.2g}); ONNX Runtime {_fmt_ms(ex_rep['latency']['median_ms'])} vs "
            f"unpruned {_fmt_ms(ex_rep['base_latency_ms'])} -> {ex_rep['speedup']:.2f}x",
            highlight=False,
        )


def _print_comparison(base: Any, ev: Any) -> None:
    table = Table(
        title=f"{ev.metric} / measured latency ({ev.latency.protocol.runtime}, {ev.latency.protocol.threads} thread, batch {ev.latency.protocol.batch_size})"
    )
    for col in ("", "quality", "latency (median)", "spread (IQR)", "speed-up", "MACs", "params", "size"):
        table.add_column(col)
    for label, e in (("unpruned", base), ("pruned", ev)):
        table.add_row(
            label,
            f"{e.quality:.4f}",
            _fmt_ms(e.latency.median_ms),
            f"{100 * e.latency.spread:.1f}%",
            f"{e.speedup:.2f}x",
            f"{e.macs:,}",
            f"{e.params:,}",
            f"{e.storage_bytes:,} B",
        )
    console.print(table)
    console.print(
        f"speed-up is the median of {ev.latency.protocol.repeats} interleaved pruned/unpruned timing pairs; "
        f"load average {ev.latency.protocol.load_before}->{ev.latency.protocol.load_after}",
        highlight=False,
    )


@app.command()
@_guard
def demo(
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Uniform ratio for the demo.")] = 0.5,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="Fine-tuning steps after pruning.")] = 300,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the pruned model is exported.")] = Path("out/demo"),
) -> None:
    """Load the shipped ResNet-20 trained on digits, prune it, and print quality and measured latency before/after."""
    from autoprune.demo import run_demo

    run_demo(ratio=ratio, finetune_steps=finetune_steps, out=out, console=console)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
