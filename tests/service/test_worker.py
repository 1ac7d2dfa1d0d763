"""The worker against a real SQLite file: a tiny real search (resnet20 on the built-in digits, the shipped
reference weights), exports that run in ONNX Runtime, cancel within one evaluation, and real worker
subprocesses that are killed (kill -9) or stopped (SIGTERM) mid-job and resumed without redoing evaluations."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.artefacts import ArtefactStore
from service.db.engine import ensure_schema, make_engine
from service.db.repository import Repository
from service.settings import Settings
from service.worker import Worker
from tests.service.conftest import submit_job

ROOT = Path(__file__).resolve().parents[2]
POLL = 0.02
"""How often ``wait_for`` (conftest) polls here, in seconds."""
BUDGET = 10
"""Of the kill/SIGTERM jobs: enough evaluations to stop the first worker mid-search."""
SPEC = {
    "strategy": "random",
    "budget": 3,
    "val_samples": 100,
    "bn_batches": 2,
    "export_formats": ["onnx", "safetensors"],
}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """In-process workers run like ``main`` pins them: one torch thread (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", lease_seconds=3.0, heartbeat_seconds=0.5, poll_seconds=0.2)
    ensure_schema(s)
    return s


@pytest.fixture
def repo(settings: Settings) -> Iterator[Repository]:
    engine = make_engine(settings.db_url)
    try:
        yield Repository(engine)
    finally:
        engine.dispose()


def submit(repo: Repository, **spec: Any) -> str:
    return submit_job(repo, {**SPEC, **spec})


def run_one(settings: Settings, worker_id: str | None = None) -> None:
    """One worker claims and runs one job, then closes."""
    worker = Worker(settings) if worker_id is None else Worker(settings, worker_id)
    try:
        assert worker.run_once()
    finally:
        worker.close()


def search_rows(repo: Repository, job_id: str) -> dict[int, Any]:
    return {e.index: e for e in repo.evaluations(job_id, stage="search", limit=1000).items if e.index > 0}


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AUTOPRUNE_DATA_DIR": str(settings.data_dir),
        "AUTOPRUNE_LEASE_SECONDS": str(settings.lease_seconds),
        "AUTOPRUNE_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "AUTOPRUNE_POLL_SECONDS": str(settings.poll_seconds),
    }
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "service.worker", "--max-jobs", "1"], cwd=ROOT, env=env, stdout=fh, stderr=fh
        )


MidJob = Callable[[str, Path], AbstractContextManager[subprocess.Popen[bytes]]]


