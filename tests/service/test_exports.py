"""Issue 13.7: exports lazy or queued, with progress; the best point first; a cancelled job's points on request.

* The queue itself (``export_requests``, on SQLite and PostgreSQL): a user's request before background ones,
  only finished jobs' requests are claimed, concurrent claimers never share one (SKIP LOCKED / BEGIN
  IMMEDIATE), an expired lease is claimed again and fences the old worker, transient errors are retried up to
  ``MAX_EXPORT_ATTEMPTS``, and every outcome writes an ``export`` event with the job's progress.
* The worker (real ResNet-20 / digits searches): the best file exists when the job succeeds, the rest of the
  front follows from the queue (``eager``); a fine-tuned point's weights are stored once and its later exports
  load them (no training again).
* The API over a real uvicorn (``lazy``): 409 while the job runs, 202 + Location then the file, 200 when it
  exists, 404/422 for bad ids and formats, the ``export`` events in the event stream, ``Client.download``
  waiting for a queued export, ``autoprune download --no-wait`` exiting 3, and a cancelled job's best point.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from service.api.app import create_app
from service.artefacts import ArtefactStore
from service.client import Client, parse_sse
from service.db.engine import make_engine, upgrade
from service.db.models import EvaluationRow, ExportRequest, JobState
from service.db.repository import MAX_EXPORT_ATTEMPTS, LeaseLost, Repository
from service.settings import InvalidSettings, Settings, load_settings
from service.worker import Worker
from tests.service.conftest import serve_in_thread, submit_job
from tests.service.test_repository import new_job

ROOT = Path(__file__).resolve().parents[2]
KEY = "exports-key-0123456789"
SPEC = {"strategy": "random", "budget": 3, "val_samples": 100, "bn_batches": 2, "max_ratio": 0.5}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def finished_job(repo: Repository, state: JobState = JobState.succeeded) -> str:
    job = new_job(repo)
    assert repo.claim_job("w", 60) is not None
    repo.transition(job.id, state, worker_id="w")
    return job.id


def export_events(repo: Repository, job_id: str) -> list[dict[str, Any]]:
    return [e.data for e in repo.events_after(job_id) if e.kind == "export"]


# -- the queue ------------------------------------------------------------------------------------------------
def test_user_requests_go_first_and_a_running_jobs_background_exports_wait(repo: Repository) -> None:
    running = new_job(repo)
    assert repo.claim_job("w", 60) is not None
    assert repo.enqueue_exports(running.id, [("search", 1)], ["onnx"]) == 1
    assert repo.claim_export("x", 60) is None  # the job still runs: its background exports wait
    asked, _ = repo.request_export(running.id, stage="search", index=4, format="onnx")
    taken = repo.claim_export("x", 60)  # a user's request of the running job does not
    assert taken is not None and taken.id == asked.id and taken.state == "running"
    assert repo.claim_export("x", 60) is None

    job_id = finished_job(repo)
    assert repo.enqueue_exports(job_id, [("search", 1), ("search", 2)], ["onnx"]) == 2
    assert repo.enqueue_exports(job_id, [("search", 1), ("search", 2)], ["onnx"]) == 0  # idempotent
    user, ready = repo.request_export(job_id, stage="search", index=3, format="pt2")
    assert not ready and user.state == "queued" and user.origin == "user"
    # a user asking for a queued background export raises it to the user's priority
    raised, _ = repo.request_export(job_id, stage="search", index=2, format="onnx")
    assert raised.origin == "user"

    order = []
    while (req := repo.claim_export("x", 60, max_priority=0)) is not None:  # user requests only
        order.append((req.origin, req.index, req.format))
    assert order == [("user", 2, "onnx"), ("user", 3, "pt2")]  # the raised one is older
    req = repo.claim_export("x", 60)
    assert req is not None and (req.origin, req.index, req.format) == ("background", 1, "onnx")
    assert req.state == "running" and req.attempts == 1 and req.worker_id == "x"
    assert repo.claim_export("x", 60) is None
    assert repo.pending_exports(job_id) == 3  # all running now


def test_finish_stores_the_export_and_writes_an_event(repo: Repository) -> None:
    job_id = finished_job(repo, JobState.cancelled)  # a cancelled job's points can be exported
    repo.enqueue_exports(job_id, [("search", 1), ("search", 2)], ["onnx"])
    sha = "ab" * 32
    repo.add_artefact(sha, 5, "application/onnx", ".onnx")
    first = repo.claim_export("x", 60)
    assert first is not None
    done = repo.finish_export(first.id, "x", seconds=1.5, artefact_sha256=sha, meta={"best": False})
    assert done.state == "done" and done.seconds == 1.5 and done.finished_at is not None
    assert repo.get_export(job_id, index=first.index, stage="search", format="onnx").artefact_sha256 == sha
    second = repo.claim_export("x", 60)
    assert second is not None
    failed = repo.finish_export(second.id, "x", seconds=0.5, error="ExportError: no")  # not retried
    assert failed.state == "failed" and failed.error == "ExportError: no"
    events = export_events(repo, job_id)
    assert [(e["point"], e["ok"], e["done"], e["total"], e["phase"]) for e in events] == [
        ({"stage": "search", "index": first.index}, True, 1, 2, "background"),
        ({"stage": "search", "index": second.index}, False, 2, 2, "background"),
    ]
    assert events[0]["format"] == "onnx" and events[0]["seconds"] == 1.5 and events[1]["error"] == "ExportError: no"
    # asking again: the stored one is ready (200), the failed one is queued again with fresh attempts
    assert repo.request_export(job_id, stage="search", index=first.index, format="onnx")[1] is True
    again, ready = repo.request_export(job_id, stage="search", index=second.index, format="onnx")
    assert not ready and again.state == "queued" and again.attempts == 0 and again.error is None


def test_lease_expiry_retries_and_fencing(repo: Repository) -> None:
    job_id = finished_job(repo)
    repo.enqueue_exports(job_id, [("search", 1)], ["onnx"])
    first = repo.claim_export("dead", 0.001)  # its worker dies: the lease runs out
    assert first is not None
    time.sleep(0.05)
    again = repo.claim_export("alive", 60)
    assert again is not None and again.id == first.id and again.attempts == 2 and again.worker_id == "alive"
    with pytest.raises(LeaseLost):
        repo.finish_export(first.id, "dead", seconds=1.0, error="late")
    with pytest.raises(LeaseLost):
        repo.renew_export_lease(first.id, "dead", 60)
    repo.renew_export_lease(again.id, "alive", 60)
    # a transient error: queued again while claims are left, then failed
    assert repo.finish_export(again.id, "alive", seconds=0.1, error="OSError: disk", retry=True).state == "queued"
    last = repo.claim_export("alive", 60)
    assert last is not None and last.attempts == MAX_EXPORT_ATTEMPTS == 3
    assert repo.finish_export(last.id, "alive", seconds=0.1, error="OSError: disk", retry=True).state == "failed"
    # a request whose workers keep dying is failed by the next claim
    repo.enqueue_exports(job_id, [("search", 2)], ["onnx"])
    for _ in range(MAX_EXPORT_ATTEMPTS):
        assert repo.claim_export("dying", 0.001) is not None
        time.sleep(0.05)
    assert repo.claim_export("next", 60) is None
    gave_up = next(r for r in repo.export_requests(job_id) if r.index == 2)
    assert gave_up.state == "failed" and "gave up after 3 attempts" in (gave_up.error or "")
    assert export_events(repo, job_id)[-1]["ok"] is False


def test_concurrent_claimers_never_share_a_request(db_url: str) -> None:
    upgrade(db_url)
    engines = [make_engine(db_url) for _ in range(4)]
    try:
        repo = Repository(engines[0])
        job_id = finished_job(repo)
        assert repo.enqueue_exports(job_id, [("search", i) for i in range(1, 21)], ["onnx", "pt2"]) == 40
        claimed: list[list[str]] = [[] for _ in engines]
        barrier = threading.Barrier(len(engines))

        def claim(k: int) -> None:
            r = Repository(engines[k])
            barrier.wait()
            while (req := r.claim_export(f"w{k}", 60)) is not None:
                claimed[k].append(req.id)

        threads = [threading.Thread(target=claim, args=(k,)) for k in range(len(engines))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        ids = [i for c in claimed for i in c]
        assert len(ids) == len(set(ids)) == 40
        assert sum(1 for c in claimed if c) >= 2  # they really raced
    finally:
        for e in engines:
            e.dispose()


# -- the worker -----------------------------------------------------------------------------------------------
def _submit(repo: Repository, **spec: Any) -> str:
    return submit_job(repo, {**SPEC, **spec})


@pytest.mark.slow
def test_the_best_file_is_ready_when_the_job_succeeds_and_the_front_follows(db_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, lease_seconds=10, heartbeat_seconds=1)
    upgrade(db_url)
    worker = Worker(settings, "w1")
    repo = worker.repo
    try:
        job_id = _submit(repo, export_formats=["onnx"], budget=4, max_ratio=0.6)
        assert worker._run_one() == "job"
        job = repo.get_job(job_id)
        assert job.state == "succeeded" and job.best is not None
        best = (job.best["stage"], job.best["index"])
        # at success: the best point's file, and a queue for the rest of the front
        assert [(x.stage, x.index, x.format) for x in repo.exports(job_id)] == [(*best, "onnx")]
        front = {(e.stage, e.index) for e in repo.front(job_id)}
        requests = {(r.stage, r.index): r for r in repo.export_requests(job_id)}
        assert set(requests) == front | {best}
        assert requests[best].state == "done" and requests[best].origin == "job"
        rest = {k for k, r in requests.items() if r.state == "queued"}
        assert rest == front - {best} and all(requests[k].origin == "background" for k in rest)
        succeeded_at = next(e.id for e in repo.events_after(job_id) if e.to_state == "succeeded")
        first = next(e for e in repo.events_after(job_id) if e.kind == "export")
        assert first.id < succeeded_at and first.data["phase"] == "job" and first.data["ok"] is True
        assert first.data["point"] == {"stage": best[0], "index": best[1]}

        # the worker then makes the rest, one request at a time, with progress events, before a job queued
        # meanwhile, and with the job's own objective (its model and data are not built again)
        queued_next = _submit(repo, export_formats=["onnx"])
        for _ in rest:
            assert worker._run_one() == "export"
        assert repo.get_job(queued_next).state == "queued"
        assert worker.export_objective_builds == 0
        repo.request_cancel(queued_next)
        assert worker._run_one() is None
        assert {(x.stage, x.index) for x in repo.exports(job_id)} == front | {best}
        assert repo.pending_exports(job_id) == 0
        later = [e for e in export_events(repo, job_id) if e["phase"] == "background"]
        assert len(later) == len(rest) and all(e["ok"] and e["seconds"] > 0 for e in later)
        assert [e["done"] for e in later] == list(range(2, 2 + len(rest)))
        assert all(e["total"] == len(requests) for e in later)
        store = ArtefactStore(settings.artefacts)
        for x in repo.exports(job_id):
            assert store.exists(x.artefact_sha256, ".onnx") and x.meta["best"] == ((x.stage, x.index) == best)
    finally:
        worker.close()


@pytest.mark.slow
def test_a_cancel_during_the_best_points_export_stops_before_the_next_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user cancels while the worker exports the best point after the search (the cancel is asked while
    the first format is made): that file is finished and kept, downloadable; the next formats are not made; the
    job ends ``cancelled``, not ``succeeded``, and queues no background exports; the files of the point can
    still be requested afterwards, like any cancelled job's."""
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=10, heartbeat_seconds=60)
    upgrade(settings.db_url)
    worker = Worker(settings, "w1")
    repo = worker.repo
    formats: list[str] = []
    real = Worker._export_point

    def export_point(self: Worker, job_id: str, *args: Any) -> tuple[str, dict[str, Any]]:
        formats.append(args[2])
        if len(formats) == 1:
            repo.request_cancel(job_id)  # the user's cancel arrives while this format is being made
        return real(self, job_id, *args)

    monkeypatch.setattr(Worker, "_export_point", export_point)
    try:
        job_id = _submit(repo, budget=3, export_formats=["onnx", "safetensors", "pt2"])
        assert worker._run_one() == "job"
        job = repo.get_job(job_id)
        assert job.state == "cancelled" and formats == ["onnx"]
        assert len(repo.evaluations(job_id, limit=100).items) == 4  # the search's records are all kept
        (kept,) = repo.exports(job_id)
        assert kept.format == "onnx" and ArtefactStore(settings.artefacts).exists(kept.artefact_sha256, ".onnx")
        assert [(r.format, r.state) for r in repo.export_requests(job_id)] == [("onnx", "done")]
        # the point's other formats can still be requested, as for any cancelled job
        req, ready = repo.request_export(job_id, stage=kept.stage, index=kept.index, format="pt2")
        assert not ready
        assert worker._run_one() == "export" and repo.get_export_request(job_id, req.id).state == "done"
    finally:
        worker.close()


