"""Write what a search found to a directory: every evaluation, the front, the best model exported, a plot, a report.

:func:`write_search_outputs` is the one entry point. It writes into ``out_dir``:

* ``evaluations.jsonl``: one :meth:`Evaluation.to_json` object per line (baseline, search, fine-tuned);
* ``pareto.json``: the front, the summary, the hypervolume and which point was chosen, and why;
* ``best/``: the chosen point rebuilt from its plan and exported (ONNX verified in ONNX Runtime and re-timed
  against the exported unpruned model, safetensors + plan), with the :class:`ExportReport` as ``export.json``;
* ``pareto.png``: quality against latency, the front highlighted, the baseline and the chosen point marked;
* ``report.md``: a short human summary of all of the above, including how latency was measured.

Every file is written to a temporary name and moved into place (``os.replace``), and ``best/`` is built in a
temporary directory and swapped in whole, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoprune.errors import ExportError, InvalidConfigError

if TYPE_CHECKING:
    from torch import nn

    from agents.result import SearchResult
    from autoprune.export import ExportReport, Inputs
    from autoprune.latency import LatencyConfig, LatencyProtocol
    from autoprune.objective import Evaluation

__all__ = ["write_search_outputs"]


def write_search_outputs(
    result: SearchResult,
    out_dir: str | os.PathLike[str],
    *,
    example_inputs: Inputs,
    select: str | None = None,
    max_quality_drop: float | None = None,
    max_latency_ratio: float | None = None,
    export_formats: Sequence[str] = ("onnx", "safetensors"),
    latency_config: LatencyConfig | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write the outputs of ``result`` under ``out_dir`` (created if missing); returns ``{name: path}``.

    The best point is ``result.best(select, max_quality_drop=..., max_latency_ratio=...)`` (what is not given
    comes from ``result.selection``, the job's rule: the point a facade user gets from ``result.best()``); it is rebuilt from
    its plan (the unpruned model itself when nothing beat it) and exported in ``export_formats`` under
    ``best/``; ``latency_config`` sets how the exported ONNX model is re-timed (ONNX Runtime, against the
    exported unpruned model). Names in the returned dict: ``evaluations``, ``pareto``, ``best``, ``export``,
    ``plot``, ``report`` and one per exported file (``onnx``, ``safetensors``, ``plan``, ``pt2``).

    If the export fails (:class:`~autoprune.errors.ExportError`), everything else is still written, the
    report says what failed, a ``best/`` left by an earlier run is removed, and the error is raised afterwards.
    """
    selection = result.rule(select, max_quality_drop=max_quality_drop, max_latency_ratio=max_latency_ratio)
    if result.objective is None:
        raise InvalidConfigError("this result was loaded without its objective; it cannot rebuild the best model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    best = result.best(selection)
    rule = selection.describe()
    front = result.front()

    paths["evaluations"] = out / "evaluations.jsonl"
    lines = [json.dumps(e.to_json(), sort_keys=True) for e in result.all_evaluations]
    _atomic_write(paths["evaluations"], ("\n".join(lines) + "\n").encode())

    export: ExportReport | None = None
    export_error: ExportError | None = None
    try:
        export, files = _export_best(result, best, out / "best", example_inputs, tuple(export_formats), latency_config)
    except ExportError as exc:
        export_error = exc
        _remove_dir(out / "best")  # a best/ left by an earlier run would not match this report
    else:
        paths["best"] = out / "best"
        paths["export"] = out / "best" / "export.json"
        paths.update(files)

    paths["pareto"] = out / "pareto.json"
    pareto = {
        "front": [e.to_json() for e in front],
        "front_points": [{"index": e.index, "stage": e.stage} for e in front],
        "summary": result.summary(),
        "hypervolume": {"search": result.hypervolume(stage="search"), "all": result.hypervolume(stage=None)},
        "best": {
            "index": best.index,
            "stage": best.stage,
            **selection.to_json(),
            "rule": rule,
            "is_baseline": _is_baseline(best),
            "on_front": any(_same(best, e) for e in front),
        },
        "export": export.to_json() if export is not None else None,
        "export_error": str(export_error) if export_error is not None else None,
    }
    _atomic_write(paths["pareto"], json.dumps(pareto, indent=2, sort_keys=True).encode())

    paths["plot"] = out / "pareto.png"
    _atomic_write(paths["plot"], _plot(result, front, best, rule, title))

    table = result.info.get("sensitivity")
    if table:
        paths["sensitivity"] = out / "sensitivity.json"
        _atomic_write(paths["sensitivity"], json.dumps(result.info, indent=2, sort_keys=True).encode())
        paths["sensitivity_plot"] = out / "sensitivity.png"
        _atomic_write(paths["sensitivity_plot"], _plot_sensitivity(table))

    paths["report"] = out / "report.md"
    text = _report(result, front, best, rule, export, export_error, title)
    _atomic_write(paths["report"], text.encode())

    if export_error is not None:
        raise export_error
    return paths


# -- files ----------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary output files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_baseline(e: Evaluation) -> bool:
    return e.index == 0 and e.stage == "search"


def _same(a: Evaluation, b: Evaluation) -> bool:
    return a.index == b.index and a.stage == b.stage


def _export_best(
    result: SearchResult,
    best: Evaluation,
    target: Path,
    example_inputs: Inputs,
    formats: tuple[str, ...],
    latency_config: LatencyConfig | None,
) -> tuple[ExportReport, dict[str, Path]]:
    """Export ``best`` into a fresh temporary directory, then swap it in as ``target`` (old one removed)."""
    from autoprune.export import ExportReport, export_model

    objective = result.objective
    assert objective is not None
    # The baseline's figures are those of the base model itself; SearchResult.materialize would re-run the
    # recovery recipe (BatchNorm re-estimation) on it and export a model that differs from what was measured.
    model: nn.Module = copy.deepcopy(objective.base).eval() if _is_baseline(best) else result.materialize(best)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        report = export_model(
            model,
            example_inputs,
            staging,
            plan=best.plan,
            base=objective.base,
            formats=formats,
            latency=latency_config,
        )
        files = {name: target / Path(p).name for name, p in report.files.items()}
        notes = list(report.notes)
        if _is_baseline(best):
            notes.append("no candidate beat the unpruned model under the selection rule: this is the unpruned model")
        report = ExportReport(
            files={name: str(p) for name, p in files.items()},
            max_abs_diff=report.max_abs_diff,
            latency=report.latency,
            base_latency_ms=report.base_latency_ms,
            notes=notes,
        )
        data = {**report.to_json(), "point": {"index": best.index, "stage": best.stage}}
        _atomic_write(staging / "export.json", json.dumps(data, indent=2, sort_keys=True).encode())
        for path in staging.iterdir():  # export_model's files and mkdtemp's directory are owner-only
            path.chmod(0o644)
        staging.chmod(0o755)
        _swap_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report, files


def _remove_dir(target: Path) -> None:
    """Remove ``target`` by first moving it aside, so it is either whole or gone."""
    if target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, aside / target.name)
        shutil.rmtree(aside, ignore_errors=True)