@pytest.fixture
def worker_mid_job(settings: Settings, repo: Repository, wait_for: Callable[..., None]) -> MidJob:
    """A context manager ``(job_id, log)``: a worker subprocess (:func:`start_worker`), entered once the job has two
    search evaluations (or the worker exited); killed on the way out if still running."""

    @contextlib.contextmanager
    def mid_job(job_id: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
        proc = start_worker(settings, log)
        try:
            wait_for(
                lambda: len(search_rows(repo, job_id)) >= 2 or proc.poll() is not None,
                180,
                "two evaluations",
                interval=POLL,
            )
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()

    return mid_job


def test_build_spec_from_rows(settings: Settings, repo: Repository) -> None:
    store = ArtefactStore(settings.artefacts)
    w_sha, w_size = store.put_bytes(b"weights", ".safetensors")
    d_sha, d_size = store.put_bytes(b"arrays", ".npz")
    repo.add_artefact(w_sha, w_size, "application/octet-stream", ".safetensors")
    repo.add_artefact(d_sha, d_size, "application/octet-stream", ".npz")
    model = repo.create_model(
        name="m", kind="architecture", architecture="mlp", kwargs={"hidden": 8}, artefact_sha256=w_sha
    )
    data = repo.create_dataset(name="d", kind="file", builtin=None, artefact_sha256=d_sha, info={})
    job, _ = repo.create_job(
        model_id=model.id, dataset_id=data.id, spec={**SPEC, "model": "ignored", "seed": 7}, progress_total=3
    )
    worker = Worker(settings)
    try:
        spec = worker.build_spec(repo.get_job(job.id))
    finally:
        worker.close()
    assert spec.model == "mlp" and dict(spec.kwargs) == {"hidden": 8} and spec.seed == 7
    assert spec.weights == str(store.path_for(w_sha, ".safetensors")) and spec.data == str(
        store.path_for(d_sha, ".npz")
    )
    assert spec.export_formats == ("onnx", "safetensors") and spec.budget == 3


@pytest.mark.slow
def test_worker_runs_a_job_to_success_with_exports(settings: Settings, repo: Repository) -> None:
    import onnxruntime as ort

    from autoprune.data import load_dataset

    job_id = submit(repo)
    worker = Worker(settings, "w-test")
    try:
        assert worker.run_once()  # the job: its best point exported before it succeeds
        assert repo.get_job(job_id).state == "succeeded"
        background = 0
        while worker.run_once():  # then the rest of the front, queued in the background (eager)
            background += 1
        assert background == len(repo.export_requests(job_id)) - 2  # all but the best's two formats
    finally:
        worker.close()
    job = repo.get_job(job_id)
    assert job.state == "succeeded", job.error
    assert job.progress_done == 3 and job.lease_expires_at is None and job.attempts == 1 and job.finished_at
    assert [(e.from_state, e.to_state) for e in repo.events_after(job_id) if e.kind == "state"] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    evaluations = repo.evaluations(job_id).items
    assert [(e.stage, e.index) for e in evaluations] == [("search", i) for i in range(4)]  # baseline + budget
    assert sum(1 for e in repo.events_after(job_id) if e.kind == "evaluation") == 4
    front = repo.front(job_id)
    assert job.front_size == len(front) >= 1
    best = job.best
    assert best is not None and best["select"] == "reward"
    assert best["reward"] == max(e.reward for e in evaluations)

    # every front point and the best, in both formats; the best one says so
    exports = {(x.stage, x.index, x.format): x for x in repo.exports(job_id)}
    points = {(e.stage, e.index) for e in front} | {(best["stage"], best["index"])}
    assert set(exports) == {(*p, f) for p in points for f in ("onnx", "safetensors")}
    assert all(x.meta["best"] == ((x.stage, x.index) == (best["stage"], best["index"])) for x in exports.values())
    store = ArtefactStore(settings.artefacts)

    # the exported ONNX model runs in ONNX Runtime and reproduces the recorded quality
    dataset = load_dataset("digits")
    dataset = dataset.subset(dataset.num_train, 100, seed=0)
    x_val = dataset.x_val.numpy().astype(np.float32)
    y_val = dataset.y_val.numpy() if dataset.y_val is not None else None
    assert y_val is not None
    by_index = {(e.stage, e.index): e for e in evaluations}
    for (stage, index, fmt), export in exports.items():
        assert export.meta["evaluation"]["index"] == index and export.meta["plan"] == by_index[(stage, index)].plan
        if fmt != "onnx":
            continue
        path = store.path_for(export.artefact_sha256, ".onnx")
        assert repo.get_artefact(export.artefact_sha256).size_bytes == path.stat().st_size
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: x_val})[0]
        accuracy = float((logits.argmax(axis=1) == y_val).mean())
        assert accuracy == pytest.approx(by_index[(stage, index)].quality, abs=0.02)
    best_onnx = exports[(best["stage"], best["index"], "onnx")]
    assert best_onnx.meta["export"]["speedup"] is not None  # the best one is re-timed in ONNX Runtime

    # safetensors: a zip of the weights, the plan and the evaluation
    archive = exports[(best["stage"], best["index"], "safetensors")]
    with zipfile.ZipFile(io.BytesIO(store.path_for(archive.artefact_sha256, ".zip").read_bytes())) as zf:
        assert sorted(zf.namelist()) == ["evaluation.json", "model.plan.json", "model.safetensors"]
        assert json.loads(zf.read("evaluation.json"))["index"] == best["index"]
        assert json.loads(zf.read("model.plan.json")) == archive.meta["plan"]


def test_a_knapsack_job_keeps_its_latency_table(settings: Settings, repo: Repository) -> None:
    job_id = submit(
        repo, strategy="knapsack", strategy_options={"probe_ratios": [0.5]}, budget=2, export_formats=["safetensors"]
    )
    run_one(settings, "w-knap")
    job = repo.get_job(job_id)
    assert job.state == "succeeded", job.error
    assert job.progress_done == 2  # the probes are not candidates
    table = next(e for e in repo.events_after(job_id) if e.kind == "sensitivity").data
    assert len(table["sensitivity"]["probes"]) == len(table["sensitivity"]["groups"]) > 1
    assert all(p["ratio"] == 0.5 for p in table["sensitivity"]["probes"])
    assert all("predicted_latency_ratio" in e.record["plan"]["extra"] for e in search_rows(repo, job_id).values())