@pytest.mark.slow
def test_finetuned_weights_are_stored_once_and_exports_reuse_them(tmp_path: Path) -> None:
    import safetensors.torch

    settings = Settings(data_dir=tmp_path / "data", export_front="lazy", lease_seconds=10, heartbeat_seconds=1)
    upgrade(settings.db_url)
    worker = Worker(settings, "w1")
    repo = worker.repo
    try:
        job_id = _submit(repo, export_formats=["onnx"], finetune_top=1, finetune_epochs=1)
        assert worker._run_one() == "job"
        assert repo.get_job(job_id).state == "succeeded"
        tuned = repo.evaluations(job_id, stage="finetuned").items
        assert len(tuned) == 1 and tuned[0].weights_sha256 is not None
        weights = ArtefactStore(settings.artefacts).path_for(tuned[0].weights_sha256, ".safetensors")
        assert weights.is_file()
        assert repo.export_requests(job_id) and all(r.origin == "job" for r in repo.export_requests(job_id))  # lazy
        finetune_events = sum(1 for e in repo.events_after(job_id) if e.kind == "finetune")
    finally:
        worker.close()

    # a fresh worker (another process, say) exports the fine-tuned point from its stored weights: no training
    repo2 = Repository(make_engine(settings.db_url))
    req, ready = repo2.request_export(job_id, stage="finetuned", index=tuned[0].index, format="safetensors")
    assert not ready
    fresh = Worker(settings, "w2")
    try:
        assert fresh._run_one() == "export"
        repo2.request_export(job_id, stage="search", index=1, format="onnx")
        assert fresh._run_one() == "export"
        assert fresh.export_objective_builds == 1  # built once for both requests of the job
    finally:
        fresh.close()
    assert repo2.get_export_request(job_id, req.id).state == "done"
    assert sum(1 for e in repo2.events_after(job_id) if e.kind == "finetune") == finetune_events
    export = repo2.get_export(job_id, index=tuned[0].index, stage="finetuned", format="safetensors")
    archive = ArtefactStore(settings.artefacts).path_for(export.artefact_sha256, ".zip")
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as zf:
        exported = safetensors.torch.load(zf.read("model.safetensors"))
    stored = safetensors.torch.load_file(str(weights))
    assert exported.keys() == stored.keys()
    assert all(bool((exported[k] == stored[k]).all()) for k in stored)
    repo2.engine.dispose()


