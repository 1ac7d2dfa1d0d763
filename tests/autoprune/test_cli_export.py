"""The CLI as a user runs it (a real subprocess) and the export round trips."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from autoprune.errors import ExportError, InvalidConfigError
from autoprune.export import export_model, load_pruned, verify_onnx
from autoprune.latency import LatencyConfig
from autoprune.plan import Plan
from autoprune.pruning import analyze, apply_plan
from autoprune.runtime import onnx_bytes
from autoprune.workloads import load_workload

FAST_LATENCY = ["--threads", "1"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def workload():
    return load_workload("cnn1d-mnist1d")


def test_prune_reports_and_exports_a_verified_model(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = cli(
        "prune", "--model", "cnn1d", "--data", "mnist1d", "--ratio", "0.5", "--out", str(out), "--json", *FAST_LATENCY
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    base, pruned = report["baseline"], report["pruned"]
    assert pruned["params"] < base["params"] and pruned["macs"] < base["macs"]
    assert pruned["latency"]["protocol"]["threads"] == 1 and pruned["latency"]["protocol"]["interleaved"]
    assert set(report["export"]["files"]) == {"onnx", "safetensors", "plan", "pt2"}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 1, 40), dtype=np.float32)})[0]
    assert y.shape == (1, 10)
    assert report["export"]["speedup"] > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("prune", "--model", "resnet2O", "--data", "digits", "--ratio", "0.5"), "resnet20"),
        (("prune", "--model", "cnn1d", "--data", "nope", "--ratio", "0.5"), "nope"),
        (("prune", "--model", "cnn1d", "--data", "mnist1d", "--ratio", "1.5"), "ratio"),
        (("prune", "--model", "cnn1d", "--data", "mnist1d"), "--ratio or --plan"),
        (("prune", "--model", "cnn1d", "--data", "mnist1d", "--ratio", "0.5", "--optimizer", "lion"), "adamw, sgd"),
        (("prune", "--model", "cnn1d", "--data", "mnist1d", "--ratio", "0.5", "--lr-schedule", "step"), "cosine"),
        (("prune", "--model", "cnn1d", "--data", "mnist1d", "--ratio", "0.5", "--finetune-epochs", "-1"), "epochs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_prune_fine_tunes_with_the_recipe_and_keeps_unstructured_zeros(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"ratios": {"*": 0.5}, "method": "unstructured"}))
    result = cli(
        "prune", "--model", "cnn1d", "--data", "mnist1d", "--plan", str(plan), "--method", "unstructured",
        "--finetune-epochs", "0.5", "--optimizer", "sgd", "--lr", "0.01", "--lr-schedule", "cosine",
        "--warmup-steps", "5", "--early-stopping", "2", "--json", *FAST_LATENCY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    recipe = report["recovery"]
    assert recipe["optimizer"] == "sgd" and recipe["lr_schedule"] == "cosine" and recipe["finetune_epochs"] == 0.5
    pruned = report["pruned"]
    assert pruned["timings"]["recover"] > 0
    # fine-tuning would refill the pruned weights; the zeros survive it
    assert pruned["nonzero_params"] <= 0.55 * pruned["params"]


def test_prune_reaches_a_plan_in_steps_or_prunes_during_the_fine_tune(tmp_path: Path) -> None:
    stepped = cli(
        "prune", "--model", "cnn1d", "--data", "mnist1d", "--ratio", "0.5", "--steps", "3", "--schedule", "cubic",
        "--finetune-steps", "4", "--json", *FAST_LATENCY,
    )  # fmt: skip
    assert stepped.returncode == 0, stepped.stderr
    report = json.loads(stepped.stdout)
    widths = report["schedule"]["widths"]
    assert report["schedule"]["kind"] == "iterative" and len(widths) == 3
    for group in widths[0]:  # every increment narrows (or keeps) each group; cubic cuts most in the first
        assert widths[0][group] >= widths[1][group] >= widths[2][group]
    one_shot = json.loads(
        cli("prune", "--model", "cnn1d", "--data", "mnist1d", "--ratio", "0.5", "--json", *FAST_LATENCY).stdout
    )
    assert report["pruned"]["params"] == one_shot["pruned"]["params"]  # the same widths as cutting at once
    assert report["pruned"]["test_quality"] is not None

    gradual = cli(
        "prune", "--model", "cnn1d", "--data", "mnist1d", "--method", "unstructured", "--ratio", "0.5", "--gradual",
        "--finetune-steps", "40", "--json", *FAST_LATENCY,
    )  # fmt: skip
    assert gradual.returncode == 0, gradual.stderr
    report = json.loads(gradual.stdout)
    assert report["schedule"]["kind"] == "gradual" and report["schedule"]["updates"] > 1
    assert abs(report["schedule"]["sparsity"] - 0.5) < 0.01
    assert report["pruned"]["nonzero_params"] <= 0.55 * report["pruned"]["params"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--ratio", "0.5", "--steps", "0"), "--steps must be >= 1"),
        (("--ratio", "0.5", "--steps", "2", "--schedule", "exp"), "--schedule must be one of linear, cubic"),
        (("--ratio", "0.5", "--steps", "2", "--method", "unstructured"), "use --gradual"),
        (("--ratio", "0.5", "--gradual"), "--method unstructured"),
        (("--ratio", "0.5", "--gradual", "--method", "unstructured"), "give --finetune-steps"),
        (("--ratio", "0.5", "--gradual", "--method", "unstructured", "--finetune-steps", "9", "--distill"), "drop"),
        (("--ratio", "0.5", "--criterion", "l3"), "unknown criterion 'l3'; choose one of l1"),
        (("--ratio", "0.5", "--round-to", "0"), "round_to must be a positive integer"),
        (("--ratio", "0.5", "--method", "sparse"), "unknown method 'sparse'"),
    ],
)
def test_prune_schedules_refuse_bad_input_before_loading(args: tuple[str, ...], needle: str) -> None:
    result = cli("prune", "--model", "cnn1d", "--data", "mnist1d", *args)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--model", "nope.pt2", "--data", "digits"), "no such file: nope.pt2"),
        (("--model", "resnet20", "--data", "digitz"), "unknown dataset 'digitz'; did you mean digits?"),
        (("--model", "resnet2", "--data", "digits"), "did you mean resnet32, resnet20"),
    ],
)
def test_a_mistyped_model_or_dataset_gets_a_one_line_hint(args: tuple[str, ...], needle: str) -> None:
    for command in (("prune", "--ratio", "0.5"), ("search", "--budget", "1")):
        result = cli(*command, *args)
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_plan_naming_missing_group_is_refused(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"ratios": {"no.such.layer": 0.5}}))
    result = cli("prune", "--model", "cnn1d", "--data", "mnist1d", "--plan", str(plan))
    assert result.returncode == 2 and "no.such.layer" in result.stderr


class _Sliced(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 16, 3, padding=1)
        self.a = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(torch.relu(self.c1(x))[:, :8]).mean(2))


def test_groups_lists_what_cannot_be_pruned_and_why(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "sliced.pt2"
    torch.export.save(torch.export.export(_Sliced().eval(), (torch.randn(1, 4, 12),)), str(path))
    result = cli("groups", "--model", str(path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [g["name"] for g in data["groups"]] == ["a"]
    assert [item["group"] for item in data["locked"]] == ["c1"] and "no longer runs" in data["locked"][0]["reason"]
    table = cli("groups", "--model", str(path))
    assert table.returncode == 0 and "not prunable (kept intact): c1: the pruned model no longer runs" in table.stdout


def test_measure_prints_protocol() -> None:
    result = cli("measure", "--model", "mlp", "--data", "digits", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["latency"]["median_ms"] > 0 and data["latency"]["protocol"]["runtime"] == "torch"
    assert data["cost"]["params"] > 0


def test_export_round_trips(workload, tmp_path: Path) -> None:
    names = analyze(workload.model, workload.example_inputs).names
    plan = Plan.uniform(names, 0.5, round_to=8)
    pruned = apply_plan(workload.model, plan, workload.example_inputs)
    report = export_model(
        pruned,
        workload.example_inputs,
        tmp_path,
        plan=plan,
        base=workload.model,
        latency=LatencyConfig(runtime="onnxruntime", warmup=1, min_repeats=3, max_repeats=6, block=3),
    )
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert report.latency is not None and report.latency.protocol.interleaved and report.speedup
    rebuilt = load_pruned(workload.model, workload.example_inputs, report.files["plan"], report.files["safetensors"])
    x = workload.dataset.x_val[:8]
    assert torch.equal(rebuilt(x), pruned(x))
    program = torch.export.load(report.files["pt2"])  # our own file: trusted here
    ex = workload.example_inputs
    assert torch.allclose(program.module()(ex), pruned(ex), atol=1e-5)


def test_export_refuses_unknown_format_and_plan_less_safetensors(workload, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError):
        export_model(workload.model, workload.example_inputs, tmp_path, formats=("tflite",))
    with pytest.raises(InvalidConfigError):
        export_model(workload.model, workload.example_inputs, tmp_path, formats=("safetensors",))
    assert not any(tmp_path.iterdir())


def test_verify_onnx_catches_a_wrong_model(workload) -> None:
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10)).eval()
    wrong = onnx_bytes(other, workload.example_inputs, dynamo=False)
    with pytest.raises(ExportError):
        verify_onnx(workload.model, wrong, workload.example_inputs)


def test_exported_onnx_has_a_dynamic_batch_axis(workload, tmp_path: Path) -> None:
    names = analyze(workload.model, workload.example_inputs).names
    plan = Plan.uniform(names, 0.5, round_to=8)
    pruned = apply_plan(workload.model, plan, workload.example_inputs)
    report = export_model(pruned, workload.example_inputs, tmp_path, plan=plan, formats=("onnx",))
    assert report.notes == []
    session = ort.InferenceSession(report.files["onnx"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    assert session.get_outputs()[0].shape[0] == "batch"
    for batch in (1, 3):
        x = workload.dataset.x_val[:batch]
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = pruned(x).numpy()
        assert got.shape == expected.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_onnx_bytes_keeps_a_fixed_batch_unless_asked(workload) -> None:
    fixed = onnx_bytes(workload.model, workload.example_inputs, dynamo=False)
    session = ort.InferenceSession(fixed, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1
    dynamic = onnx_bytes(workload.model, workload.example_inputs, dynamo=False, dynamic_batch=True)
    session = ort.InferenceSession(dynamic, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    assert verify_onnx(workload.model, dynamic, workload.example_inputs) < 1e-4


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python integer:torch.jit.TracerWarning")
def test_verify_onnx_catches_a_batch_size_baked_into_the_graph(workload) -> None:
    class Baked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(40, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(int(x.shape[0]), -1))  # the tracer records the int as a constant

    model = Baked().eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (workload.example_inputs,),
        buffer,
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    assert verify_onnx(model, buffer.getvalue(), workload.example_inputs, other_batch=0) < 1e-4
    with pytest.raises(ExportError, match="batch size 3"):
        verify_onnx(model, buffer.getvalue(), workload.example_inputs)