@pytest.mark.slow
def test_a_resumed_knapsack_job_does_not_probe_again(
    settings: Settings, repo: Repository, tmp_path: Path, worker_mid_job: MidJob
) -> None:
    budget = 6
    job_id = submit(  # the default strategy; 0.25 rounds the 16-wide groups to their full width (skipped)
        repo, strategy="knapsack", strategy_options={"probe_ratios": [0.25, 0.5]}, budget=budget,
        export_formats=["safetensors"],
    )  # fmt: skip
    log = tmp_path / "worker1.log"
    with worker_mid_job(job_id, log) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    assert repo.get_job(job_id).state == "queued"
    before = search_rows(repo, job_id)
    assert 2 <= len(before) < budget
    stored = repo.last_event(job_id, "probes")
    assert stored is not None  # stored when probing ended, before the first candidate
    first_search = min(
        e.id for e in repo.events_after(job_id) if e.kind == "evaluation" and e.data["evaluation"]["index"]
    )
    assert stored.id < first_search
    assert any(p["skipped"] for p in stored.data["probes"]) and not any(p["failed"] for p in stored.data["probes"])

    run_one(settings, "w2")
    job = repo.get_job(job_id)
    assert job.state == "succeeded", job.error
    assert job.attempts == 2
    events = repo.events_after(job_id)
    assert [e.kind for e in events].count("probes") == 1  # the second attempt probed nothing
    # the table the search ended with is the stored one, not a new measurement (the probes' wall time included)
    table = next(e for e in events if e.kind == "sensitivity").data["sensitivity"]
    assert table == stored.data
    after = search_rows(repo, job_id)
    for index, row in before.items():
        assert (after[index].id, after[index].record) == (row.id, row.record)
    done = next(e for e in events if e.to_state == "succeeded")
    assert done.data["replayed"] == len(before)  # the same table and calibration: the same plans, replayed exactly


def test_a_bad_job_fails_with_its_error(settings: Settings, repo: Repository) -> None:
    model = repo.create_model(
        name="x", kind="architecture", architecture="no-such-net", kwargs={}, artefact_sha256=None
    )
    data = repo.create_dataset(name="d", kind="builtin", builtin="digits", artefact_sha256=None, info={})
    job, _ = repo.create_job(model_id=model.id, dataset_id=data.id, spec=dict(SPEC), progress_total=3)
    run_one(settings)
    row = repo.get_job(job.id)
    assert row.state == "failed" and row.lease_expires_at is None
    assert row.error and "no-such-net" in row.error and "\n" not in row.error and row.error.split(":")[0].isidentifier()
    failed = next(e for e in repo.events_after(job.id) if e.to_state == "failed")
    assert "Traceback" in failed.data["traceback"]


def test_a_job_error_does_not_show_server_paths(settings: Settings, repo: Repository) -> None:
    sha = "ab" * 32  # an artefact row whose file has gone: the worker cannot open the model's weights
    repo.add_artefact(sha, 10, "application/octet-stream", ".safetensors")
    model = repo.create_model(name="x", kind="architecture", architecture="resnet20", kwargs={}, artefact_sha256=sha)
    data = repo.create_dataset(name="d", kind="builtin", builtin="digits", artefact_sha256=None, info={})
    job, _ = repo.create_job(model_id=model.id, dataset_id=data.id, spec=dict(SPEC), progress_total=3)
    run_one(settings)
    row = repo.get_job(job.id)
    assert row.state == "failed" and row.error
    assert str(settings.data_dir) not in row.error and "/" not in row.error, row.error


def test_a_stored_job_naming_a_study_storage_fails_without_touching_it(
    settings: Settings, repo: Repository, tmp_path: Path
) -> None:
    """A row written before the API refused ``strategy_options.storage`` (or by hand) never reaches Optuna."""
    target = tmp_path / "planted.db"
    job_id = submit(repo, strategy="optuna-tpe", strategy_options={"storage": f"sqlite:///{target}"})
    run_one(settings)
    row = repo.get_job(job_id)
    assert row.state == "failed" and row.error is not None
    assert "not accepted by the service" in row.error and "AUTOPRUNE_STUDY_STORAGE" in row.error
    assert not target.exists()