# -- the API over real HTTP -----------------------------------------------------------------------------------
def _problem(r: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    if slug is not None:
        assert body["type"].endswith(f"/{slug}"), body
    return body


@pytest.mark.slow
def test_export_requests_over_http(db_url: str, tmp_path: Path, wait_for: Callable[..., None]) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db_url, api_keys=[KEY], export_front="lazy", lease_seconds=10
    )
    upgrade(db_url)
    app = create_app(settings, sse_poll_seconds=0.05)
    worker = Worker(settings, "w1")
    repo = worker.repo
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    try:
        with serve_in_thread(app) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as api:  # fmt: skip
            model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
            data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
            job_id = api.post(
                "/v1/jobs", json={"model_id": model, "dataset_id": data, **SPEC, "export_formats": ["onnx"]}
            ).json()["id"]
            exports = f"/v1/jobs/{job_id}/exports"
            # nothing recorded yet: no point to export, queued or running
            _problem(api.post(exports, json={"point": "best", "format": "onnx"}), 404, "no-point")
            repo.claim_job("holder", 60)
            _problem(api.post(exports, json={"point": 1, "format": "onnx"}), 404, "no-point")
            _problem(api.get(f"/v1/jobs/{job_id}/models/best"), 409, "job-not-finished")
            repo.release_job(job_id, "holder")

            assert worker._run_one() == "job"
            # the best file is there the moment the job has succeeded
            assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
            best = api.get(f"/v1/jobs/{job_id}/models/best", params={"format": "onnx"})
            assert best.status_code == 200 and len(best.content) > 1000
            listed = api.get(exports).json()
            assert listed["total"] == listed["done"] == 1 and listed["pending"] == 0  # lazy: nothing queued
            assert listed["items"][0]["origin"] == "job" and listed["items"][0]["download_url"]

            # another evaluation, in another format: 404 until requested, 202 + Location, then the file
            best_index = api.get(f"/v1/jobs/{job_id}").json()["best"]["index"]
            other = next(i for i in range(4) if i != best_index)
            _problem(api.get(f"/v1/jobs/{job_id}/models/{other}", params={"format": "pt2"}), 404, "no-export")
            r = api.post(exports, json={"point": other, "format": "pt2"})
            assert r.status_code == 202, r.text
            req = r.json()
            assert r.headers["location"] == req["url"] == f"{exports}/{req['id']}"
            assert req["state"] == "queued" and req["origin"] == "user" and req["download_url"] is None
            assert api.post(exports, json={"point": other, "format": "pt2"}).status_code == 202  # same request
            assert api.get(exports).json()["pending"] == 1

            assert worker._run_one() == "export"
            status = api.get(r.headers["location"]).json()
            assert status["state"] == "done" and status["attempts"] == 1 and status["seconds"] > 0
            file = api.get(status["download_url"])
            assert file.status_code == 200 and file.content[:2] == b"PK"  # a .pt2 is a zip
            again = api.post(exports, json={"point": other, "format": "pt2"})
            assert again.status_code == 200 and again.json()["id"] == req["id"]

            # bad ids and bodies
            _problem(api.post("/v1/jobs/nope/exports", json={"point": "best", "format": "onnx"}), 404)
            _problem(api.post(exports, json={"point": "best", "format": "tflite"}), 422)
            _problem(api.post(exports, json={"point": -1, "format": "onnx"}), 422)
            _problem(api.post(exports, json={"point": "1", "format": "onnx"}), 422)
            _problem(api.post(exports, json={"point": 999, "format": "onnx"}), 404, "no-point")
            _problem(api.post(exports, json={"point": 1, "stage": "finetuned", "format": "onnx"}), 404, "no-point")
            _problem(api.get(f"{exports}/0123456789abcdef"), 404)
            _problem(api.get("/v1/jobs/nope/exports"), 404)

            # the export events are in the job's event stream (past the terminal state with follow_exports)
            with api.stream("GET", f"/v1/jobs/{job_id}/events", params={"follow_exports": "true"}) as stream:
                events = [e for e in parse_sse(stream.iter_lines()) if e.event == "export"]
            assert [(e.data["data"]["phase"], e.data["data"]["ok"]) for e in events] == [("job", True), ("user", True)]
            last = events[-1].data["data"]
            assert last["point"] == {"stage": "search", "index": other} and last["format"] == "pt2"
            assert (last["done"], last["total"]) == (2, 2) and last["seconds"] > 0

            # a point fine-tuned before weights were kept cannot be rebuilt without training: 409
            tuned_job = _finetuned_job_without_weights(repo, worker, job_id)
            _problem(
                api.post(f"/v1/jobs/{tuned_job}/exports", json={"point": 1, "stage": "finetuned", "format": "onnx"}),
                409,
                "point-not-rebuildable",
            )

            # Client.download requests a missing point and waits for a worker; --no-wait exits 3 at once
            with Client(url, KEY) as client:
                third = next(i for i in range(4) if i not in (best_index, other))
                cli = [sys.executable, "-m", "service.cli", "download", job_id, "--url", url, "--key", KEY]
                no_wait = subprocess.run(
                    [*cli, "--point", str(third), "--format", "pt2", "--no-wait", "-o", str(tmp_path / "x.pt2")],
                    capture_output=True, text=True, cwd=ROOT, timeout=120,
                )  # fmt: skip
                assert no_wait.returncode == 3, no_wait.stderr
                assert "queued" in no_wait.stderr and not (tmp_path / "x.pt2").exists()
                runner.start()
                path = client.download(job_id, tmp_path / "third.pt2", point=third, format="pt2", timeout=300)
                assert path.stat().st_size > 1000
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(60)
        worker.close()


