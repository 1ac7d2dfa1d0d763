"""The repository contract, against a real SQLite file and the real PostgreSQL (the ``repo`` fixture runs each
test on both), plus claims from several real processes at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from autoprune.plan import Plan
from autoprune.records import Evaluation, Latency, LatencyProtocol
from service.artefacts import ArtefactStore, TooLarge
from service.db.engine import current_revision, make_engine, normalize_url, upgrade
from service.db.models import Base, JobRow, JobState
from service.db.repository import ALLOWED, Conflict, LeaseLost, NotFound, Repository

ROOT = Path(__file__).resolve().parents[2]


def record(index: int, stage: str = "search", *, quality: float = 0.9, ratio: float = 1.0, size: int = 1000) -> dict:
    """A real ``Evaluation.to_json()`` record (torch-free: :mod:`autoprune.records`)."""
    protocol = LatencyProtocol("torch", 1, 1, 2, 10, True, 0.0, 0.0)
    return Evaluation(
        plan=Plan(ratios={"g": round(0.1 * index, 3)}),
        quality=quality,
        metric="accuracy",
        latency=Latency(
            2.0 * ratio, 2.0 * ratio, 2.0 * ratio, 2.0 * ratio, protocol, reference_median_ms=2.0, ratio=ratio
        ),
        macs=1000 - index,
        params=100 - index,
        nonzero_params=100 - index,
        size_bytes=size,
        compressed_bytes=size,
        reward=quality / ratio,
        reward_terms={},
        timings={},
        base_quality=0.9,
        base_latency_ms=2.0,
        base_macs=1000,
        base_params=100,
        index=index,
        stage=stage,
    ).to_json()


def new_job(repo: Repository, **kwargs: Any) -> JobRow:
    model = repo.create_model(name="m", kind="architecture", architecture="resnet20", kwargs={}, artefact_sha256=None)
    data = repo.create_dataset(name="d", kind="builtin", builtin="digits", artefact_sha256=None, info={})
    job, created = repo.create_job(
        model_id=model.id, dataset_id=data.id, spec={"strategy": "random", "budget": 3}, progress_total=3, **kwargs
    )
    assert created
    return job


def states(repo: Repository, job_id: str) -> list[tuple[str | None, str | None]]:
    return [(e.from_state, e.to_state) for e in repo.events_after(job_id) if e.kind == "state"]


# -- schema ------------------------------------------------------------------------------------------------
def test_migrations_build_the_models_schema_and_are_idempotent(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    upgrade(db_url)  # a second run (another process starting) changes nothing
    assert current_revision(db_url) == "0003"
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_normalize_url() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_engine_pragmas(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


# -- artefacts, models, datasets ---------------------------------------------------------------------------
def test_artefact_store_is_content_addressed_and_enforces_the_limit(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path / "a")
    sha, size = store.put_stream(iter([b"hello ", b"world"]), 100, ".onnx")
    assert size == 11
    path = store.path_for(sha, ".onnx")
    assert path == tmp_path / "a" / sha[:2] / f"{sha}.onnx"
    assert path.read_bytes() == b"hello world"
    assert store.put_bytes(b"hello world", ".onnx") == (sha, 11)  # same content, same file
    with pytest.raises(TooLarge):
        store.put_stream(iter([b"x" * 60, b"y" * 60]), 100)
    files = sorted(p.name for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == [f"{sha}.onnx"]  # nothing left behind by the rejected stream
    with pytest.raises(ValueError):
        store.path_for("../../etc/passwd")
    upload = tmp_path / "a" / ".upload-x"
    upload.write_bytes(b"moved")
    sha2, size2 = store.put_file(upload, ".npz", move=True)
    assert not upload.exists() and store.path_for(sha2, ".npz").read_bytes() == b"moved" and size2 == 5


def test_models_datasets_and_artefacts(repo: Repository) -> None:
    sha = "ab" * 32
    repo.add_artefact(sha, 10, "application/octet-stream", ".safetensors")
    repo.add_artefact(sha, 10, "application/octet-stream", ".safetensors")  # idempotent
    assert repo.get_artefact(sha).suffix == ".safetensors"
    model = repo.create_model(
        name="net", kind="architecture", architecture="resnet20", kwargs={"width": 2}, artefact_sha256=sha
    )
    got = repo.get_model(model.id)
    assert (got.name, got.architecture, got.kwargs, got.artefact_sha256) == ("net", "resnet20", {"width": 2}, sha)
    assert got.created_at.tzinfo is not None
    data = repo.create_dataset(name="d", kind="builtin", builtin="digits", artefact_sha256=None, info={"n": 3})
    assert repo.get_dataset(data.id).info == {"n": 3}
    with pytest.raises(NotFound):
        repo.get_model("nope")
    with pytest.raises(NotFound):
        repo.get_dataset("nope")
    with pytest.raises(NotFound):
        repo.create_model(name="x", kind="pt2", architecture=None, kwargs={}, artefact_sha256="cd" * 32)
    assert [m.id for m in repo.list_models().items] == [model.id]
    assert repo.list_datasets().total == 1


# -- jobs --------------------------------------------------------------------------------------------------
def test_create_get_list_paginate(repo: Repository) -> None:
    jobs = [new_job(repo) for _ in range(5)]
    job = repo.get_job(jobs[0].id)
    assert job.state == "queued" and job.progress_total == 3 and job.attempts == 0 and job.spec["budget"] == 3
    assert job.created_at.tzinfo is not None and job.created_at <= datetime.now(UTC)
    assert states(repo, job.id) == [(None, "queued")]
    page = repo.list_jobs(limit=2)
    assert page.total == 5 and [j.id for j in page.items] == [jobs[4].id, jobs[3].id]  # newest first
    page = repo.list_jobs(offset=4, limit=2)
    assert [j.id for j in page.items] == [jobs[0].id] and page.offset == 4
    repo.request_cancel(jobs[1].id)
    assert [j.id for j in repo.list_jobs(state="cancelled").items] == [jobs[1].id]
    assert repo.list_jobs(state="queued").total == 4
    with pytest.raises(NotFound):
        repo.get_job("nope")
    with pytest.raises(NotFound):
        repo.create_job(model_id="nope", dataset_id="nope", spec={}, progress_total=None)


def test_idempotency_key(repo: Repository) -> None:
    job = new_job(repo, idempotency_key="k1", request_hash="h1")
    again, created = repo.create_job(
        model_id=job.model_id,
        dataset_id=job.dataset_id,
        spec={"other": 1},
        progress_total=3,
        idempotency_key="k1",
        request_hash="h1",
    )
    assert not created and again.id == job.id
    with pytest.raises(Conflict):
        repo.create_job(
            model_id=job.model_id,
            dataset_id=job.dataset_id,
            spec={},
            progress_total=3,
            idempotency_key="k1",
            request_hash="h2",
        )
    assert repo.list_jobs().total == 1
    assert states(repo, job.id) == [(None, "queued")]


def _drive_to(repo: Repository, job_id: str, state: JobState) -> None:
    if state is JobState.queued:
        return
    repo.transition(job_id, JobState.running, worker_id="w", lease_seconds=60)
    if state is not JobState.running:
        repo.transition(job_id, state, worker_id="w", error="boom" if state is JobState.failed else None)


@pytest.mark.parametrize("frm", list(JobState), ids=lambda s: s.value)
def test_every_transition(repo: Repository, frm: JobState) -> None:
    for to in JobState:
        job = new_job(repo)
        _drive_to(repo, job.id, frm)
        before = repo.events_after(job.id)
        if to in ALLOWED[frm]:
            row = repo.transition(job.id, to, worker_id="w", lease_seconds=60, error="x", note="n")
            assert row.state == to.value == repo.get_job(job.id).state
            event = repo.events_after(job.id, before[-1].id)
            assert [(e.kind, e.from_state, e.to_state) for e in event] == [("state", frm.value, to.value)]
            assert event[0].data["note"] == "n" and event[0].data["worker_id"] == "w"
            if to is JobState.running:
                assert (
                    row.worker_id == "w" and row.lease_expires_at is not None and row.lease_expires_at > row.updated_at
                )
            else:
                assert row.lease_expires_at is None
            if to in (JobState.succeeded, JobState.failed, JobState.cancelled):
                assert row.finished_at is not None and row.error == "x"
        else:
            with pytest.raises(Conflict):
                repo.transition(job.id, to, worker_id="w", lease_seconds=60)
            assert repo.get_job(job.id).state == frm.value
            assert [e.id for e in repo.events_after(job.id)] == [e.id for e in before]


def test_cancel_semantics(repo: Repository) -> None:
    queued = new_job(repo)
    row = repo.request_cancel(queued.id)
    assert row.state == "cancelled" and row.cancel_requested
    assert states(repo, queued.id)[-1] == ("queued", "cancelled")
    assert repo.request_cancel(queued.id).state == "cancelled"  # again: unchanged
    assert len(repo.events_after(queued.id)) == 2

    running = new_job(repo)
    assert repo.claim_job("w1", 60) is not None
    row = repo.request_cancel(running.id)
    assert row.state == "running" and row.cancel_requested
    assert repo.renew_lease(running.id, "w1", 60).cancel_requested  # what the worker's heartbeat reads
    repo.request_cancel(running.id)
    logs = [e for e in repo.events_after(running.id) if e.kind == "log"]
    assert len(logs) == 1 and logs[0].data["message"] == "cancel requested"
    repo.transition(running.id, JobState.cancelled, worker_id="w1")
    assert repo.get_job(running.id).state == "cancelled"

    for end in (JobState.succeeded, JobState.failed):
        job = new_job(repo)
        _drive_to(repo, job.id, end)
        with pytest.raises(Conflict):
            repo.request_cancel(job.id)
    with pytest.raises(NotFound):
        repo.request_cancel("nope")


def test_claim_picks_the_oldest_queued(repo: Repository) -> None:
    assert repo.claim_job("w", 30) is None
    jobs = [new_job(repo) for _ in range(3)]
    repo.request_cancel(jobs[0].id)
    first = repo.claim_job("w1", 30)
    second = repo.claim_job("w2", 30)
    assert first is not None and second is not None
    assert (first.id, second.id) == (jobs[1].id, jobs[2].id)
    assert first.state == "running" and first.worker_id == "w1" and first.attempts == 1
    assert first.started_at is not None and first.lease_expires_at is not None
    assert first.lease_expires_at > datetime.now(UTC)
    assert repo.claim_job("w3", 30) is None  # the others are running with live leases, or cancelled
    assert states(repo, first.id) == [(None, "queued"), ("queued", "running")]


def test_expired_lease_is_reclaimed_and_the_old_worker_is_fenced(repo: Repository) -> None:
    job = new_job(repo)
    assert repo.claim_job("dead", 0.05) is not None
    repo.record_evaluation(job.id, "dead", record(0), done=0, best=None, front=[("search", 0)])
    time.sleep(0.1)
    claimed = repo.claim_job("alive", 30)
    assert claimed is not None and claimed.id == job.id
    assert claimed.attempts == 2 and claimed.worker_id == "alive"
    assert states(repo, job.id)[1:] == [("queued", "running"), ("running", "queued"), ("queued", "running")]
    reclaim = [e for e in repo.events_after(job.id) if e.kind == "state"][2]
    assert reclaim.data["reason"] == "lease expired" and reclaim.data["previous_worker"] == "dead"
    with pytest.raises(LeaseLost):
        repo.renew_lease(job.id, "dead", 30)
    with pytest.raises(LeaseLost):
        repo.record_evaluation(job.id, "dead", record(1), done=1, best=None, front=[])
    with pytest.raises(LeaseLost):
        repo.release_job(job.id, "dead")
    with pytest.raises(LeaseLost):
        repo.transition(job.id, JobState.succeeded, worker_id="dead")
    before = repo.get_job(job.id).lease_expires_at
    assert before is not None
    renewed = repo.renew_lease(job.id, "alive", 60)
    assert renewed.lease_expires_at is not None and renewed.lease_expires_at > before
    assert [r["index"] for r in repo.all_records(job.id)] == [0]  # the fenced write left nothing
    repo.transition(job.id, JobState.succeeded, worker_id="alive")
    with pytest.raises(LeaseLost):
        repo.renew_lease(job.id, "alive", 30)  # the job left 'running'


def test_reclaiming_a_cancelled_job_cancels_it(repo: Repository) -> None:
    job = new_job(repo)
    assert repo.claim_job("dead", 0.05) is not None
    repo.request_cancel(job.id)
    time.sleep(0.1)
    assert repo.claim_job("other", 30) is None
    assert repo.get_job(job.id).state == "cancelled"


def test_release_puts_the_job_back(repo: Repository) -> None:
    job = new_job(repo)
    assert repo.claim_job("w1", 30) is not None
    with pytest.raises(LeaseLost):
        repo.release_job(job.id, "w2")
    repo.release_job(job.id, "w1")
    row = repo.get_job(job.id)
    assert row.state == "queued" and row.worker_id is None and row.lease_expires_at is None
    again = repo.claim_job("w2", 30)
    assert again is not None and again.id == job.id and again.attempts == 2


def test_record_evaluation_is_idempotent_and_keeps_progress_and_front(repo: Repository) -> None:
    job = new_job(repo)
    assert repo.claim_job("w", 60) is not None
    best0 = {"index": 0, "stage": "search"}
    repo.record_evaluation(job.id, "w", record(0), done=0, best=best0, front=[("search", 0)])
    repo.record_evaluation(
        job.id, "w", record(1, quality=0.8, ratio=0.5), done=1, best=best0, front=[("search", 0), ("search", 1)]
    )
    best2 = {"index": 2, "stage": "search"}
    repo.record_evaluation(
        job.id,
        "w",
        record(2, quality=0.9, ratio=0.6, size=900),
        done=2,
        best=best2,
        front=[("search", 2), ("search", 1)],
    )
    row = repo.get_job(job.id)
    assert (row.progress_done, row.front_size, row.best) == (2, 2, best2)
    assert [(e.stage, e.index) for e in repo.front(job.id)] == [("search", 1), ("search", 2)]  # fastest first
    stored = {e.index: e for e in repo.evaluations(job.id).items}
    assert stored[2].quality == 0.9 and stored[2].latency_ratio == 0.6 and stored[2].latency_ms == 1.2
    assert (
        stored[2].size_bytes == 900
        and stored[2].plan["ratios"] == {"g": 0.2}
        and stored[2].record == record(2, quality=0.9, ratio=0.6, size=900)
    )
    events = repo.events_after(job.id)

    # the same (stage, index) again, e.g. a resumed worker replaying: nothing changes
    repo.record_evaluation(job.id, "w", record(1, quality=0.1), done=1, best=None, front=[("search", 0)])
    again = {e.index: e for e in repo.evaluations(job.id).items}
    assert again[1].id == stored[1].id and again[1].quality == 0.8 and again[1].created_at == stored[1].created_at
    assert repo.get_job(job.id).best == best2 and repo.get_job(job.id).front_size == 2
    assert len(repo.events_after(job.id)) == len(events)

    # a fine-tuned point keeps its search point's index, in its own stage
    repo.record_evaluation(
        job.id, "w", record(1, "finetuned", quality=0.95, ratio=0.5), done=2, best=None, front=[("finetuned", 1)]
    )
    page = repo.evaluations(job.id)
    assert [(e.stage, e.index) for e in page.items] == [("search", 0), ("search", 1), ("search", 2), ("finetuned", 1)]
    assert [r["stage"] for r in repo.all_records(job.id)] == ["search"] * 3 + ["finetuned"]
    assert [(e.stage, e.index) for e in repo.front(job.id)] == [("finetuned", 1)]
    assert repo.get_job(job.id).progress_done == 2
    assert repo.evaluations(job.id, stage="finetuned").total == 1
    page = repo.evaluations(job.id, offset=1, limit=2)
    assert page.total == 4 and [e.index for e in page.items] == [1, 2]
    last = repo.events_after(job.id)[-1]
    assert last.kind == "evaluation" and last.data["evaluation"]["stage"] == "finetuned"
    assert last.data["done"] == 2 and last.data["total"] == 3 and last.data["front_size"] == 1
    with pytest.raises(NotFound):
        repo.evaluations("nope")


def test_events_after_ordering(repo: Repository) -> None:
    job = new_job(repo)
    other = new_job(repo)
    assert repo.claim_job("w", 60) is not None
    for i in range(4):
        repo.record_evaluation(job.id, "w", record(i), done=i, best=None, front=[])
    repo.add_event(job.id, "log", message="hello")
    repo.transition(job.id, JobState.succeeded, worker_id="w")
    events = repo.events_after(job.id)
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.kind for e in events] == ["state", "state"] + ["evaluation"] * 4 + ["log", "state"]
    assert all(e.job_id == job.id for e in events)
    assert [e.id for e in repo.events_after(job.id, ids[3])] == ids[4:]
    assert [e.id for e in repo.events_after(job.id, ids[3], limit=2)] == ids[4:6]
    assert repo.events_after(job.id, ids[-1]) == []
    assert [e.to_state for e in repo.events_after(other.id)] == ["queued"]


def test_last_event_of_a_kind(repo: Repository) -> None:
    job, other = new_job(repo), new_job(repo)
    assert repo.last_event(job.id, "probes") is None
    repo.add_event(job.id, "probes", groups=["a"], seconds=1.0)
    repo.add_event(job.id, "log", message="between")
    repo.add_event(job.id, "probes", groups=["a", "b"], seconds=2.0)
    latest = repo.last_event(job.id, "probes")
    assert latest is not None and latest.data == {"groups": ["a", "b"], "seconds": 2.0} and latest.kind == "probes"
    assert repo.last_event(other.id, "probes") is None  # another job's events are not this job's
    state = repo.last_event(job.id, "state")
    assert state is not None and state.to_state == "queued"
    with pytest.raises(NotFound):
        repo.last_event("no-such-job", "probes")


def test_exports(repo: Repository) -> None:
    job = new_job(repo)
    assert repo.claim_job("w", 60) is not None
    sha1, sha2 = "11" * 32, "22" * 32
    repo.add_artefact(sha1, 5, "application/onnx", ".onnx")
    repo.add_artefact(sha2, 6, "application/onnx", ".onnx")
    row = repo.add_export(job_id=job.id, index=1, stage="search", format="onnx", artefact_sha256=sha1, meta={"a": 1})
    assert row.id is not None
    repo.add_export(job_id=job.id, index=1, stage="search", format="safetensors", artefact_sha256=sha1, meta={})
    again = repo.add_export(
        job_id=job.id, index=1, stage="search", format="onnx", artefact_sha256=sha2, meta={"a": 2}, worker_id="w"
    )
    assert again.id == row.id
    got = repo.get_export(job.id, index=1, stage="search", format="onnx")
    assert (got.artefact_sha256, got.meta) == (sha2, {"a": 2})
    assert [(e.index, e.format) for e in repo.exports(job.id)] == [(1, "onnx"), (1, "safetensors")]
    with pytest.raises(NotFound):
        repo.get_export(job.id, index=2, stage="search", format="onnx")
    with pytest.raises(LeaseLost):
        repo.add_export(
            job_id=job.id, index=2, stage="search", format="onnx", artefact_sha256=sha1, meta={}, worker_id="x"
        )
    with pytest.raises(NotFound):
        repo.add_export(job_id=job.id, index=2, stage="search", format="onnx", artefact_sha256="33" * 32, meta={})


# -- several processes claiming at once ---------------------------------------------------------------------
CLAIMER = """
import sys, time
from pathlib import Path
from service.db.engine import make_engine
from service.db.models import JobState
from service.db.repository import Repository

