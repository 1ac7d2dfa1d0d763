"""One chosen point from every front-end (issue 12): the CLI's ``--select``, the service worker's ``select`` (the
point it exports first and names ``jobs.best``) and the facade's ``autoprune.search(select=...)`` all apply
``agents.result.Selection``, so the same model, data and seed give the same best point.

Latency is measured for real, so two runs never time a candidate identically; what is the same across runs is
the sequence of plans and their quality (seeded), and, given the same evaluations, the chosen point. The facade
therefore runs once fresh (same plans and qualities as the CLI) and once replaying the CLI's recorded
evaluations (``history=``), which must choose exactly the CLI's point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import autoprune
from autoprune.job import JobSpec
from autoprune.objective import Evaluation
from service.worker import Worker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RULE = {"select": "latency", "max_quality_drop": 0.5}


@pytest.mark.slow
def test_the_cli_the_worker_and_the_facade_choose_the_same_point(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "autoprune.cli", "search", "--model", "resnet20", "--data", "digits",
            "--strategy", "random", "--budget", "3", "--seed", "3", "--select", RULE["select"],
            "--max-quality-drop", str(RULE["max_quality_drop"]), "--export", "onnx", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    recorded = [Evaluation.from_json(json.loads(line)) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    cli_best = json.loads((out / "pareto.json").read_text())["best"]
    assert cli_best["select"] == "latency" and cli_best["max_quality_drop"] == 0.5
    cli_point = next(e for e in recorded if (e.index, e.stage) == (cli_best["index"], cli_best["stage"]))

    kw = {"strategy": "random", "budget": 3, "seed": 3, "progress": False, **RULE}
    with pytest.warns(UserWarning, match="shipped resnet20-digits reference weights"):  # the CLI's weights
        fresh = autoprune.search("resnet20", "digits", **kw)
    searched = [e for e in recorded if e.index > 0]
    assert [e.plan for e in fresh.evaluations] == [e.plan for e in searched]  # the same plans, in order
    assert [e.quality for e in fresh.evaluations] == [e.quality for e in searched]
    assert fresh.baseline.quality == recorded[0].quality

    with pytest.warns(UserWarning, match="shipped"):
        replayed = autoprune.search("resnet20", "digits", history=searched, **kw)
    assert replayed.replayed == 3
    chosen = replayed.best()
    assert (chosen.index, chosen.stage, chosen.plan) == (cli_point.index, cli_point.stage, cli_point.plan)

    # the worker's summary of the same result (jobs.best, the point it exports first) names the same point
    spec = JobSpec(model="resnet20", data="digits", strategy="random", budget=3, seed=3, **RULE)
    summary = Worker._best_summary(replayed, spec)
    assert (summary["index"], summary["stage"], summary["select"]) == (cli_point.index, cli_point.stage, "latency")
    for result in (fresh, replayed):  # and the facade's own rule is the one the worker applies
        assert Worker._best_summary(result, spec)["index"] == result.best().index