def _finetuned_job_without_weights(repo: Repository, worker: Worker, source_job: str) -> str:
    """A finished job with a fine-tuned evaluation 1 that has no stored weights (as before migration 0003)."""
    job = new_job(repo)
    assert repo.claim_job("old", 60) is not None
    rec = repo.evaluation(source_job, stage="search", index=1).record
    repo.record_evaluation(job.id, "old", {**rec, "stage": "finetuned"}, done=1, best=None, front=[])
    repo.transition(job.id, JobState.succeeded, worker_id="old")
    with worker.engine.begin() as conn:
        conn.execute(update(EvaluationRow).where(EvaluationRow.job_id == job.id).values(weights_sha256=None))
    return job.id


@pytest.mark.slow
def test_a_cancelled_jobs_best_point_is_exported_on_request(tmp_path: Path, wait_for: Callable[..., None]) -> None:
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=10, heartbeat_seconds=0.5, poll_seconds=0.2)
    upgrade(settings.db_url)
    worker = Worker(settings, "w1")
    repo = worker.repo
    try:
        job_id = _submit(repo, budget=500, export_formats=["onnx"])
        thread = threading.Thread(target=worker.run_once)
        thread.start()
        wait_for(lambda: repo.get_job(job_id).progress_done >= 2, 180, "two evaluations", interval=0.05)
        repo.request_cancel(job_id)
        thread.join(120)
        job = repo.get_job(job_id)
        assert job.state == "cancelled" and repo.exports(job_id) == [] and job.best is not None
        req, ready = repo.request_export(job_id, stage=job.best["stage"], index=job.best["index"], format="onnx")
        assert not ready
        assert worker._run_one() == "export"
        assert repo.get_export_request(job_id, req.id).state == "done"
        export = repo.get_export(job_id, index=job.best["index"], stage=job.best["stage"], format="onnx")
        assert export.meta["best"] is True
    finally:
        worker.close()


