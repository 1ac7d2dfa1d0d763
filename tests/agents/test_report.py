"""write_search_outputs on a real (tiny) search: ResNet-20 on 8x8 digits, real Torch-Pruning, real ONNX export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from agents import run_search
from agents.report import write_search_outputs
from autoprune.errors import ExportError, InvalidConfigError
from autoprune.export import load_pruned
from autoprune.latency import DeterministicMeter, LatencyConfig
from autoprune.objective import Evaluation, Objective
from autoprune.recovery import RecoveryConfig
from autoprune.workloads import load_workload

if TYPE_CHECKING:
    from agents.result import SearchResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the exported model is re-timed in ONNX Runtime for real; keep that short
QUICK_ORT = LatencyConfig(runtime="onnxruntime", warmup=2, min_repeats=5, max_repeats=20, max_seconds=0.5)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/agents/conftest.py


@pytest.fixture(scope="module")
def objective(one_torch_thread: None) -> Objective:
    """Overrides the conftest's MLP: ResNet-20 on digits (real Torch-Pruning, real ONNX export)."""
    wl = load_workload("resnet20-digits")
    return Objective(wl.model, wl.example_inputs, wl.dataset.subset(256, 128), latency=DeterministicMeter())


@pytest.fixture(scope="module")
def result(objective: Objective) -> SearchResult:
    return run_search(objective, "random", 4, seed=0)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _front_rows(report: str) -> list[str]:
    section = report.split("## Pareto front", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return rows[1:]  # the header


def _check_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(np.asarray(image).std()) > 0  # not a blank canvas


def _onnx_output(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_writes_every_output_and_the_export_matches_the_chosen_model(
    result: SearchResult, objective: Objective, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "dir"  # created on demand
    # a pruned point: the fastest one within the latency bound (the trained model loses accuracy when pruned)
    paths = write_search_outputs(
        result,
        out,
        example_inputs=objective.example_inputs,
        select="quality",
        max_latency_ratio=0.9,
        latency_config=QUICK_ORT,
        title="tiny search",
    )
    assert {"evaluations", "pareto", "best", "export", "plot", "report", "onnx", "safetensors", "plan"} <= set(paths)
    assert all(p.exists() for p in paths.values())
    assert not [p for p in out.rglob(".*")]  # no temporary files or directories left behind

    # evaluations.jsonl: baseline, then the 4 search evaluations, each round-tripping
    records = _lines(paths["evaluations"])
    assert len(records) == 5
    restored = [Evaluation.from_json(r) for r in records]
    assert restored == result.all_evaluations
    assert [e.index for e in restored] == [0, 1, 2, 3, 4]

    # pareto.json: the same front, the chosen point and why
    pareto = json.loads(paths["pareto"].read_text(encoding="utf-8"))
    front = result.front()
    assert [p["index"] for p in pareto["front_points"]] == [e.index for e in front]
    assert [Evaluation.from_json(e) for e in pareto["front"]] == front
    assert pareto["summary"]["strategy"] == "random" and pareto["summary"]["evaluations"] == 4
    chosen = result.best("quality", max_latency_ratio=0.9)
    assert chosen.index != 0 and chosen.latency_ratio <= 0.9
    assert pareto["best"]["index"] == chosen.index and pareto["best"]["select"] == "quality"
    assert pareto["best"]["is_baseline"] is False
    assert pareto["hypervolume"]["search"] == pytest.approx(result.hypervolume())

    _check_png(paths["plot"])

    report = paths["report"].read_text(encoding="utf-8")
    assert report.startswith("# tiny search")
    assert "`random`" in report and "stop reason: budget" in report
    rows = _front_rows(report)
    assert len(rows) == len(front)
    assert sum("(chosen)" in r for r in rows) == (1 if any(e.index == chosen.index for e in front) else 0)
    assert "highest quality with latency at most 0.90x" in report
    assert "synthetic" in report  # the deterministic meter is never presented as a measurement
    assert "max abs difference" in report

    # best/: the ONNX file runs in ONNX Runtime and matches the rebuilt model; the plan + weights reload to it
    model = result.materialize(chosen)
    x = torch.randn(3, *objective.example_inputs.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x[:1]).numpy()
    np.testing.assert_allclose(_onnx_output(paths["onnx"], x[:1]), expected, atol=1e-4, rtol=0)
    reloaded = load_pruned(objective.base, objective.example_inputs, paths["plan"], paths["safetensors"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-6, rtol=0)
    export = json.loads(paths["export"].read_text(encoding="utf-8"))
    assert export["point"] == {"index": chosen.index, "stage": "search"}
    assert export["max_abs_diff"] < 1e-4 and export["speedup"] > 0
    assert export["latency"]["protocol"]["runtime"] == "onnxruntime"
    assert export["latency"]["protocol"]["interleaved"] is True
    assert {Path(p) for p in export["files"].values()} == {paths["onnx"], paths["safetensors"], paths["plan"]}


def test_the_baseline_is_exported_as_is_when_nothing_beats_it(
    result: SearchResult, objective: Objective, tmp_path: Path
) -> None:
    # nothing comes within 1% of the unpruned model's accuracy, so the rule falls back to the baseline
    assert result.best("latency", max_quality_drop=0.01).index == 0
    paths = write_search_outputs(
        result, tmp_path, example_inputs=objective.example_inputs, select="latency", latency_config=QUICK_ORT
    )
    pareto = json.loads(paths["pareto"].read_text(encoding="utf-8"))
    assert pareto["best"]["is_baseline"] is True and pareto["best"]["index"] == 0
    assert "No candidate beat the unpruned model" in paths["report"].read_text(encoding="utf-8")
    notes = json.loads(paths["export"].read_text(encoding="utf-8"))["notes"]
    assert any("unpruned model" in n for n in notes)
    # the exported model is the base model itself (not re-recovered): same outputs as the measured baseline
    x = objective.example_inputs
    with torch.no_grad():
        expected = objective.base(x).numpy()
    np.testing.assert_allclose(_onnx_output(paths["onnx"], x), expected, atol=1e-4, rtol=0)

    # writing again over the same directory replaces best/ whole (the earlier model.onnx is gone)
    again = write_search_outputs(
        result, tmp_path, example_inputs=objective.example_inputs, select="latency", export_formats=("safetensors",)
    )
    assert sorted(p.name for p in again["best"].iterdir()) == ["export.json", "model.plan.json", "model.safetensors"]
    assert "onnx" not in again
    assert not [p for p in tmp_path.rglob(".*")]


def test_finetuned_points_appear_in_every_output(objective: Objective, tmp_path: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = run_search(objective, "random", 4, seed=0)
    tuned = result.finetune_front(1, RecoveryConfig(finetune_steps=5))
    assert len(tuned) == 1
    figures: list[Any] = []
    close = plt.close

    def keep(fig: Any = None) -> None:  # look at the figure before it is closed
        figures.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    paths = write_search_outputs(
        result, tmp_path, example_inputs=objective.example_inputs, export_formats=("onnx",), latency_config=QUICK_ORT
    )
    records = _lines(paths["evaluations"])
    assert len(records) == 6
    assert [r["stage"] for r in records] == ["search"] * 5 + ["finetuned"]
    assert Evaluation.from_json(records[-1]) == tuned[0]
    assert records[-1]["extra"]["recovery"]["finetune_steps"] == 5
    # a delivered (fine-tuned) point carries its held-out test figure; search candidates never do
    assert tuned[0].test_quality is not None and tuned[0].base_test_quality == objective.base_test_quality
    assert all(r["test_quality"] is None for r in records[:-1])

    pareto = json.loads(paths["pareto"].read_text(encoding="utf-8"))
    front = result.front()
    assert pareto["front_points"] == [{"index": e.index, "stage": e.stage} for e in front]
    assert pareto["summary"]["finetuned"] == 1

    report = paths["report"].read_text(encoding="utf-8")
    assert "fine-tuned: 1" in report
    rows = _front_rows(report)
    assert len(rows) == len(front)
    if any(e.stage == "finetuned" for e in front):
        assert any(
            "(fine-tuned)" in r and "| finetuned |" in r and f"| {tuned[0].test_quality:.4f} (" in r for r in rows
        )
    assert f"(unpruned model: {objective.base_test_quality:.4f})" in report
    _check_png(paths["plot"])

    (fig,) = figures
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "fine-tuned (1, 5 steps)" in labels and "before fine-tuning" in labels
    assert any(label.startswith("unpruned") for label in labels)
    assert any(label.startswith("chosen: highest reward") for label in labels)
    assert "synthetic latency" in ax.get_xlabel()
    assert "torch, 1 thread, batch 1" in ax.get_xlabel()
    assert "accuracy" in ax.get_ylabel()


def test_measured_latency_is_described_with_its_protocol(tmp_path: Path) -> None:
    wl = load_workload("resnet20-digits")
    quick = LatencyConfig(warmup=1, min_repeats=5, max_repeats=10, max_seconds=0.2)
    objective = Objective(wl.model, wl.example_inputs, wl.dataset.subset(128, 64), latency=quick)
    result = run_search(objective, "uniform", 2, seed=0)
    paths = write_search_outputs(
        result,
        tmp_path,
        example_inputs=wl.example_inputs,
        select="latency",
        max_quality_drop=1.0,
        export_formats=("safetensors",),
    )
    assert "onnx" not in paths and {"safetensors", "plan", "export"} <= set(paths)
    protocol = result.baseline.latency.protocol
    report = paths["report"].read_text(encoding="utf-8")
    assert "synthetic" not in report
    assert f"torch {protocol.versions['torch']}" in report and protocol.machine in report
    assert "interleaved with the unpruned model" in report and "median of the per-pair ratios" in report
    assert "1-minute load average before/after" in report
    remeasured = sum(e.latency.remeasured for e in result.evaluations)
    assert f"ran far off its usual time (a neighbour woke; the closer of the two kept): {remeasured} of " in report
    cores = ",".join(map(str, protocol.cpus))
    assert protocol.cpus and f"- cores: {cores}; exclusive (host measurement lock): off 3 of 3 figures" in report
    _check_png(paths["plot"])


def test_a_failed_export_still_writes_the_report_then_raises(
    result: SearchResult, objective: Objective, tmp_path: Path, monkeypatch
) -> None:
    import autoprune.export

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model.onnx").write_bytes(b"stale")  # from an earlier run: must not survive

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ExportError("ONNX export failed: unsupported operator")

    monkeypatch.setattr(autoprune.export, "export_model", fail)
    with pytest.raises(ExportError, match="unsupported operator"):
        write_search_outputs(result, tmp_path, example_inputs=objective.example_inputs)
    assert not (tmp_path / "best").exists()
    assert "**Export failed:** ONNX export failed: unsupported operator" in (tmp_path / "report.md").read_text()
    pareto = json.loads((tmp_path / "pareto.json").read_text(encoding="utf-8"))
    assert pareto["export"] is None and "unsupported operator" in pareto["export_error"]
    assert len(_lines(tmp_path / "evaluations.jsonl")) == 5
    _check_png(tmp_path / "pareto.png")
    assert not [p for p in tmp_path.rglob(".*")]


def test_rejects_an_unknown_selection(result: SearchResult, objective: Objective, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="unknown selection"):
        write_search_outputs(result, tmp_path / "x", example_inputs=objective.example_inputs, select="speed")
    assert not (tmp_path / "x").exists()