def _swap_dir(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` directory at ``target``; a previous ``target`` is moved aside, then removed."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- wording ----------------------------------------------------------------------------------------------------
def _synthetic(p: LatencyProtocol) -> bool:
    return p.meter != "measured"


def _latency_axis_label(p: LatencyProtocol) -> str:
    what = "latency" if not _synthetic(p) else f"synthetic latency ({p.meter} meter, not measured)"
    threads = f"{p.threads} thread{'s' if p.threads != 1 else ''}"
    return f"{what} [ms, on the unpruned model's scale] — {p.runtime}, {threads}, batch {p.batch_size}"


def _point_label(e: Evaluation) -> str:
    if _is_baseline(e):
        return "unpruned"
    return f"#{e.index}" + (" (fine-tuned)" if e.stage == "finetuned" else "")


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _human_count(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


# -- the plot -------------------------------------------------------------------------------------------------
def _plot(result: SearchResult, front: list[Evaluation], best: Evaluation, rule: str, title: str | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display; set here, at call time, so importing this module changes nothing
    import matplotlib.pyplot as plt
    import numpy as np

    from autoprune.pareto import pareto_front

    base = result.baseline
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    try:
        search = result.evaluations
        if search:
            ax.scatter(
                [e.latency_ms for e in search],
                [e.quality for e in search],
                s=18,
                color="tab:blue",
                alpha=0.25,
                label=f"search evaluations ({len(search)})",
                zorder=2,
            )
        # the front is 3-D (quality, latency, size); the line joins its points that are also non-dominated in
        # this plane, the markers show every front point
        plane = pareto_front(front, with_size=False)
        if len(plane) > 1:
            ax.step(
                [e.latency_ms for e in plane],
                [e.quality for e in plane],
                where="post",
                color="tab:orange",
                lw=1.5,
                zorder=3,
                label="front (quality vs latency)",
            )
        shown = [e for e in front if not _is_baseline(e)]
        if shown:
            ax.scatter(
                [e.latency_ms for e in shown],
                [e.quality for e in shown],
                s=46,
                facecolor="tab:orange",
                edgecolor="black",
                lw=0.6,
                zorder=4,
                label=f"Pareto front, quality/latency/size ({len(front)}"
                + (" incl. unpruned)" if any(_is_baseline(e) for e in front) else ")"),
            )
        if result.finetuned:
            steps = {(e.extra.get("recovery") or {}).get("finetune_steps") for e in result.finetuned}
            how = f", {steps.pop()} steps" if len(steps) == 1 else ""
            ax.scatter(
                [e.latency_ms for e in result.finetuned],
                [e.quality for e in result.finetuned],
                s=70,
                marker="D",
                facecolor="tab:green",
                edgecolor="black",
                lw=0.6,
                zorder=5,
                label=f"fine-tuned ({len(result.finetuned)}{how})",
            )
            by_index = {e.index: e for e in search}
            origins = [(by_index[t.index], t) for t in result.finetuned if t.index in by_index]
            if origins:
                # drawn above the diamonds: fine-tuning keeps the shape, so a point often moves only vertically
                ax.scatter(
                    [o.latency_ms for o, _ in origins],
                    [o.quality for o, _ in origins],
                    s=30,
                    facecolor="none",
                    edgecolor="darkgreen",
                    lw=1.0,
                    zorder=6,
                    label="before fine-tuning",
                )
            for origin, tuned in origins:
                ax.annotate(
                    "",
                    xy=(tuned.latency_ms, tuned.quality),
                    xytext=(origin.latency_ms, origin.quality),
                    arrowprops={"arrowstyle": "->", "color": "darkgreen", "lw": 1.0, "alpha": 0.8},
                    zorder=5,
                )
        ax.scatter(
            [base.latency_ms],
            [base.quality],
            s=220,
            marker="*",
            facecolor="gold",
            edgecolor="black",
            lw=0.8,
            zorder=6,
            label=f"unpruned ({_fmt(base.latency_ms)} ms, {base.metric} {_fmt(base.quality)})",
        )
        ax.scatter(
            [best.latency_ms],
            [best.quality],
            s=260,
            facecolor="none",
            edgecolor="crimson",
            lw=2.0,
            zorder=7,
            label=f"chosen: {rule}",
        )
        text = f"chosen: {_point_label(best)}\n{best.metric} {_fmt(best.quality)}, {_fmt(best.speedup, '.2f')}x"
        ax.annotate(
            text,
            xy=(best.latency_ms, best.quality),
            xytext=(-70 if _is_baseline(best) else 25, -45),
            textcoords="offset points",
            fontsize=8,
            color="crimson",
            arrowprops={"arrowstyle": "->", "color": "crimson", "lw": 1.0},
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "crimson", "alpha": 0.9},
            zorder=8,
        )
        ax.set_xlabel(_latency_axis_label(base.latency.protocol), fontsize=9)
        ax.set_ylabel(f"quality ({base.metric}, higher is better)")
        if base.base_latency_ms > 0:
            ref = base.base_latency_ms

            def to_ratio(ms: Any) -> Any:
                return np.asarray(ms, dtype=float) / ref

            def to_ms(ratio: Any) -> Any:
                return np.asarray(ratio, dtype=float) * ref

            top = ax.secondary_xaxis("top", functions=(to_ratio, to_ms))
            top.set_xlabel("latency ratio to the unpruned model (interleaved median of ratios)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.9)
        heading = title or f"autoprune search: {result.strategy}, seed {result.seed}"
        ax.set_title(f"{heading}\n{len(result.evaluations)} evaluations, front of {len(front)}", fontsize=10)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


# -- the report -------------------------------------------------------------------------------------------------
def _row(e: Evaluation, best: Evaluation) -> str:
    mark = " **(chosen)**" if _same(e, best) else ""
    cells = [
        f"{_point_label(e)}{mark}",
        e.stage if not _is_baseline(e) else "baseline",
        _fmt(e.quality, ".4f"),
        _fmt(100 * e.quality_drop, ".2f"),
        "—" if e.test_quality is None else f"{e.test_quality:.4f} ({_fmt(100 * (e.test_quality_drop or 0.0), '.2f')}%)",
        _fmt(e.latency_ms, ".4g"),
        _fmt(e.speedup, ".2f"),
        _human_count(e.macs),
        _human_count(e.params),
        _human_bytes(e.storage_bytes),
    ]
    return "| " + " | ".join(cells) + " |"


def _protocol_lines(result: SearchResult) -> list[str]:
    p = result.baseline.latency.protocol
    candidates = [*result.evaluations, *result.finetuned]
    protocols = [e.latency.protocol for e in [result.baseline, *candidates]]
    loads = [x for q in protocols for x in (q.load_before, q.load_after)]
    repeats = [q.repeats for q in protocols]
    cached = sum(1 for e in candidates if e.latency.cached)
    remeasured = sum(1 for e in candidates if e.latency.remeasured)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(p.versions.items())) or "not recorded"
    head = f"- runtime: {p.runtime}; threads: {p.threads} (pinned); batch size: {p.batch_size}"
    if _synthetic(p):
        return [
            head,
            f"\n**These latencies are synthetic** (meter `{p.meter}`: proportional to MACs), not measurements; "
            "they are fit for tests, not for conclusions about speed.",
        ]
    lines = [
        head,
        f"- warm-up runs: {p.warmup}; timed repeats per figure: "
        + (f"{min(repeats)}" if min(repeats) == max(repeats) else f"{min(repeats)}–{max(repeats)}"),
        f"- 1-minute load average before/after: {_fmt(p.load_before, '.2f')} / {_fmt(p.load_after, '.2f')} "
        f"(unpruned model); {_fmt(min(loads), '.2f')}–{_fmt(max(loads), '.2f')} over all figures",
        f"- versions: {versions}",
        f"- machine: {p.machine or 'not recorded'}",
        _lock_line(protocols),
        f"- figures answered from the shape cache (same pruned shape, timed once): {cached} of {len(candidates)}",
        "- figures timed twice because the unpruned reference ran far off its usual time (a neighbour woke; the "
        f"closer of the two kept): {remeasured} of {len(candidates)}",
    ]
    lines.append(
        "\nEach candidate was timed interleaved with the unpruned model in the same window (alternating which "
        "runs first in each pair) after warm-up, in blocks until the median settled; its latency ratio is the "
        "median of the per-pair ratios, so a slowdown shared by both models cancels out. Latencies in ms are "
        "the unpruned model's median times that ratio; speed-up is 1 / ratio."
    )
    return lines


def _lock_line(protocols: list[LatencyProtocol]) -> str:
    """Which cores timed the figures and whether they held the host's measurement lock."""
    cores = sorted({c for q in protocols for c in q.cpus})
    counts: dict[str, int] = {}
    for q in protocols:
        counts[q.exclusive] = counts.get(q.exclusive, 0) + 1
    held = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    wait = max(q.lock_wait_ms for q in protocols)
    return (
        f"- cores: {','.join(map(str, cores)) or 'not recorded'}; exclusive (host measurement lock): {held} "
        f"of {len(protocols)} figures; longest wait {_fmt(wait, '.0f')} ms"
    )


def _export_lines(export: ExportReport | None, error: ExportError | None, best: Evaluation) -> list[str]:
    if error is not None:
        return [f"**Export failed:** {error}"]
    assert export is not None
    lines = [f"- files: {', '.join(f'`{Path(p).name}`' for p in export.files.values())} (in `best/`)"]
    if export.max_abs_diff is not None:
        lines.append(f"- ONNX Runtime vs torch on the example inputs: max abs difference {export.max_abs_diff:.3g}")
    if export.latency is not None:
        lat = export.latency
        q = lat.protocol
        lines.append(
            f"- exported model re-timed in ONNX Runtime against the exported unpruned model ({q.threads} thread(s), "
            f"batch {q.batch_size}, {q.repeats} interleaved pairs, load {q.load_before:.2f} → {q.load_after:.2f}): "
            f"{_fmt(lat.median_ms, '.4g')} ms vs {_fmt(export.base_latency_ms, '.4g')} ms, "
            f"speed-up {_fmt(export.speedup, '.2f')}x (search figure: {_fmt(best.speedup, '.2f')}x)"
        )
    lines.extend(f"- note: {n}" for n in export.notes)
    return lines


def _report(
    result: SearchResult,
    front: list[Evaluation],
    best: Evaluation,
    rule: str,
    export: ExportReport | None,
    export_error: ExportError | None,
    title: str | None,
) -> str:
    base = result.baseline
    p = base.latency.protocol
    unit = "ms" if not _synthetic(p) else f"ms ({p.meter}, not measured)"
    out = [f"# {title or f'autoprune search: {result.strategy}'}", ""]
    out += [
        "## Job",
        "",
        f"- strategy: `{result.strategy}`; seed: {result.seed}",
        f"- evaluations: {len(result.evaluations)} (replayed from history: {result.replayed}); "
        f"fine-tuned: {len(result.finetuned)}",
        f"- stop reason: {result.stop_reason}; wall time: {result.wall_s:.1f} s",
        *([f"- {result.failures_note()}"] if result.failures else []),
        f"- front: {len(front)} points (baseline included); hypervolume (quality × latency ratio, search): "
        f"{result.hypervolume(stage='search'):.4f}",
        "",
        "## Unpruned model",
        "",
        f"- {base.metric}: {base.quality:.4f}",
        f"- latency: {_fmt(base.latency.median_ms, '.4g')} {unit} (IQR {100 * base.latency.spread:.1f}% of median)",
        f"- MACs: {_human_count(base.macs)}; params: {_human_count(base.params)}; "
        f"size: {_human_bytes(base.storage_bytes)}",
        "",
        "## Pareto front",
        "",
        "Non-dominated in (quality, latency, size), sorted by latency. The search scored candidates on the "
        "validation split; fine-tuned points are also scored on the held-out test split, which no choice was "
        "made on"
        + (
            f" (unpruned model: {base_test:.4f})."
            if (base_test := next((e.base_test_quality for e in front if e.base_test_quality is not None), None))
            is not None
            else "."
        ),
        "",
        f"| point | stage | {base.metric} (val) | quality drop % | test (drop %) | latency {unit} | speed-up x | MACs "
        "| params | size |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(e, best) for e in front),
        "",
        "## Best point",
        "",
        f"Selection rule: {rule}.",
        "",
    ]
    if _is_baseline(best):
        out.append(
            "No candidate beat the unpruned model under this rule, so the unpruned model is the best point and is "
            "what was exported."
        )
    else:
        out.append(
            f"Chosen: {_point_label(best)} — {best.metric} {best.quality:.4f} "
            f"({100 * best.quality_drop:.2f}% drop), {_fmt(best.latency_ms, '.4g')} {unit}, "
            f"{_fmt(best.speedup, '.2f')}x faster, reward {best.reward:.4f}, "
            f"{_human_count(best.params)} params ({100 * best.params / max(base.params, 1):.0f}% of unpruned)."
            + (
                ""
                if best.test_quality is None
                else f" On the held-out test split: {best.test_quality:.4f} against the unpruned model's "
                f"{_fmt(best.base_test_quality, '.4f')} ({100 * (best.test_quality_drop or 0.0):.2f}% drop)."
            )
        )
        ratios = best.plan.as_dict()
        if ratios:
            pruned = sum(1 for r in ratios.values() if r > 0)
            lo, hi = min(ratios.values()), max(ratios.values())
            spread = f"ratio {lo:.2f} in each" if lo == hi else f"ratios {lo:.2f}–{hi:.2f}"
            out.append(
                f"Plan: {best.plan.method}, criterion {best.plan.criterion}, {pruned} of {len(ratios)} groups "
                f"pruned, {spread} (full plan in `best/`)."
            )
    terms = ", ".join(f"{k} {_fmt(v, '.4g')}" for k, v in sorted(best.reward_terms.items()))
    if terms:
        out.append(f"Reward terms: {terms}.")
    out += ["", "## Export", "", *_export_lines(export, export_error, best), ""]
    out += ["## Latency protocol", "", *_protocol_lines(result), ""]
    if result.info.get("sensitivity"):
        out += ["## Latency table", "", *_sensitivity_lines(result), ""]
    return "\n".join(out)


def _sensitivity_lines(result: SearchResult) -> list[str]:
    table = result.info["sensitivity"]
    cal = result.info.get("calibration", {})
    ratios = sorted({p["ratio"] for p in table["probes"]})
    lines = [
        f"Each group pruned alone at each probe ratio, recovered, scored on validation and timed interleaved with "
        f"the unpruned model ({table['runtime']}, {table['threads']} thread(s), batch {table['batch_size']}): "
        f"{len(table['probes'])} probes in {table['seconds']:.1f} s, not counted as evaluations. Cells: kept "
        "width, measured latency ratio, relative quality drop (`uncut`: the ratio rounds to the full width, not "
        "measured). `sensitivity.png` plots it; `sensitivity.json` has every probe.",
        "",
        "| group | units | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
        "|---|---|" + "---|" * len(ratios),
    ]
    for group, units in zip(table["groups"], table["widths"], strict=True):
        cells = []
        for r in ratios:
            probe = next((p for p in table["probes"] if p["group"] == group and p["ratio"] == r), None)
            if probe is None:
                cells.append("-")
            elif probe["failed"]:
                cells.append("failed")
            elif probe.get("skipped"):
                cells.append(f"{probe['width']}: uncut")
            else:
                cells.append(f"{probe['width']}: {probe['latency_ratio']:.3f}, {100 * probe['quality_drop']:.1f}%")
        lines.append(f"| `{group}` | {units} | " + " | ".join(cells) + " |")
    errors = result.latency_prediction_errors()
    if errors:
        lines += [
            "",
            f"Predicted vs measured latency of the {len(errors)} planned candidates: median error "
            f"{100 * statistics.median(errors):.1f}%, worst {100 * errors[-1]:.1f}% (calibration: latency "
            f"x{cal.get('latency_scale', 1.0):.2f}, quality x{cal.get('quality_scale', 1.0):.2f}).",
        ]
    return lines


def _plot_sensitivity(table: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_q) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    try:
        for group, units in zip(table["groups"], table["widths"], strict=True):
            probes = sorted(
                (p for p in table["probes"] if p["group"] == group and not p["failed"] and not p.get("skipped")),
                key=lambda p: -p["width"],
            )
            widths = [units] + [p["width"] for p in probes]
            ax_lat.plot(widths, [1.0] + [p["latency_ratio"] for p in probes], marker="o", ms=3, label=group)
            ax_q.plot(widths, [0.0] + [100 * p["quality_drop"] for p in probes], marker="o", ms=3, label=group)
        ax_lat.set(xlabel="kept width (units)", ylabel="measured latency / unpruned", title="latency table")
        ax_q.set(xlabel="kept width (units)", ylabel="quality drop (%)", title="sensitivity (validation)")
        ax_lat.invert_xaxis()
        ax_q.invert_xaxis()
        ax_q.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