url, worker, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
repo = Repository(make_engine(url))
while not go.exists():
    time.sleep(0.005)
done = 0
while True:
    job = repo.claim_job(worker, 60)
    if job is None:
        break
    time.sleep(0.002)  # "work": widens the window for a double claim
    repo.transition(job.id, JobState.succeeded, worker_id=worker)
    done += 1
print(done)
"""


def _claim_race(url: str, workers: int, jobs: int, tmp_path: Path) -> None:
    upgrade(url)
    engine = make_engine(url)
    repo = Repository(engine)
    try:
        ids = [new_job(repo).id for _ in range(jobs)]
        go = tmp_path / "go"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLAIMER, url, f"w{i}", str(go)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(workers)
        ]
        time.sleep(0.5)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
        assert sum(int(out) for out, _ in outs) == jobs
        claims: Counter[str] = Counter()
        for job_id in ids:
            assert repo.get_job(job_id).state == "succeeded"
            claims[job_id] = sum(1 for e in repo.events_after(job_id) if e.to_state == "running")
        assert set(claims.values()) == {1}, claims  # each job claimed exactly once
        assert all(repo.get_job(i).attempts == 1 for i in ids)
    finally:
        engine.dispose()


def test_concurrent_claims_postgres(pg_url: str, tmp_path: Path) -> None:
    _claim_race(pg_url, workers=4, jobs=20, tmp_path=tmp_path)


def test_concurrent_claims_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    _claim_race(sqlite_url, workers=2, jobs=20, tmp_path=tmp_path)
