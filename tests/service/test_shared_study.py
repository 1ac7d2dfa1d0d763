"""Jobs that several workers run at once (``workers > 1``), sharing one Optuna study in the service's PostgreSQL:
the slot contract of the repository (on SQLite and PostgreSQL), the validation of the knob, and real worker
subprocesses on the real PostgreSQL (a tiny job: resnet20 on the built-in digits) — together, and with one of
them killed (kill -9) mid-search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from autoprune.errors import InvalidConfigError
from autoprune.job import JobSpec
from service.db.engine import check_job_workers, make_engine, shared_study_storage, upgrade
from service.db.models import JobRow
from service.db.repository import LeaseLost, Repository
from service.settings import Settings
from service.worker import Worker
from tests.service.test_repository import record

ROOT = Path(__file__).resolve().parents[2]
SPEC = {
    "strategy": "optuna-tpe",
    "budget": 6,
    "workers": 2,
    "val_samples": 200,
    "bn_batches": 2,
    "export_formats": ["onnx"],
}


def shared_job(repo: Repository, **spec: Any) -> JobRow:
    model = repo.create_model(name="r", kind="architecture", architecture="resnet20", kwargs={}, artefact_sha256=None)
    data = repo.create_dataset(name="digits", kind="builtin", builtin="digits", artefact_sha256=None, info={})
    body = {**SPEC, **spec}
    job, _ = repo.create_job(model_id=model.id, dataset_id=data.id, spec=body, progress_total=body["budget"])
    return job


# -- the repository contract (SQLite and PostgreSQL) ------------------------------------------------------
def test_slots_join_reserve_record_and_leave(repo: Repository) -> None:
    job = shared_job(repo, budget=3)
    assert job.workers == 2
    assert repo.claim_job("w1", 30).id == job.id  # type: ignore[union-attr]
    joined = repo.claim_job("w2", 30)
    assert joined is not None and joined.id == job.id and joined.attempts == 1 and joined.state == "running"
    assert repo.claim_job("w3", 30) is None  # both slots held
    assert (repo.slot_of(job.id, "w1"), repo.slot_of(job.id, "w2"), repo.slot_of(job.id, "w3")) == (0, 1, None)
    assert repo.live_workers(job.id) == ["w1", "w2"]
    assert [e.data["message"] for e in repo.events_after(job.id) if e.kind == "log"] == ["worker w2 joined (slot 1)"]

    # the shared budget: stored + live reservations; indices unique across holders
    assert repo.reserve_index(job.id, "w1", 3) == 1
    assert repo.reserve_index(job.id, "w1", 3) == 1  # held until recorded
    assert repo.reserve_index(job.id, "w2", 3) == 2
    with pytest.raises(LeaseLost):  # a search evaluation only under its holder's reservation
        repo.record_evaluation(job.id, "w1", record(2), done=0, best=None, front=())
    with pytest.raises(LeaseLost):
        repo.reserve_index(job.id, "w3", 3)

    def derive(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[tuple[str, int]]]:
        top = max((r for r in records if r["index"] > 0), key=lambda r: r["reward"])
        return {"index": top["index"]}, [("search", top["index"])]

    repo.record_evaluation(job.id, "w2", record(2, quality=0.8), done=0, best=None, front=(), derive=derive)
    repo.record_evaluation(job.id, "w1", record(1, quality=0.9), done=0, best=None, front=(), derive=derive)
    row = repo.get_job(job.id)
    assert row.progress_done == 2 and row.best == {"index": 1} and [e.index for e in repo.front(job.id)] == [1]
    assert {e.index: e.worker_id for e in repo.evaluations(job.id).items} == {1: "w1", 2: "w2"}
    assert [e.data["worker_id"] for e in repo.events_after(job.id) if e.kind == "evaluation"] == ["w2", "w1"]
    assert repo.reserve_index(job.id, "w2", 3) == 3
    assert repo.reserve_index(job.id, "w1", 3) is None  # 2 stored + 1 reserved = budget

    # leaving: slot 1 gives its slot up, slot 0 finishes; the job stays running under w1
    assert repo.leave_slot(job.id, "w2") is False
    assert repo.leave_slot(job.id, "w1") is True
    assert repo.live_workers(job.id) == ["w1"] and repo.get_job(job.id).state == "running"
    with pytest.raises(LeaseLost):
        repo.renew_lease(job.id, "w2", 30)
    repo.renew_lease(job.id, "w1", 30)


def test_a_dead_holder_s_slot_and_reservation_are_taken_over(repo: Repository) -> None:
    job = shared_job(repo, budget=2)
    repo.claim_job("w1", 30)
    repo.claim_job("w2", 0.05)  # w2 joins with a lease that runs out at once
    assert repo.reserve_index(job.id, "w1", 2) == 1
    assert repo.reserve_index(job.id, "w2", 2) == 2
    time.sleep(0.2)
    assert repo.live_workers(job.id) == ["w1"]
    assert repo.claim_job("w3", 30) is not None and repo.slot_of(job.id, "w3") == 1  # the expired slot
    assert repo.reserve_index(job.id, "w3", 2) == 2  # the dead holder's reservation went back to the pool
    with pytest.raises(LeaseLost):  # the dead holder is fenced
        repo.record_evaluation(job.id, "w2", record(2), done=0, best=None, front=())
    assert repo.get_job(job.id).attempts == 1  # joins are not attempts


def test_slot_0_taken_over_by_a_leaving_holder_and_release_keeps_the_job(repo: Repository) -> None:
    job = shared_job(repo)
    repo.claim_job("w1", 0.05)
    repo.claim_job("w2", 30)
    time.sleep(0.2)
    assert repo.leave_slot(job.id, "w2") is True  # slot 0's holder is dead: w2 finishes the job
    assert repo.slot_of(job.id, "w2") == 0 and repo.get_job(job.id).worker_id == "w2"
    repo.claim_job("w3", 30)
    assert repo.slot_of(job.id, "w3") == 1
    repo.release_job(job.id, "w3")  # SIGTERM of one holder: its slot only
    assert repo.get_job(job.id).state == "running" and repo.slot_of(job.id, "w3") is None
    repo.release_job(job.id, "w2")  # the last one: the job goes back to the queue
    row = repo.get_job(job.id)
    assert row.state == "queued" and row.worker_id is None and repo.live_workers(job.id) == []


def test_cancel_and_reclaim_of_a_shared_job(repo: Repository) -> None:
    job = shared_job(repo)
    repo.claim_job("w1", 0.05)
    repo.claim_job("w2", 0.05)
    time.sleep(0.2)
    again = repo.claim_job("w3", 30)  # every holder dead: reclaimed as a whole
    assert again is not None and again.attempts == 2 and repo.live_workers(job.id) == ["w3"]
    assert repo.slot_of(job.id, "w3") == 0
    repo.claim_job("w4", 30)
    repo.request_cancel(job.id)
    assert repo.claim_job("w5", 30) is None  # no joining a job being cancelled
    repo.transition(job.id, "cancelled", worker_id="w4")  # type: ignore[arg-type]
    for worker in ("w3", "w4"):
        with pytest.raises(LeaseLost):
            repo.renew_lease(job.id, worker, 30)
    assert repo.live_workers(job.id) == []


# -- validation ---------------------------------------------------------------------------------------------
def test_workers_validation(tmp_path: Path) -> None:
    JobSpec(model="resnet20", strategy="optuna-nsga2", workers=3).validate()
    with pytest.raises(InvalidConfigError, match="workers must be an integer >= 1"):
        JobSpec(model="resnet20", strategy="optuna-tpe", workers=0).validate()
    with pytest.raises(InvalidConfigError, match="workers > 1 needs a strategy"):
        JobSpec(model="resnet20", strategy="random", workers=2).validate()
    sqlite = f"sqlite:///{tmp_path / 'a.db'}"
    pg = "postgresql://u@h/db"
    with pytest.raises(InvalidConfigError, match="PostgreSQL or an AUTOPRUNE_STUDY_STORAGE"):
        check_job_workers(2, sqlite)
    check_job_workers(1, sqlite)
    check_job_workers(2, sqlite, "sqlite:///study.db")  # the operator's setting
    check_job_workers(2, pg)
    assert shared_study_storage(pg) == "postgresql+psycopg://u@h/db?options=-csearch_path%3Doptuna"
    assert shared_study_storage(pg, "sqlite:///s.db") == "sqlite:///s.db"
    assert shared_study_storage(sqlite) is None


def test_a_shared_job_on_sqlite_without_storage_fails_with_the_reason(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        job = shared_job(Repository(engine))
        worker = Worker(settings, "w1")
        try:
            assert worker.run_once()
        finally:
            worker.close()
        row = Repository(engine).get_job(job.id)
    finally:
        engine.dispose()
    assert row.state == "failed" and row.error is not None
    assert row.error.startswith("InvalidConfigError: workers > 1") and "PostgreSQL" in row.error


# -- real workers on the real PostgreSQL (conftest's pg_repo) -------------------------------------------------
def start_worker(pg_url: str, data_dir: Path, log: Path, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AUTOPRUNE_DATABASE_URL": pg_url,
        "AUTOPRUNE_DATA_DIR": str(data_dir),
        "AUTOPRUNE_LEASE_SECONDS": "3",
        "AUTOPRUNE_HEARTBEAT_SECONDS": "0.5",
        "AUTOPRUNE_POLL_SECONDS": "0.2",
    }
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "service.worker", "--max-jobs", "1", "--worker-id", name],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=fh,
        )


def study_trials(pg_url: str, job_id: str) -> dict[str, list[Any]]:
    import optuna

    study = optuna.load_study(study_name=f"autoprune-{job_id}", storage=shared_study_storage(pg_url))
    trials: dict[str, list[Any]] = {}
    for t in study.get_trials(deepcopy=False):
        trials.setdefault(t.state.name, []).append(t)
    return trials


def polling(log: Path) -> bool:
    return log.exists() and b"polling" in log.read_bytes()


@pytest.fixture
def two_workers(
    pg_url: str, pg_repo: Repository, tmp_path: Path, wait_for: Callable[..., None]
) -> Iterator[tuple[list[subprocess.Popen[bytes]], list[Path]]]:
    """Worker subprocesses w1 and w2 on the test's (migrated) PostgreSQL, both polling: (processes, logs).
    Killed after the test if still running."""
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    procs = [start_worker(pg_url, tmp_path / "data", log, f"w{i + 1}") for i, log in enumerate(logs)]
    try:
        wait_for(lambda: all(polling(log) for log in logs), 120, "both workers polling")
        yield procs, logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_two_workers_share_one_job_and_one_study(
    pg_url: str, pg_repo: Repository, two_workers: tuple[list[subprocess.Popen[bytes]], list[Path]]
) -> None:
    procs, logs = two_workers
    job = shared_job(pg_repo, strategy_options={"warm_start": 1})  # each holder probes (or reuses the probes)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=300) == 0, log.read_text()
    row = pg_repo.get_job(job.id)
    assert row.state == "succeeded", row.error
    assert row.attempts == 1 and row.progress_done == 6 and pg_repo.live_workers(job.id) == []
    search = [e for e in pg_repo.evaluations(job.id, stage="search").items if e.index > 0]
    assert sorted(e.index for e in search) == [1, 2, 3, 4, 5, 6]  # exactly the budget, unique indices
    assert {e.worker_id for e in search} == {"w1", "w2"}  # both workers evaluated
    events = pg_repo.events_after(job.id)
    by_index = {e.index: e for e in search}
    evaluated = [e for e in events if e.kind == "evaluation" and e.data["evaluation"]["index"] > 0]
    assert sorted(e.data["evaluation"]["index"] for e in evaluated) == [1, 2, 3, 4, 5, 6]
    assert all(e.data["worker_id"] == by_index[e.data["evaluation"]["index"]].worker_id for e in evaluated)
    messages = [e.data.get("message", "") for e in events if e.kind == "log"]
    assert any("joined (slot 1)" in m for m in messages) and any("left (slot 1)" in m for m in messages)
    done = next(e for e in events if e.to_state == "succeeded")
    assert done.data["workers"] == ["w1", "w2"] and done.data["evaluations"] == 6
    probes = [e for e in events if e.kind == "probes"]  # kept with the job for a holder that joins or resumes
    assert 1 <= len(probes) <= 2 and all(e.data["probes"] for e in probes)

    # the study: one trial per evaluation, each told with its evaluation's index and reward
    trials = study_trials(pg_url, job.id)
    assert set(trials) == {"COMPLETE"} and len(trials["COMPLETE"]) == 6
    for t in trials["COMPLETE"]:
        e = by_index[t.user_attrs["evaluation_index"]]
        assert t.value == pytest.approx(e.reward) and t.user_attrs["worker_id"] == e.worker_id

    # the finisher exported the best over every worker's evaluations and queued the rest of the front
    best = row.best
    assert best is not None and best["reward"] == max(e.reward for e in pg_repo.evaluations(job.id).items)
    front = {(e.stage, e.index) for e in pg_repo.front(job.id)}
    exports = {(x.stage, x.index) for x in pg_repo.exports(job.id)}
    assert exports == {(best["stage"], best["index"])}
    requested = {(r.stage, r.index) for r in pg_repo.export_requests(job.id)}
    assert requested == front | {(best["stage"], best["index"])}
    assert row.front_size == len(front) >= 1


@pytest.mark.slow
def test_kill_9_of_one_worker_the_other_finishes_the_budget(
    pg_url: str,
    pg_repo: Repository,
    two_workers: tuple[list[subprocess.Popen[bytes]], list[Path]],
    wait_for: Callable[..., None],
) -> None:
    procs, logs = two_workers
    job = shared_job(pg_repo, budget=10, val_samples=300)
    victim = {"w1": procs[0], "w2": procs[1]}

    def one_evaluated() -> bool:
        rows = [e for e in pg_repo.evaluations(job.id, stage="search").items if e.index > 0]
        return len(rows) >= 2 and len({e.worker_id for e in rows}) == 2

    wait_for(one_evaluated, 120, "both workers evaluating")
    killed = pg_repo.get_job(job.id).worker_id  # the holder of slot 0: the other one must take over
    assert killed in victim
    victim[killed].send_signal(signal.SIGKILL)
    assert victim[killed].wait(timeout=30) == -signal.SIGKILL
    survivor = "w1" if killed == "w2" else "w2"
    assert victim[survivor].wait(timeout=180) == 0, logs[int(survivor[1]) - 1].read_text()
    row = pg_repo.get_job(job.id)
    assert row.state == "succeeded", row.error
    assert row.attempts == 1  # the job itself was never reclaimed: the survivor held it throughout
    search = [e for e in pg_repo.evaluations(job.id, stage="search").items if e.index > 0]
    assert sorted(e.index for e in search) == list(range(1, 11))
    trials = study_trials(pg_url, job.id)
    # one COMPLETE trial per stored evaluation (a trial whose evaluation the killed worker recorded just before dying is
    # completed from the record), nothing left RUNNING; what it was evaluating when it died was failed
    assert "RUNNING" not in trials
    assert sorted(t.user_attrs["evaluation_index"] for t in trials["COMPLETE"]) == list(range(1, 11))
    assert all(t.user_attrs.get("worker_id") == killed for t in trials.get("FAIL", []))
    messages = [e.data.get("message", "") for e in pg_repo.events_after(job.id) if e.kind == "log"]
    assert f"worker {survivor} took over slot 0 to finish the job" in messages
    assert pg_repo.exports(job.id)
    by_index = {e.index: e for e in search}
    assert all(t.value == by_index[t.user_attrs["evaluation_index"]].reward for t in trials["COMPLETE"])