@contextlib.contextmanager
def _finished_job_and_a_worker(tmp_path: Path) -> Iterator[tuple[Any, Worker, str, Callable[[], None]]]:
    """A lazily exporting service (app), its only worker, a job it has finished (A), and ``start()``, which sets
    the worker polling in a thread (stopped and closed after the block)."""
    settings = Settings(
        data_dir=tmp_path / "data", api_keys=[KEY], export_front="lazy", lease_seconds=10, poll_seconds=0.1
    )
    upgrade(settings.db_url)
    worker = Worker(settings, "w1")
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    try:
        done_job = _submit(worker.repo, export_formats=["onnx"])
        assert worker._run_one() == "job"
        yield create_app(settings, sse_poll_seconds=0.05), worker, done_job, runner.start
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(60)
        worker.close()


@pytest.mark.slow
def test_a_request_is_made_between_evaluations_of_another_running_job(
    tmp_path: Path, wait_for: Callable[..., None]
) -> None:
    """The only worker runs job B; a user's request of finished job A is made before B ends, between two of B's
    evaluations (none of B's is recorded while the export runs: it never overlaps a candidate's timing)."""
    with _finished_job_and_a_worker(tmp_path) as (app, worker, done_job, start):
        repo = worker.repo
        busy = _submit(repo, budget=500, export_formats=["onnx"])
        start()
        wait_for(lambda: repo.get_job(busy).progress_done >= 1, 180, "the running job's first evaluation")
        with serve_in_thread(app) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as api:  # fmt: skip
            best = repo.get_job(done_job).best
            assert best is not None
            other = next(i for i in range(1, 4) if i != best["index"])
            r = api.post(f"/v1/jobs/{done_job}/exports", json={"point": other, "format": "pt2"})
            assert r.status_code == 202, r.text
            location = r.headers["location"]
            wait_for(lambda: api.get(location).json()["state"] in ("done", "failed"), 150, "the request")
            status = api.get(location).json()
            assert status["state"] == "done", status
            job = api.get(f"/v1/jobs/{busy}").json()
            assert job["state"] == "running" and job["progress"]["done"] < 500
        made = repo.get_export_request(done_job, status["id"])
        assert made.started_at is not None and made.finished_at is not None
        recorded = [e.created_at for e in repo.evaluations(busy, limit=1000).items]
        assert not [t for t in recorded if made.started_at < t < made.finished_at]
        assert any(t < made.started_at for t in recorded)
        repo.request_cancel(busy)
        wait_for(lambda: repo.get_job(busy).state == "cancelled", 120, "the cancel")