def test_cancel_mid_job_stops_within_one_evaluation(
    settings: Settings, repo: Repository, wait_for: Callable[..., None]
) -> None:
    job_id = submit(repo, budget=500, export_formats=["safetensors"])
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    try:
        wait_for(lambda: len(search_rows(repo, job_id)) >= 2, 120, "two evaluations", interval=POLL)
        repo.request_cancel(job_id)
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        worker.stop_event.set()
        thread.join(timeout=60)
        worker.close()
    job = repo.get_job(job_id)
    assert job.state == "cancelled" and job.lease_expires_at is None and job.progress_done < 500
    events = repo.events_after(job_id)
    cancel_at = next(e.id for e in events if e.kind == "log" and e.data.get("message") == "cancel requested")
    assert sum(1 for e in events if e.kind == "evaluation" and e.id > cancel_at) <= 1
    assert repo.exports(job_id) == []


@pytest.mark.slow
def test_kill_9_mid_job_resumes_on_another_worker_without_redoing(
    settings: Settings, repo: Repository, tmp_path: Path, wait_for: Callable[..., None], worker_mid_job: MidJob
) -> None:
    job_id = submit(repo, budget=BUDGET, export_formats=["safetensors"])
    with worker_mid_job(job_id, tmp_path / "worker1.log") as proc:
        proc.kill()  # SIGKILL: no cleanup, the lease is left to expire
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "worker1.log").read_text()
    killed = repo.get_job(job_id)
    assert killed.state == "running" and killed.attempts == 1
    before = search_rows(repo, job_id)
    assert 2 <= len(before) < BUDGET

    worker = Worker(settings, "w2")
    try:
        # the job is claimable only once the dead worker's lease has expired
        assert repo.get_job(job_id).lease_expires_at is not None
        wait_for(worker.run_once, 60, "the reclaim", interval=POLL)
    finally:
        worker.close()
    job = repo.get_job(job_id)
    assert job.state == "succeeded", job.error
    assert job.attempts == 2 and job.progress_done == BUDGET
    after = search_rows(repo, job_id)
    assert sorted(after) == list(range(1, BUDGET + 1))
    for index, row in before.items():  # the first evaluations are kept as they were, not redone
        assert (after[index].id, after[index].created_at, after[index].record) == (row.id, row.created_at, row.record)
    events = repo.events_after(job_id)
    assert [e.data["evaluation"]["index"] for e in events if e.kind == "evaluation"].count(1) == 1
    done = next(e for e in events if e.to_state == "succeeded")
    assert done.data["replayed"] == len(before)
    reclaim = next(e for e in events if e.from_state == "running" and e.to_state == "queued")
    assert reclaim.data["reason"] == "lease expired"
    assert repo.exports(job_id)


@pytest.mark.slow
def test_sigterm_releases_the_job_and_another_worker_resumes_it(
    settings: Settings, repo: Repository, tmp_path: Path, worker_mid_job: MidJob
) -> None:
    job_id = submit(repo, budget=BUDGET, export_formats=["safetensors"])
    log = tmp_path / "worker1.log"
    with worker_mid_job(job_id, log) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    released = repo.get_job(job_id)
    assert released.state == "queued" and released.worker_id is None and released.lease_expires_at is None
    before = search_rows(repo, job_id)
    assert 2 <= len(before) < BUDGET
    assert [e.data.get("reason") for e in repo.events_after(job_id) if e.to_state == "queued"][-1] == "released"
    assert f"job {job_id} released" in log.read_text() and f"job {job_id} done" not in log.read_text()

    worker = Worker(settings, "w2")
    try:
        assert worker.run_once()  # claimable at once: no lease to wait for
    finally:
        worker.close()
    job = repo.get_job(job_id)
    assert job.state == "succeeded", job.error
    assert job.attempts == 2
    after = search_rows(repo, job_id)
    assert sorted(after) == list(range(1, BUDGET + 1))
    for index, row in before.items():
        assert (after[index].id, after[index].created_at, after[index].record) == (row.id, row.created_at, row.record)
    done = next(e for e in repo.events_after(job_id) if e.to_state == "succeeded")
    assert done.data["replayed"] == len(before)
