"""Issue 13.5: N SSE watchers of one job cost one database poller (``service.api.events``), over real HTTP.

The app runs in a real uvicorn on 127.0.0.1 in a thread of this process, so the test can count the statements
that reach the app's SQLite engine (SQLAlchemy's ``before_cursor_execute`` hook: real round trips, not a mock)
and compare them with what the fan-out says it did. A second engine, as a worker would, writes the events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event

from service.api.app import create_app
from service.client import parse_sse
from service.db.engine import make_engine, upgrade
from service.db.repository import Repository
from service.settings import Settings
from tests.service.conftest import serve_in_thread

KEY = "fanout-key-0123456789"
WATCHERS = 20


def _watch(url: str, job_id: str, into: list[tuple[str, str, Any]], headers: dict[str, str] | None = None) -> None:
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}", **(headers or {})}, timeout=60) as c,
        c.stream("GET", f"/v1/jobs/{job_id}/events") as r,
    ):
        assert r.status_code == 200
        for e in parse_sse(r.iter_lines()):
            into.append((e.event, e.id or "", e.data))


def test_watchers_of_one_job_get_the_same_events_from_one_poller(tmp_path: Path, wait_for: Callable[..., None]) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=[KEY])
    upgrade(settings.db_url)
    app = create_app(settings, sse_poll_seconds=0.02)
    hub = app.state.events
    reads: list[str] = []

    @event.listens_for(app.state.repo.engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM job_events" in statement:
            reads.append(statement)

    writer_engine = make_engine(settings.db_url)  # the worker's side: not counted
    writer = Repository(writer_engine)
    try:
        with serve_in_thread(app) as url:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api:
                model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
                data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
                job_id = api.post("/v1/jobs", json={"model_id": model, "dataset_id": data}).json()["id"]
            reads.clear()
            late: list[tuple[str, str, Any]] = []  # a watcher resuming after the first event (below)
            first_id = ""
            streams: list[list[tuple[str, str, Any]]] = [[] for _ in range(WATCHERS)]
            threads = [threading.Thread(target=_watch, args=(url, job_id, s)) for s in streams]
            for t in threads:
                t.start()
            # every watcher has its snapshot and the stored "queued" event, and follows the one feed
            wait_for(lambda: all(len(s) >= 2 for s in streams) and hub.watchers(job_id) == WATCHERS, 60, "watchers")
            for k in range(5):  # in lock-step: each event reaches every watcher before the next is written
                writer.add_event(job_id, "log", message=f"step {k}")
                wait_for(lambda k=k: all(len(s) >= 3 + k for s in streams), 60, f"event {k} at every watcher")
                if k == 1:  # a late watcher resuming after the first event: only what came after it
                    first_id = streams[0][1][1]
                    late_thread = threading.Thread(target=_watch, args=(url, job_id, late, {"Last-Event-ID": first_id}))
                    threads.append(late_thread)
                    late_thread.start()
                    wait_for(lambda: len(late) >= 3, 60, "the late watcher's backlog")
            writer.request_cancel(job_id)  # queued -> cancelled: the terminal event ends every stream
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a stream did not end after the terminal state"
            assert hub.pollers() == 0 and hub.watchers() == 0  # the feed went away with its job
    finally:
        writer_engine.dispose()

    check = Repository(make_engine(settings.db_url))
    try:
        expected = [(r.kind, str(r.id)) for r in check.events_after(job_id)]
    finally:
        check.engine.dispose()
    assert [k for k, _ in expected] == ["state"] + ["log"] * 5 + ["state"]
    for s in streams:
        assert s[0][0] == "snapshot" and s[0][2]["state"] == "queued"
        assert [(e, i) for e, i, _ in s[1:]] == expected  # each event once, in order, at every watcher
        assert [d for _, _, d in s[1:]] == [d for _, _, d in streams[0][1:]]
    assert [(e, i) for e, i, _ in late[1:]] == [x for x in expected if int(x[1]) > int(first_id)]

    # one poller, whatever the number of watchers: every read of job_events the app made is one of the
    # poller's polls or one backlog read per watcher that joined the running feed
    assert hub.pollers_started == 1
    assert hub.catchups == WATCHERS  # WATCHERS - 1 joiners + the late one
    assert len(reads) == hub.polls + hub.catchups
    assert hub.polls >= 7  # it did deliver the seven events


def test_watchers_that_disconnect_take_the_poller_with_them(tmp_path: Path, wait_for: Callable[..., None]) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=[KEY])
    upgrade(settings.db_url)
    app = create_app(settings, sse_poll_seconds=0.02)
    hub = app.state.events
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api:
        model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
        data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
        job_id = api.post("/v1/jobs", json={"model_id": model, "dataset_id": data}).json()["id"]
        clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) for _ in range(3)]
        streams = [c.stream("GET", f"/v1/jobs/{job_id}/events") for c in clients]
        for s in streams:
            s.__enter__()
        wait_for(lambda: hub.watchers(job_id) == 3 and hub.pollers() == 1, 30, "three watchers on one poller")
        polls = hub.polls
        wait_for(lambda: hub.polls > polls, 30, "the poller to poll")  # alive while watched
        for s, c in zip(streams, clients, strict=True):  # the clients go away mid-stream (the job stays queued)
            s.__exit__(None, None, None)
            c.close()
        wait_for(lambda: hub.watchers() == 0 and hub.pollers() == 0, 30, "the feed to stop")
        assert hub.pollers_started == 1
        assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