@pytest.mark.slow
def test_a_point_of_the_running_job_is_downloaded_while_it_runs(tmp_path: Path, wait_for: Callable[..., None]) -> None:
    """A user downloads point 1 of the job the only worker is running, as it runs (the client requests it and
    waits): the worker makes it between two of the job's evaluations with the job's own objective (no second
    build of its model and data), the file is the point's (its plan, not marked best), and ``best`` stays a 409
    until the job has finished."""
    with _finished_job_and_a_worker(tmp_path) as (app, worker, _done, start):
        repo = worker.repo
        busy = _submit(repo, budget=500, export_formats=["onnx"])
        builds = worker.export_objective_builds
        start()
        wait_for(lambda: repo.get_job(busy).progress_done >= 1, 180, "the running job's first evaluation")
        with serve_in_thread(app) as url, Client(url, KEY, timeout=60) as client, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as api:  # fmt: skip
            best = api.get(f"/v1/jobs/{busy}/models/best", params={"format": "safetensors"})
            _problem(best, 409, "job-not-finished")
            path = client.download(busy, tmp_path / "point1.zip", point=1, format="safetensors", timeout=150)
            job = api.get(f"/v1/jobs/{busy}").json()
            assert job["state"] == "running" and job["progress"]["done"] < 500
            meta = client.model_meta(busy, 1, format="safetensors")
        with zipfile.ZipFile(path) as zf:
            assert {"model.safetensors", "model.plan.json", "evaluation.json"} <= set(zf.namelist())
            evaluation = json.loads(zf.read("evaluation.json"))
        record = repo.evaluation(busy, stage="search", index=1).record
        assert evaluation["index"] == 1 and evaluation["plan"] == record["plan"]
        assert meta["index"] == 1 and meta["meta"]["best"] is False
        assert worker.export_objective_builds == builds  # the running job's own model and data
        (made,) = repo.export_requests(busy)
        assert made.origin == "user" and made.started_at is not None and made.finished_at is not None
        recorded = [e.created_at for e in repo.evaluations(busy, limit=1000).items]
        assert not [t for t in recorded if made.started_at < t < made.finished_at]
        repo.request_cancel(busy)
        wait_for(lambda: repo.get_job(busy).state == "cancelled", 120, "the cancel")


