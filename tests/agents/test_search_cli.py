"""``autoprune search`` as a user runs it: a real subprocess, real pruning, real latency measurement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from autoprune.objective import Evaluation


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def read_jsonl(path: Path) -> list[Evaluation]:
    return [Evaluation.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_search_writes_front_plot_report_and_a_verified_best_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    knapsack = ("--strategy", "knapsack", "--option", "probe_ratios=[0.5]")  # the default strategy, one probe level
    proc = cli("search", "--model", "resnet20", "--data", "digits", *knapsack, "--budget", "4", "--val-samples", "200",
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Pareto front" in proc.stdout and "unpruned" in proc.stdout
    evaluations = read_jsonl(out / "evaluations.jsonl")
    assert [e.index for e in evaluations if e.stage == "search"] == [0, 1, 2, 3, 4]
    assert all(e.latency.protocol.meter != "deterministic" for e in evaluations)
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto
    # when nothing beat the unpruned model, the CLI says so and suggests what to change
    assert ("no candidate beat the unpruned model" in proc.stderr) == pareto["best"]["is_baseline"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "knapsack" in report
    job = json.loads((out / "job.json").read_text())
    assert job["strategy"] == "knapsack" and job["budget"] == 4
    probes = (out / "probes.json").read_text()  # the probe table, saved once probing ended
    assert json.loads(probes)["probes"] and all(p["ratio"] == 0.5 for p in json.loads(probes)["probes"])
    onnx_file = out / "best" / "model.onnx"
    assert (out / "best" / "model.plan.json").exists() and (out / "best" / "model.safetensors").exists()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 10)

    # the same --out again is refused (nothing is overwritten) ...
    again = cli("search", "--model", "resnet20", "--data", "digits", "--budget", "2", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr
    # ... and --resume replays the recorded evaluations and adds the new ones, without probing again
    resumed = cli("search", "--model", "resnet20", "--data", "digits", *knapsack, "--budget", "5", "--val-samples",
                  "200", "--out", str(out), "--resume")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "4 recorded evaluations will be replayed" in resumed.stdout
    assert "probe table in" in resumed.stderr and "is used, not measured again" in resumed.stderr
    assert (out / "probes.json").read_text() == probes
    after = [e for e in read_jsonl(out / "evaluations.jsonl") if e.stage == "search" and e.index > 0]
    assert [e.plan for e in after[:4]] == [e.plan for e in evaluations if e.index > 0]
    assert [e.quality for e in after[:4]] == [e.quality for e in evaluations if e.index > 0]
    assert len(after) == 5


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_the_evaluations(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoprune.cli", "search", "--model", "resnet20", "--data", "digits",
         "--strategy", "random", "--budget", "200", "--val-samples", "100", "--out", str(out)],  # no probes
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    log = out / "evaluations.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    kept = read_jsonl(log)
    assert 2 <= len(kept) < 200
    assert (out / "pareto.json").exists() and (out / "report.md").exists()


def test_a_ctrl_c_whose_keyboardinterrupt_is_swallowed_still_stops_the_search() -> None:
    """Issue 13.9: CPython raises the KeyboardInterrupt wherever the main thread is, and a garbage-collector
    callback or a library's bare ``except:`` can swallow it; the search then ran to its budget and exited 0.
    Here a callback swallows it (as such a library would): the CLI's Ctrl-C flag still stops the search,
    as interrupted, after the evaluation in progress."""
    from autoprune.cli import CtrlC
    from autoprune.job import JobSpec, run_job

    spec = JobSpec.from_mapping({"model": "resnet20", "data": "digits", "budget": 30, "val_samples": 50})

    def swallowing(progress: object) -> None:
        if getattr(progress, "done", 0) == 2:
            try:
                signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, delivered to this (main) thread
                time.sleep(30)  # never reached: the handler raises on return from raise_signal
            except KeyboardInterrupt:
                pass  # ... and lost here

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when run under nohup or with &
    ctrl_c = CtrlC()
    with ctrl_c.installed():
        result = run_job(spec, callbacks=[swallowing], stop=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is before  # restored
    assert ctrl_c.pressed == 1
    assert result.stop_reason == "interrupted"
    assert len(result.evaluations) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--model", "resnet20", "--data", "digits", "--strategy", "alphazero"), "unknown strategy 'alphazero'"),
        (("--model", "resnet20", "--data", "digits", "--budget", "0"), "budget must be an integer >= 1"),
        (("--model", "resnet20", "--data", "digits", "--objective", "fast"), "unknown reward form"),
        (("--model", "resnet20", "--data", "digits", "--option", "lr=3"), "no option"),
        (("--model", "nonet", "--data", "digits", "--budget", "1"), "nonet"),
        (("--data", "digits"), "give --model"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    out = tmp_path / "out"
    proc = cli("search", *args, "--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_job_spec_keys_are_refused(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("model: resnet20\ndata: digits\nbudjet: 3\n")
    proc = cli("search", "--spec", str(spec), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and "unknown job spec key(s): budjet" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_strategies_lists_the_registry() -> None:
    proc = cli("strategies", timeout=120)
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert {"uniform", "random", "optuna-tpe", "optuna-nsga2", "sb3-ddpg", "sb3-td3", "sb3-sac", "sb3-ppo"} <= set(
        names
    )
