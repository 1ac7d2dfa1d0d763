"""The ``autoprune`` command line.

Every user error is printed as one line (``error: ...``) with exit status 2; nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
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


def _console(stream: Any, *, stderr: bool = False) -> Console:
    """A console as wide as the terminal; piped or logged output gets 160 columns (rich would squeeze the tables
    into 80 and cut the figures) unless ``COLUMNS`` says otherwise."""
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=160 if piped else None)


console = _console(sys.stdout)
err_console = _console(sys.stderr, stderr=True)

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


def _parse_kwargs(items: list[str] | None, flag: str = "--kw") -> dict[str, Any]:
    """``KEY=VALUE`` options (VALUE as JSON when it parses, else the string) as a mapping."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"{flag} expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _load(model: str, kwargs: dict[str, Any], weights: Path | None, data: str | None, train_epochs: int = 0) -> Any:
    """(model, example_inputs, dataset, note) from the command-line options."""
    from autoprune.job import resolve_inputs

    return resolve_inputs(model, kwargs, weights, data, train_epochs)


def _guard(fn: Any) -> Any:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AutopruneError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except FileNotFoundError as exc:
            _fail(f"no such file: {exc.filename}" if exc.filename else str(exc) or "no such file")
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _knob_help(knob: Any) -> str:
    if knob.default is None:
        return knob.doc
    if knob.kind is bool:
        default = "on" if knob.default else "off"
    elif knob.kind is tuple:
        default = ", ".join(knob.default)
    else:
        default = f"{knob.default:g}" if isinstance(knob.default, float) else str(knob.default)
    listed = knob.choices and knob.kind is str and not all(c in knob.doc for c in knob.choices)
    choices = f" One of: {', '.join(knob.choices or ())}." if listed else ""
    return f"{knob.doc}{choices} Default: {default}."