@pytest.mark.slow
def test_requests_wait_neither_for_the_probe_phase_nor_for_a_fine_tune(
    tmp_path: Path, wait_for: Callable[..., None]
) -> None:
    """The only worker runs a knapsack job (it probes every group before its first evaluation) that fine-tunes a
    point after its search. A user's request of finished job A posted during the probe phase is made before the
    job's first evaluation, and one posted once the fine-tune has started is made before the fine-tuned point is
    recorded: both between two units of the job's own work (no evaluation is recorded while one runs)."""
    with _finished_job_and_a_worker(tmp_path) as (app, worker, done_job, start):
        repo = worker.repo
        busy = _submit(
            repo, strategy="knapsack", budget=2, finetune_top=1, finetune_steps=200, export_formats=["safetensors"]
        )
        start()

        def evaluations(stage: str, least_index: int = 0) -> list[datetime]:
            assert repo.get_job(busy).state in ("queued", "running", "succeeded")
            rows = repo.evaluations(busy, stage=stage, limit=1000).items
            return [r.created_at for r in rows if r.index >= least_index]

        def fine_tune_started() -> bool:
            return any(e.kind == "finetune" for e in repo.events_after(busy))

        with serve_in_thread(app) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as api:  # fmt: skip

            def made(point: int, fmt: str) -> ExportRequest:
                r = api.post(f"/v1/jobs/{done_job}/exports", json={"point": point, "format": fmt})
                assert r.status_code == 202, r.text
                location = r.headers["location"]
                wait_for(lambda: api.get(location).json()["state"] in ("done", "failed"), 150, "the request")
                assert api.get(location).json()["state"] == "done"
                return repo.get_export_request(done_job, r.json()["id"])

            wait_for(lambda: evaluations("search") != [], 180, "the baseline: probing begins", interval=0.02)
            assert evaluations("search", 1) == []
            in_probes = made(1, "safetensors")
            assert api.get(f"/v1/jobs/{busy}").json()["progress"]["done"] == 0
            wait_for(fine_tune_started, 300, "the fine-tune's first progress report", interval=0.02)
            in_finetune = made(2, "safetensors")
            assert evaluations("finetuned") == []
        wait_for(lambda: repo.get_job(busy).state == "succeeded", 300, "the busy job")
        search, tuned = evaluations("search", 1), evaluations("finetuned")
        assert len(search) == 2 and len(tuned) == 1
        for request in (in_probes, in_finetune):
            assert request.started_at is not None and request.finished_at is not None
            assert not [t for t in [*search, *tuned] if request.started_at < t < request.finished_at]
        assert in_probes.finished_at < min(search)  # type: ignore[operator]
        assert max(search) < in_finetune.started_at and in_finetune.finished_at < tuned[0]  # type: ignore[operator]


@pytest.mark.slow
def test_a_request_made_between_steps_leaves_the_jobs_random_streams_alone(tmp_path: Path) -> None:
    """Making a request between two steps of a running job builds another job's objective (which seeds torch):
    the running job's torch, NumPy and ``random`` streams go on as if no request had come in (a seeded SB3 agent
    or a fine-tune with dropout draws the same numbers, so a resumed job replays what it recorded)."""
    import random

    import numpy as np
    import torch

    from service.holding import Lease

    settings = Settings(data_dir=tmp_path / "data", export_front="lazy", lease_seconds=10, poll_seconds=0.1)
    upgrade(settings.db_url)
    worker = Worker(settings, "w1")
    repo = worker.repo

    def draws() -> tuple[list[float], float, float]:
        return torch.rand(4).tolist(), float(np.random.rand()), random.random()

    def seed() -> None:
        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)

    try:
        done_job = _submit(repo, export_formats=["onnx"])
        assert worker._run_one() == "job"
        fresh = Worker(settings, "w2")  # builds job A's objective for the request, as a busy worker would
        try:
            request, ready = repo.request_export(done_job, stage="search", index=1, format="safetensors")
            assert not ready
            seed()
            expected = draws()
            seed()
            fresh._serve_between(Lease(repo, "running-job", "w2", 10, 1))
            assert repo.get_export_request(done_job, request.id).state == "done"
            assert fresh.export_objective_builds == 1
            assert draws() == expected
        finally:
            fresh.close()
    finally:
        worker.close()


