"""One in-process event fan-out per job for ``GET /v1/jobs/{id}/events``: N watchers of a job cost one poller.

Before this, every SSE stream polled the database itself (two queries every ``sse_poll_seconds``), so 50 watchers
were 200 queries a second queued on the thread pool and the database, and the rest of the API waited behind them
(issue 13.5: ``GET /v1/jobs`` p99 11 ms -> ~200 ms, snapshots up to 2.6 s).

Now the first watcher of a job starts a :class:`_Feed`: one asyncio task that polls the job's events and puts each
one, already rendered as a :class:`ServerSentEvent`, on every subscriber's :class:`asyncio.Queue`. The poller
stops when its last subscriber leaves, or after the event that moves the job to a terminal state. A watcher that
joins a running feed with an older cursor (``Last-Event-ID``) reads its backlog once, then follows the feed; it
skips what it has already sent by event id, so every watcher sees each event once, in id order, whichever way it
came. What a stream sends is exactly what the per-stream poller sent (the tests in ``test_api.py`` hold it).

Feeds are per event loop (``TestClient`` without a ``with`` block runs each request on a loop of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from service.api.schemas import EventOut
from service.db.models import TERMINAL_STATES as _TERMINAL
from service.db.repository import Repository

BATCH = 500
"""Events read per query (``Repository.events_after``'s page)."""


@dataclass(frozen=True)
class _Item:
    id: int
    sse: ServerSentEvent
    terminal: bool
    """The event moved the job to a terminal state: the stream ends after it."""


_END = object()
"""Put on the queues when the job has finished and every event was delivered."""


def render(row: Any) -> _Item:
    """One stored job event as the SSE event every watcher receives, serialized once per event, not per watcher
    (the same bytes FastAPI writes for ``data=``: ``json.dumps`` of the JSON-mode dump)."""
    data = EventOut.of(row).model_dump(mode="json")
    try:
        sse = ServerSentEvent(event=row.kind, id=str(row.id), raw_data=json.dumps(data, allow_nan=False))
    except ValueError:  # a non-finite float (the worker stores none): FastAPI's own encoding writes it as null
        sse = ServerSentEvent(event=row.kind, id=str(row.id), data=data)
    terminal = row.kind == "state" and row.to_state is not None and row.to_state in _TERMINAL
    return _Item(int(row.id), sse, terminal)


@dataclass
class _Feed:
    job_id: str
    cursor: int
    """The id of the last event the poller read (it starts at the first subscriber's cursor)."""
    loop: asyncio.AbstractEventLoop
    queues: set[asyncio.Queue[Any]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class EventHub:
    """The fan-out of every job's events to its SSE watchers (``app.state.events``).

    Counters, for tests and benchmarks (real database round trips, counted where they are made): ``polls``
    (the pollers' reads of job events), ``state_checks`` (the pollers' reads of a job's state when no event
    came), ``catchups`` (backlog reads of watchers that joined a running feed or watch a finished job) and
    ``pollers_started``.
    """

    def __init__(self, repo: Repository, poll_seconds: float, *, batch: int = BATCH) -> None:
        self.repo = repo
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.polls = 0
        self.state_checks = 0
        self.catchups = 0
        self.pollers_started = 0
        self._feeds: dict[tuple[int, str], _Feed] = {}

    def pollers(self) -> int:
        """How many job feeds are polling now."""
        return sum(1 for f in self._feeds.values() if f.task is not None and not f.task.done())

    def watchers(self, job_id: str | None = None) -> int:
        """How many streams follow a feed now (of ``job_id``, or of every job)."""
        return sum(len(f.queues) for f in self._feeds.values() if job_id is None or f.job_id == job_id)

    async def stream(self, job_id: str, cursor: int, *, finished: bool) -> AsyncIterator[ServerSentEvent]:
        """The job's events after ``cursor``, until the event that moves it to a terminal state; ``finished``
        (the job was already terminal when the stream started): what is stored, read once, then the end."""
        if finished:
            async for item in self._backlog(job_id, cursor, until_empty=True):
                yield item.sse
                if item.terminal:
                    return
            return
        loop = asyncio.get_running_loop()
        key = (id(loop), job_id)
        feed = self._feeds.get(key)
        joined = feed is not None and feed.loop is loop
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if feed is None or feed.loop is not loop:
            feed = _Feed(job_id, cursor, loop)
            self._feeds[key] = feed
            feed.queues.add(queue)  # before the poller's first read: it delivers everything after `cursor`
            feed.task = loop.create_task(self._poll(key, feed), name=f"events-{job_id}")
            self.pollers_started += 1
        else:
            feed.queues.add(queue)  # first subscribe, then read the backlog: nothing falls between the two
        last = cursor
        try:
            if joined:
                async for item in self._backlog(job_id, cursor, until_empty=False):
                    last = item.id
                    yield item.sse
                    if item.terminal:
                        return
            while True:
                got = await queue.get()
                if got is _END:
                    return
                if isinstance(got, BaseException):
                    raise got
                if got.id <= last:  # already sent from the backlog (or before the client's cursor)
                    continue
                last = got.id
                yield got.sse
                if got.terminal:
                    return
        finally:
            feed.queues.discard(queue)
            if not feed.queues and self._feeds.get(key) is feed:
                del self._feeds[key]
                if feed.task is not None and not feed.task.done():
                    feed.task.cancel()

    async def follow(self, job_id: str, cursor: int) -> AsyncIterator[ServerSentEvent]:
        """Every stored event after ``cursor``, past the terminal state, until the job has finished and none of
        its exports is queued or running (``follow_exports``: a poller of its own, for the short tail after a
        job; the request's ``export`` event is written with its outcome, so the last read finds it)."""
        while True:
            rows = await run_in_threadpool(self.repo.events_after, job_id, cursor, self.batch)
            self.polls += 1
            for row in rows:
                item = render(row)
                cursor = item.id
                yield item.sse
            if rows:
                continue
            job = await run_in_threadpool(self.repo.get_job, job_id)
            if job.state in _TERMINAL and await run_in_threadpool(self.repo.pending_exports, job_id) == 0:
                async for item in self._backlog(job_id, cursor, until_empty=True):
                    yield item.sse
                return
            await asyncio.sleep(self.poll_seconds)

    async def _backlog(self, job_id: str, cursor: int, *, until_empty: bool) -> AsyncIterator[_Item]:
        """The stored events after ``cursor``, page by page (``until_empty``: read until a read finds none, as
        the per-stream poller did; else stop at a short page)."""
        while True:
            rows = await run_in_threadpool(self.repo.events_after, job_id, cursor, self.batch)
            self.catchups += 1
            for row in rows:
                item = render(row)
                cursor = item.id
                yield item
            if not rows or (not until_empty and len(rows) < self.batch):
                return

    async def _poll(self, key: tuple[int, str], feed: _Feed) -> None:
        def publish(item: Any) -> None:
            for q in feed.queues:
                q.put_nowait(item)

        try:
            finished = False
            while True:
                rows = await run_in_threadpool(self.repo.events_after, feed.job_id, feed.cursor, self.batch)
                self.polls += 1
                for row in rows:
                    item = render(row)
                    feed.cursor = item.id
                    publish(item)
                    if item.terminal:
                        publish(_END)
                        return
                if rows:
                    continue
                if finished:
                    publish(_END)
                    return
                current = await run_in_threadpool(self.repo.get_job, feed.job_id)
                self.state_checks += 1
                # the job may have finished between the two reads: drain once more, then stop
                finished = current.state in _TERMINAL
                if not finished:
                    await asyncio.sleep(self.poll_seconds)
        except Exception as exc:  # the database went away: every watcher's stream fails as its own poll did
            publish(exc)
        finally:
            # no await between the last publish and this: a watcher arriving now starts a new feed
            if self._feeds.get(key) is feed:
                del self._feeds[key]

    async def close(self) -> None:
        """Stop the pollers of the running loop (the app's shutdown)."""
        loop = asyncio.get_running_loop()
        tasks = [f.task for f in self._feeds.values() if f.loop is loop and f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["EventHub", "render"]