def spec_flags(fn: Any) -> Any:
    """Give a command one option per :meth:`JobSpec.knobs` setting (flag, help, default from the spec) before its
    ``spec`` parameter; the command receives the ones given on the command line as ``knobs`` (a dict keyed like
    the spec), so flags, spec files and API bodies share names, help and defaults."""
    import functools
    import inspect
    import typing

    from autoprune.job import JobSpec

    kinds: dict[type, Any] = {int: int, float: float, str: str, bool: bool, tuple: list[str]}
    extra = []
    names = []
    for knob in JobSpec.knobs():
        if knob.flag == "":  # a setting with its own flags (strategy_options: --option KEY=VALUE)
            continue
        flags = [f"{knob.cli_flag}/--no-{knob.cli_flag[2:]}"] if knob.kind is bool else [knob.cli_flag]
        if knob.short:
            flags.append(knob.short)
        option = typer.Option(*flags, help=_knob_help(knob), show_default=False)
        kind = kinds[knob.kind]
        annotation = Annotated[kind | None, option]  # type: ignore[valid-type]
        extra.append(inspect.Parameter(knob.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
        names.append(knob.name)
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
        for p in inspect.signature(fn).parameters.values()
        if p.name != "knobs"
    ]
    at = next((i for i, p in enumerate(own) if p.name == "spec"), len(own))
    params = own[:at] + extra + own[at:]

    @functools.wraps(fn)
    def wrapper(**values: Any) -> Any:
        knobs = {name: values.pop(name) for name in names}
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items() if v is not None}
        return fn(**values, knobs=knobs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
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
    """List the prunable groups of a model (the names a plan uses) and the groups kept intact because pruning them
    breaks the forward."""
    from autoprune.pruning import analyze

    net, ex, _, _ = _load(model, _parse_kwargs(kw), weights, data)
    structure = analyze(net, ex)
    locked = [{"group": name, "reason": reason} for name, reason in structure.locked]
    if as_json:
        groups_json = [g.__dict__ for g in structure.groups]
        print(json.dumps({"groups": groups_json, "kept": list(structure.kept), "locked": locked}, indent=2))
        return
    table = Table(title=f"{len(structure.groups)} prunable groups (kept intact: {', '.join(structure.kept)})")
    for col in ("#", "group", "kind", "units", "step", "MACs", "layers"):
        table.add_column(col)
    for g in structure.groups:
        table.add_row(str(g.index), g.name, g.kind, str(g.units), str(g.step), f"{g.macs:,}", str(len(g.members)))
    console.print(table)
    for item in locked:
        console.print(f"not prunable (kept intact): {item['group']}: {item['reason']}", markup=False)


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
    finetune_epochs: Annotated[
        float, typer.Option("--finetune-epochs", help="Fine-tune for this many epochs (instead of --finetune-steps).")
    ] = 0.0,
    lr: Annotated[float, typer.Option("--lr", "--finetune-lr", help="Peak fine-tuning learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option("--optimizer", help="Fine-tuning optimizer: adamw or sgd.")] = "adamw",
    lr_schedule: Annotated[
        str, typer.Option("--lr-schedule", help="constant, cosine or onecycle (after --warmup-steps).")
    ] = "constant",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear learning-rate warm-up steps.")] = 0,
    early_stopping: Annotated[
        int,
        typer.Option(
            "--early-stopping",
            help="Stop after N validation checks (one per epoch) without a lower validation loss and restore "
            "the best checkpoint (0: off).",
        ),
    ] = 0,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            help="Structured: reach the plan in this many prune + recover increments, the fine-tune split over them "
            "(1: one shot).",
        ),
    ] = 1,
    schedule: Annotated[
        str, typer.Option("--schedule", help="Increments of --steps: linear, or cubic (large cuts first).")
    ] = "linear",
    gradual: Annotated[
        bool,
        typer.Option(
            "--gradual",
            help="Unstructured: raise sparsity from 0 to --ratio during the fine-tune (cubic polynomial schedule, "
            "masks updated 20 times over the first 3/4 of it) instead of cutting first.",
        ),
    ] = False,
    train_epochs: Annotated[int, typer.Option("--train-epochs", help="Train the model first (no --weights).")] = 0,
    runtime: RuntimeOpt = "torch",
    threads: ThreadsOpt = 1,
    batch_size: BatchOpt = 1,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Export the pruned model (ONNX, safetensors+plan, .pt2) here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply a plan (or a uniform ratio) to a model and report quality, measured latency and size.

    The cut is one shot by default; `--steps K` reaches a structured plan in K increments with recovery between
    them, and `--gradual` prunes unstructured weights during the fine-tune. The result is a plain model (no masks).
    """
    from autoprune.latency import LatencyConfig
    from autoprune.objective import Objective
    from autoprune.plan import MAX_RATIO, Plan
    from autoprune.recovery import RecoveryConfig

    if (ratio is None) == (plan is None):
        _fail("give exactly one of --ratio or --plan")
    if ratio is not None and not 0.0 <= ratio <= MAX_RATIO:
        _fail(f"--ratio must be in [0, {MAX_RATIO}], got {ratio}")
    recovery = RecoveryConfig(  # validated before the model loads
        bn_recalibration_batches=bn_batches,
        finetune_steps=finetune_steps,
        finetune_epochs=finetune_epochs,
        finetune_lr=lr,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        early_stopping_patience=early_stopping,
        distill=distill,
    )
    from autoprune.names import ITERATIVE_SCHEDULES

    if steps < 1:
        _fail(f"--steps must be >= 1, got {steps}")
    if schedule not in ITERATIVE_SCHEDULES:
        _fail(f"--schedule must be one of {', '.join(ITERATIVE_SCHEDULES)}, got {schedule!r}")
    if steps > 1 and method != "structured":
        _fail("--steps applies to structured pruning; for unstructured sparsity use --gradual")
    if gradual and (method != "unstructured" or ratio is None):
        _fail("--gradual takes --method unstructured with --ratio (one global sparsity)")
    if gradual and not recovery.finetunes:
        _fail("--gradual prunes while fine-tuning: give --finetune-steps or --finetune-epochs")
    if gradual and (recovery.distill or recovery.early_stopping_patience):
        _fail("--gradual trains with the labelled loss and keeps every step: drop --distill and --early-stopping")
    Plan(method=method, criterion=criterion, round_to=round_to)  # type: ignore[arg-type]  # before the model loads
    net, ex, dataset, note = _load(model, _parse_kwargs(kw), weights, data, train_epochs)
    if dataset is None:
        _fail("--data is needed to evaluate quality")
    if note and not as_json:
        err_console.print(f"note: {note}", highlight=False)
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
    report: dict[str, Any] = {"baseline": objective.baseline.to_json()}
    built = None  # a model pruned by a schedule (evaluated as it is, not rebuilt from the plan)
    if steps > 1:
        from autoprune.gradual import iterative_prune

        done = iterative_prune(
            objective.base,
            ex,
            dataset,
            the_plan,
            steps=steps,
            # --finetune-steps/--finetune-epochs are the whole fine-tune, split over the increments
            recovery=(
                dataclasses.replace(recovery, prune_steps=steps, prune_schedule=schedule).per_increment()
                if recovery.finetunes
                else recovery
            ),
            schedule=schedule,
            keep=objective.keep,
        )
        built = done.model
        report["schedule"] = {
            "kind": "iterative",
            "steps": steps,
            "schedule": schedule,
            "widths": [dict(s.widths) for s in done.steps],
        }
    elif gradual:
        import copy

        from autoprune.gradual import PolynomialDecay, gradual_magnitude_prune, sparsity, strip

        assert ratio is not None
        built = copy.deepcopy(objective.base)
        total = recovery.total_steps(dataset.num_train)
        end = max(0, total * 3 // 4 - 1)
        poly = PolynomialDecay(0.0, ratio, begin_step=0, end_step=end, frequency=max(1, end // 20 or 1))
        done_gradual = gradual_magnitude_prune(built, dataset, poly, recovery, keep=objective.keep)
        strip(built)
        report["schedule"] = {
            "kind": "gradual",
            "final_sparsity": ratio,
            "end_step": end,
            "updates": len(done_gradual.updates),
            "sparsity": sparsity(built, objective.keep),
        }
    if built is None:
        evaluation = objective.evaluate(the_plan, test=True)  # the delivered model: its held-out test figure too
    else:
        evaluation = objective.evaluate_model(built, the_plan, stage="search", test=True)
    report["pruned"] = evaluation.to_json()
    report["recovery"] = dataclasses.asdict(recovery)
    if out is not None:
        from autoprune.export import export_model

        pruned = objective.materialize(the_plan) if built is None else built
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
    sched = report.get("schedule")
    if sched and sched["kind"] == "iterative":
        console.print(f"reached in {steps} {schedule} increments, recovered after each", highlight=False)
    elif sched:
        console.print(
            f"pruned during the fine-tune: {sched['updates']} mask updates to {sched['final_sparsity']:.0%} "
            f"(cubic schedule); the stripped model has {sched['sparsity']:.1%} zeros",
            highlight=False,
        )
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
    tested = ev.test_quality is not None
    columns = ["", "quality (val)", *(["quality (test)"] if tested else []), "latency (median)", "spread (IQR)"]
    for col in (*columns, "speed-up", "MACs", "params", "size"):
        table.add_column(col)
    # the unpruned model's time is the one taken interleaved with the pruned model's (same window, same load)
    paired = ev.latency.reference_median_ms
    for label, e, test in (("unpruned", base, ev.base_test_quality), ("pruned", ev, ev.test_quality)):
        median = paired if e is base and paired is not None else e.latency.median_ms
        table.add_row(
            label,
            f"{e.quality:.4f}",
            *([f"{test:.4f}"] if tested else []),
            _fmt_ms(median),
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


def _opt(help_text: str, *names: str) -> Any:
    return typer.Option(*names, help=help_text, show_default=False)


class CtrlC:
    """Ctrl-C (SIGINT) during ``autoprune search``: a KeyboardInterrupt, as Python raises it, *and* a stop flag.

    The KeyboardInterrupt stops the search at once. But CPython raises it wherever the main thread happens to
    be, and some places swallow it: a ``__del__`` or weakref callback run by the garbage collector ("Exception
    ignored in ..."), a library's bare ``except:`` (Torch-Pruning has some). Then the search went on to its
    budget and exited 0 (issue 13.9). The flag cannot be lost: the search also gets it as its stop signal
    (``reason`` ``interrupted``), so it stops at the next check between evaluations at the latest, and the command
    exits 130 whenever Ctrl-C was pressed.
    """

    reason = "interrupted"
    """The search's ``stop_reason`` when this stop signal stops it (see :class:`agents.base.SearchSession`)."""

    def __init__(self) -> None:
        self.pressed = 0

    def __call__(self) -> bool:
        return self.pressed > 0

    def _handler(self, signum: int, frame: Any) -> None:
        self.pressed += 1  # first: whatever happens to the exception below, the flag is set
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[CtrlC]:
        """This object as the SIGINT handler for the block (the main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


@app.command()
@_guard
@spec_flags
def search(
    model: Annotated[
        str | None, _opt("Built-in architecture (see `autoprune architectures`) or a .pt2 file.", "--model", "-m")
    ] = None,
    data: Annotated[
        str | None, _opt("Built-in dataset (digits, mnist1d) or a .npz/.safetensors file.", "--data", "-d")
    ] = None,
    kw: KwOpt = None,
    weights: Annotated[str | None, _opt("Weights for the architecture (.safetensors).", "--weights", "-w")] = None,
    option: Annotated[list[str] | None, _opt("Strategy option KEY=VALUE (JSON value), repeatable.", "--option")] = None,
    spec: Annotated[
        Path | None, _opt("A JSON/YAML job spec (same keys as these flags); flags override it.", "--spec")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("out/search"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the search recorded in --out (nothing evaluated is redone).")
    ] = False,
    knobs: dict[str, Any] | None = None,
) -> None:
    """Search per-group pruning ratios; write every evaluation, the Pareto front, a plot, a report and the best model.

    Every candidate is pruned for real, recovered (BatchNorm re-estimation), evaluated, and its latency measured
    interleaved with the unpruned model. Ctrl-C stops cleanly and keeps what was evaluated.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoprune.job import JobSpec, probes_in_file, run_job

    base: dict[str, Any] = {}
    if spec is not None:
        base = JobSpec.from_file(spec).to_json()
    flags = {"model": model, "data": data, "weights": weights, **(knobs or {})}
    merged = {**base, **{k: v for k, v in flags.items() if v is not None}}
    if kw:
        merged["kwargs"] = {**merged.get("kwargs", {}), **_parse_kwargs(kw)}
    if option:
        merged["strategy_options"] = {**merged.get("strategy_options", {}), **_parse_kwargs(option, "--option")}
    if "model" not in merged:
        _fail("give --model (or a --spec file with 'model')")
    job = JobSpec.from_mapping(merged)  # validates everything before any work starts

    log_path = out / "evaluations.jsonl"
    history: list[Any] = []
    if log_path.exists() and not resume:
        _fail(f"{out} already holds a search; pass --resume to continue it, or choose another --out")
    if resume and log_path.exists():
        from autoprune.objective import Evaluation

        for n, line in enumerate(log_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    recorded = Evaluation.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    _fail(f"{log_path}:{n} is not an evaluation record ({exc})")
                if recorded.stage == "search" and recorded.index > 0:  # the baseline is re-measured, not replayed
                    history.append(recorded)
    console.print(f"[bold]autoprune search[/] {job.model} on {job.data} with {job.strategy}", highlight=False)
    with console.status("loading the model and measuring the unpruned baseline..."):
        obj = job.build_objective(log=lambda m: err_console.print(f"note: {m}", highlight=False))
    b = obj.baseline
    console.print(
        f"unpruned: {b.metric} {b.quality:.4f}, {b.latency.median_ms:.3f} ms ({b.latency.protocol.runtime}, "
        f"{b.latency.protocol.threads} thread, batch {b.latency.protocol.batch_size}), {b.macs:,} MACs; "
        f"{len(obj.group_names)} prunable groups",
        highlight=False,
    )
    out.mkdir(parents=True, exist_ok=True)  # only now: a job that cannot start leaves nothing behind
    (out / "job.json").write_text(json.dumps(job.to_json(), indent=2), encoding="utf-8")
    if history:
        console.print(f"resuming: {len(history)} recorded evaluations will be replayed, not redone", highlight=False)

    log = log_path.open("w", encoding="utf-8")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[best]}"),
        console=console,
        transient=False,
    )
    task = progress.add_task("searching", total=job.budget, best="")

    def on_progress(p: Any) -> None:
        log.write(json.dumps(p.evaluation.to_json()) + "\n")
        log.flush()
        best = p.best
        progress.update(
            task,
            completed=p.done,
            best=f"best: reward {best.reward:.3f} ({best.metric} {best.quality:.3f}, {best.speedup:.2f}x) | front {p.front_size}",
        )

    # a probing strategy (knapsack, warm starts) keeps its probe table in probes.json: --resume does not probe again
    strategy, probes = probes_in_file(
        job, out / "probes.json", resume=resume, note=lambda m: err_console.print(f"note: {m}", highlight=False)
    )
    ctrl_c = CtrlC()
    with ctrl_c.installed():
        try:
            with progress:
                result = run_job(
                    job,
                    objective=obj,
                    callback=probes,
                    callbacks=[on_progress],
                    history=history,
                    stop=ctrl_c,
                    strategy=strategy,
                )
        finally:
            log.close()
        _finish_search(job, result, obj, out)
    if result.stop_reason == "interrupted" or ctrl_c.pressed:
        raise typer.Exit(130)


def _finish_search(job: Any, result: Any, obj: Any, out: Path) -> None:
    """After the search: notes, the outputs (front, plot, report, the exported best model) and the front table."""
    from autoprune.job import write_outputs

    if result.stop_reason == "interrupted":
        err_console.print(f"interrupted: keeping the {len(result.evaluations)} evaluations done", highlight=False)
    if result.failures:
        err_console.print(f"note: {result.failures_note()}", highlight=False, markup=False)
    if result.finetuned:
        recipe = job.finetune_recovery().describe()
        console.print(f"fine-tuned the top {len(result.finetuned)} front points ({recipe})", highlight=False)
    with console.status("exporting the best model (ONNX verified and re-measured in ONNX Runtime)..."):
        files = write_outputs(
            result,
            out,
            example_inputs=obj.example_inputs,
            latency_config=job.latency_config(),  # the exported file is re-timed at the search's threads and batch
            export_formats=job.export_formats,
        )  # the best point under the job's --select rule (result.selection), as the facade and the worker choose it
    _print_front(result)
    chosen = result.best()
    if chosen.index == 0 and result.evaluations:
        hints = [] if job.finetune_top else ["--finetune-top 2 (a short distilled fine-tune of the best front points)"]
        hints += ["a smaller --max-ratio", "a larger --budget"]
        err_console.print(
            f"note: no candidate beat the unpruned model under --select {job.select}; try " + ", ".join(hints),
            highlight=False,
        )
    console.print(
        f"wrote {', '.join(sorted(str(Path(p).relative_to(out)) for p in files.values()))} in {out}/", highlight=False
    )


def _print_front(result: Any) -> None:
    best = result.best()
    table = Table(
        title=f"Pareto front ({len(result.evaluations)} evaluations, {result.strategy}, stop: {result.stop_reason})"
    )
    front = result.front()
    tested = any(e.test_quality is not None for e in front)
    base_test = next((e.base_test_quality for e in front if e.base_test_quality is not None), None)
    columns = ("#", "stage", "quality (val)", "drop", *(("test", "test drop") if tested else ()))
    for col in (*columns, "latency", "speed-up", "MACs", "params", ""):
        table.add_column(col)
    for e in front:
        test_cells: tuple[str, ...] = ()
        if tested:
            test_q = base_test if e.index == 0 else e.test_quality
            drop = 0.0 if e.index == 0 else e.test_quality_drop
            test_cells = ("—" if test_q is None else f"{test_q:.4f}", "—" if drop is None else f"{100 * drop:.1f}%")
        table.add_row(
            str(e.index),
            "unpruned" if e.index == 0 else e.stage,
            f"{e.quality:.4f}",
            f"{100 * e.quality_drop:.1f}%",
            *test_cells,
            f"{e.latency_ms:.3f} ms",
            f"{e.speedup:.2f}x",
            f"{e.macs:,}",
            f"{e.params:,}",
            "best" if e is best else "",
        )
    console.print(table)
    if tested:
        console.print(
            "quality (val) scored the search; test is the held-out split no choice was made on (fine-tuned points)",
            highlight=False,
        )


@app.command()
@_guard
def strategies() -> None:
    """List the search strategies."""
    from autoprune.job import strategy_summaries

    for name, summary in strategy_summaries():
        console.print(f"{name:<14} {summary}", highlight=False)


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