class _DataDependentMLP:
    """An MLP whose forward branches on a value: eager runs it (search, ONNX), ``torch.export`` refuses it."""

    @staticmethod
    def build(**kwargs: Any) -> Any:
        from autoprune.models import zoo

        class DataDependent(zoo.MLP):
            def forward(self, x: Any) -> Any:
                out = super().forward(x)
                if float(out.detach().sum()) == float("inf"):  # data-dependent control flow
                    out = out * 0
                return out

        model = zoo.mlp(**kwargs)
        model.__class__ = DataDependent
        return model


@pytest.mark.slow
def test_a_failed_export_of_the_best_point_is_a_visible_failed_request(tmp_path: Path) -> None:
    from autoprune.models.registry import register_architecture, unregister_architecture

    register_architecture("data-dependent-mlp", _DataDependentMLP.build)
    settings = Settings(data_dir=tmp_path / "data", api_keys=[KEY], export_front="lazy", lease_seconds=10)
    upgrade(settings.db_url)
    worker = Worker(settings, "w1")
    repo = worker.repo
    try:
        model = repo.create_model(
            name="dd", kind="architecture", architecture="data-dependent-mlp", kwargs={}, artefact_sha256=None
        )
        data = repo.create_dataset(name="digits", kind="builtin", builtin="digits", artefact_sha256=None, info={})
        spec = {**SPEC, "budget": 2, "export_formats": ["pt2"]}
        job, _ = repo.create_job(model_id=model.id, dataset_id=data.id, spec=spec, progress_total=2)
        assert worker._run_one() == "job"
        assert repo.get_job(job.id).state == "succeeded"  # the job still succeeds
        with serve_in_thread(create_app(settings)) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as api:  # fmt: skip
            listed = api.get(f"/v1/jobs/{job.id}/exports").json()
            assert (listed["total"], listed["done"], listed["pending"]) == (1, 1, 0)
            item = listed["items"][0]
            assert (item["state"], item["origin"], item["format"]) == ("failed", "job", "pt2")
            assert item["error"].startswith("ExportError: .pt2 export failed")
            assert "\n" not in item["error"] and str(ROOT) not in item["error"] and str(tmp_path) not in item["error"]
            problem = _problem(
                api.get(f"/v1/jobs/{job.id}/models/best", params={"format": "pt2"}), 404, "export-failed"
            )
            assert item["error"] in problem["detail"]
            index = repo.get_job(job.id).best["index"]  # type: ignore[index]
            _problem(api.get(f"/v1/jobs/{job.id}/models/{index}", params={"format": "pt2"}), 404, "export-failed")
        event = [e for e in export_events(repo, job.id) if e["phase"] == "job"]
        assert len(event) == 1 and event[0]["ok"] is False and event[0]["error"] == item["error"]
    finally:
        worker.close()
        unregister_architecture("data-dependent-mlp")


def test_finished_requests_past_the_retention_are_deleted(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, export_request_retention_s=3600)
    worker = Worker(settings, "w1")
    repo = worker.repo
    try:
        job_id = finished_job(repo)
        repo.enqueue_exports(job_id, [("search", i) for i in range(1, 5)], ["onnx"])
        sha = "cd" * 32
        repo.add_artefact(sha, 5, "application/onnx", ".onnx")
        made = {}
        for _ in range(3):
            req = repo.claim_export("x", 60)
            assert req is not None
            failed = req.index == 2
            repo.finish_export(req.id, "x", seconds=0.1, **({"error": "ExportError: no"} if failed else {
                "artefact_sha256": sha, "meta": {}}))  # fmt: skip
            made[req.index] = req.id
        old = datetime.now(UTC) - timedelta(hours=2)
        with worker.engine.begin() as conn:  # 1 (done) and 2 (failed) finished two hours ago, 3 just now
            conn.execute(
                update(ExportRequest)
                .where(ExportRequest.id.in_([made[1], made[2]]))
                .values(finished_at=old, created_at=old)
            )
        assert worker.purge_requests() == 2
        assert sorted((r.index, r.state) for r in repo.export_requests(job_id)) == [(3, "done"), (4, "queued")]
        assert repo.get_export(job_id, index=1, stage="search", format="onnx").artefact_sha256 == sha  # stays
        assert repo.request_export(job_id, stage="search", index=1, format="onnx")[1] is True  # from the file
        with worker.engine.begin() as conn:
            conn.execute(update(ExportRequest).where(ExportRequest.id == made[3]).values(finished_at=old))
        assert worker.purge_requests() == 0  # at most once a minute
        assert worker.purge_requests(every_s=0) == 1
    finally:
        worker.close()
    with pytest.raises(InvalidSettings, match="AUTOPRUNE_EXPORT_REQUEST_RETENTION_S"):
        load_settings(export_request_retention_s=0)
