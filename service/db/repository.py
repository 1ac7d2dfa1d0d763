"""Every query and every state transition of the service, in one module (the API and workers call only this).

CONTRACT (signatures fixed). Rows returned are detached snapshots (expire_on_commit off) so callers can read
them after the session closes. All timestamps are timezone-aware UTC.

How it works:

* **One state machine.** Every change of ``jobs.state`` goes through :meth:`Repository._transition` (reached
  from :meth:`~Repository.transition`, :meth:`~Repository.request_cancel`, :meth:`~Repository.claim_job` and
  :meth:`~Repository.release_job`): it checks :data:`ALLOWED`, updates the row (worker, lease, attempts,
  timestamps, error, best) and writes a ``state`` :class:`JobEvent` in the same transaction.
* **Write transactions lock the job row** (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every write
  transaction is ``BEGIN IMMEDIATE``, one writer at a time), so the events of one job get increasing ids in
  commit order and an SSE reader following :meth:`~Repository.events_after` never skips one.
* **Claims.** PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` of the oldest claimable job; SQLite: the same
  query inside ``BEGIN IMMEDIATE``. A running job whose lease expired is claimable: the reclaim writes two
  events (running -> queued with ``reason: lease expired``, then queued -> running). A reclaimed job on which a
  cancel was requested is cancelled instead of handed out.
* **Fencing.** :meth:`~Repository.renew_lease`, :meth:`~Repository.record_evaluation`,
  :meth:`~Repository.release_job`, :meth:`~Repository.add_export` (with ``worker_id``) and
  :meth:`~Repository.transition` (with ``worker_id``, from running) raise :class:`LeaseLost` unless the job is
  running and held by that worker. Lease times come from the clock of the process that writes them: hosts
  sharing one PostgreSQL need synchronised clocks (NTP), and the lease should be several heartbeats long.
* **Evaluations** are idempotent on (job, stage, index): recording one that is already stored changes
  nothing (a resumed worker replays its history through the same callback). ``on_front`` flags, ``front_size``,
  ``progress_done`` and ``best`` are kept on the rows as the worker reports them.
* **Exports and "best".** ``exports`` rows exist per (front point, format) — the unpruned baseline included when
  it is on the front — and for the best point under the job's ``select`` rule (usually a front point already).
  ``jobs.best`` holds the best point's summary (:func:`evaluation_summary` plus ``select``); its
  ``(stage, index)`` is the key to download "best": ``get_export(job, stage=best["stage"],
  index=best["index"], format=...)``. Each export's ``meta`` has ``best: true`` for that point.
* **The export queue** (``export_requests``): the job's worker exports only the best point before the job
  succeeds (recorded as ``done`` requests of origin ``job``); the rest of the front is queued (origin
  ``background``, :meth:`~Repository.enqueue_exports`) or requested (origin ``user``,
  :meth:`~Repository.request_export`), and any worker claims requests of *finished* jobs like jobs:
  :meth:`~Repository.claim_export` takes the lowest ``priority`` (user before background), oldest first, with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL and inside ``BEGIN IMMEDIATE`` on SQLite; a lease
  (:meth:`~Repository.renew_export_lease`) and :data:`MAX_EXPORT_ATTEMPTS` claims; :meth:`~Repository.finish_export`
  stores the export (or the error: retried, or failed) and writes an ``export`` event with the job's export
  progress (``done`` of ``total`` requests). A best-point export that fails in the job's worker is a ``failed``
  request of origin ``job`` (:meth:`~Repository.fail_export`). Finished requests older than the retention are
  deleted (:meth:`~Repository.purge_export_requests`); the exports they made stay.
* **Shared jobs** (``jobs.workers`` = N > 1, from ``spec["workers"]``): up to N workers hold the job at once,
  one :class:`JobSlot` row each. The claim that starts the job takes slot 0 (queued -> running, as above); a
  worker with nothing queued to start *joins* a running shared job with a free or expired slot (no state change,
  a ``log`` event). Each slot has its own lease; ``jobs.lease_expires_at`` is the latest of them, so the job is
  reclaimed as a whole (running -> queued -> running, attempts + 1) only when every holder is gone. Fencing
  checks the worker's slot instead of ``jobs.worker_id``. The shared budget: :meth:`~Repository.reserve_index`
  hands out the next free evaluation index while stored + live reservations < budget (a dead holder's
  reservation returns to the pool), and :meth:`~Repository.record_evaluation` accepts a search evaluation of a
  shared job only under its holder's reservation. Leaving ``running`` deletes the job's slots; a holder that
  stops alone (:meth:`~Repository.release_job`, :meth:`~Repository.leave_slot`) only gives its slot up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, and_, delete, func, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from autoprune.records import Evaluation
from service.db.engine import IMMEDIATE
from service.db.models import (
    EXPORT_PRIORITY,
    TERMINAL_STATES,
    Artefact,
    DatasetRow,
    EvaluationRow,
    ExportRequest,
    ExportRequestState,
    ExportRow,
    JobEvent,
    JobRow,
    JobSlot,
    JobState,
    ModelRow,
    new_id,
    utcnow,
)

_Row = TypeVar("_Row")
_Input = TypeVar("_Input", ModelRow, DatasetRow)


def _export_of(job_id: str, index: int, stage: str, format: str) -> Any:
    """The query for the export of one point (``index`` at ``stage``) of a job in one format."""
    return select(ExportRow).where(
        ExportRow.job_id == job_id,
        ExportRow.stage == stage,
        ExportRow.index == index,
        ExportRow.format == format,
    )


MAX_EXPORT_ATTEMPTS = 3
"""Claims of one export request before it is failed (its worker died or a transient error repeated)."""
_FINISHED_EXPORT = (ExportRequestState.done.value, ExportRequestState.failed.value)


class RepositoryError(Exception):
    """Base of the repository's typed errors (the API maps them to problem+json)."""


class NotFound(RepositoryError):
    pass


class Conflict(RepositoryError):
    """E.g. an Idempotency-Key reused with a different body, cancelling a finished job, an invalid transition."""


class LeaseLost(RepositoryError):
    """The worker no longer holds the job's lease (it expired and another worker claimed the job)."""


ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled}),
    JobState.running: frozenset({JobState.queued, JobState.succeeded, JobState.failed, JobState.cancelled}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}
"""The job state machine. running -> queued is a release (SIGTERM) or a reclaim after a lease expired."""


@dataclass(frozen=True)
class Page:
    items: Sequence[Any]
    total: int
    offset: int
    limit: int


def evaluation_summary(evaluation: Evaluation) -> dict[str, Any]:
    """The headline figures of an evaluation (event payloads, ``jobs.best``)."""
    return {
        "index": evaluation.index,
        "stage": evaluation.stage,
        "quality": evaluation.quality,
        "metric": evaluation.metric,
        "latency_ms": evaluation.latency_ms,
        "latency_ratio": evaluation.latency_ratio,
        "speedup": evaluation.speedup,
        "quality_drop": evaluation.quality_drop,
        "test_quality": evaluation.test_quality,
        "test_quality_drop": evaluation.test_quality_drop,
        "reward": evaluation.reward,
        "macs": evaluation.macs,
        "params": evaluation.params,
        "size_bytes": evaluation.storage_bytes,
    }


def _spec_workers(spec: dict[str, Any]) -> int:
    value = spec.get("workers", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


class Repository:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._pg = engine.dialect.name == "postgresql"

    # -- sessions -----------------------------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction: ``BEGIN IMMEDIATE`` on SQLite (takes the write lock first)."""
        with self._sessions() as s, s.begin():
            s.connection(execution_options={IMMEDIATE: True})
            yield s

    def _lock_job(self, s: Session, job_id: str) -> JobRow:
        job = s.scalars(select(JobRow).where(JobRow.id == job_id).with_for_update()).one_or_none()
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    @staticmethod
    def _check_exists(s: Session, cls: type[Any], key: str, what: str) -> None:
        """NotFound ("no <what> <key>") unless the row ``cls[key]`` exists (in the transaction ``s``)."""
        if s.get(cls, key) is None:
            raise NotFound(f"no {what} {key!r}")

    def _get(self, cls: type[_Row], key: str, what: str) -> _Row:
        """The row ``cls[key]``; NotFound ("no <what> <key>") if absent."""
        with self._read() as s:
            row = s.get(cls, key)
        if row is None:
            raise NotFound(f"no {what} {key!r}")
        return row

    def _add_input(self, cls: type[_Input], **fields: Any) -> _Input:
        """Insert a new model or dataset row (a fresh id, created now); NotFound when it names an artefact
        that is not stored."""
        row = cls(id=new_id(), **fields, created_at=utcnow())
        with self._write() as s:
            if row.artefact_sha256 is not None:
                self._check_exists(s, Artefact, row.artefact_sha256, "artefact")
            s.add(row)
        return row

    @staticmethod
    def _require_job(s: Session, job_id: str) -> None:
        if s.scalar(select(JobRow.id).where(JobRow.id == job_id)) is None:
            raise NotFound(f"no job {job_id!r}")

    @staticmethod
    def _check_owner(job: JobRow, worker_id: str) -> None:
        if job.state != JobState.running.value or job.worker_id != worker_id:
            raise LeaseLost(
                f"worker {worker_id} does not hold job {job.id} (state {job.state}, worker {job.worker_id})"
            )

    @staticmethod
    def _check_holder(s: Session, job: JobRow, worker_id: str) -> JobSlot | None:
        """:meth:`_check_owner` for every job: a shared job's holder is the worker with a slot (returned)."""
        if (job.workers or 1) <= 1:
            Repository._check_owner(job, worker_id)
            return None
        slot = None
        if job.state == JobState.running.value:
            slot = s.scalars(select(JobSlot).where(JobSlot.job_id == job.id, JobSlot.worker_id == worker_id)).first()
        if slot is None:
            raise LeaseLost(f"worker {worker_id} holds no slot of job {job.id} (state {job.state})")
        return slot

    @staticmethod
    def _transition(s: Session, job: JobRow, to: JobState, worker_id: str | None, data: dict[str, Any]) -> None:
        """The one place a job changes state (see the module docstring); the caller holds the row lock."""
        frm = JobState(job.state)
        if to not in ALLOWED[frm]:
            raise Conflict(f"job {job.id} cannot go from {frm.value} to {to.value}")
        now = utcnow()
        data = dict(data)
        if to is JobState.running:
            if worker_id is None:
                raise ValueError("a job goes to running only with the claiming worker's id")
            lease = float(data.get("lease_seconds", 30.0))
            data["lease_seconds"] = lease
            job.worker_id = worker_id
            job.lease_expires_at = now + timedelta(seconds=lease)
            job.attempts = (job.attempts or 0) + 1
            job.started_at = job.started_at or now
            data["attempt"] = job.attempts
            if (job.workers or 1) > 1:  # the starting claim of a shared job holds slot 0
                s.execute(delete(JobSlot).where(JobSlot.job_id == job.id))
                s.add(JobSlot(job_id=job.id, slot=0, worker_id=worker_id, lease_expires_at=job.lease_expires_at))
                data["slot"] = 0
        else:
            if frm is JobState.running and (job.workers or 1) > 1:
                s.execute(delete(JobSlot).where(JobSlot.job_id == job.id))
            job.lease_expires_at = None
            if to is JobState.queued:
                job.worker_id = None
            else:
                job.finished_at = now
        if "error" in data:
            job.error = None if data["error"] is None else str(data["error"])
        if "best" in data:
            job.best = data["best"]
        job.state = to.value
        job.updated_at = now
        if worker_id is not None:
            data["worker_id"] = worker_id
        s.add(JobEvent(job_id=job.id, kind="state", from_state=frm.value, to_state=to.value, data=data, created_at=now))

    # -- artefacts, models, datasets --------------------------------------------------------------------
    def add_artefact(self, sha256: str, size_bytes: int, media_type: str, suffix: str = "") -> None:
        """Record a stored file (idempotent: the same hash twice is one row)."""
        if self._pg:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(Artefact)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(Artefact)
        stmt = stmt.values(
            sha256=sha256, size_bytes=size_bytes, media_type=media_type, suffix=suffix, created_at=utcnow()
        ).on_conflict_do_nothing(index_elements=["sha256"])
        with self._write() as s:
            s.execute(stmt)

    def get_artefact(self, sha256: str) -> Artefact:
        return self._get(Artefact, sha256, "artefact")

    def create_model(
        self, *, name: str, kind: str, architecture: str | None, kwargs: dict[str, Any], artefact_sha256: str | None
    ) -> ModelRow:
        return self._add_input(
            ModelRow,
            name=name,
            kind=kind,
            architecture=architecture,
            kwargs=dict(kwargs),
            artefact_sha256=artefact_sha256,
        )

    def get_model(self, model_id: str) -> ModelRow:
        """NotFound if absent."""
        return self._get(ModelRow, model_id, "model")

    def list_models(self, *, offset: int = 0, limit: int = 50) -> Page:
        """Newest first."""
        return self._page(select(ModelRow), (ModelRow.created_at.desc(), ModelRow.id.desc()), offset, limit)

    def create_dataset(
        self, *, name: str, kind: str, builtin: str | None, artefact_sha256: str | None, info: dict[str, Any]
    ) -> DatasetRow:
        return self._add_input(
            DatasetRow, name=name, kind=kind, builtin=builtin, artefact_sha256=artefact_sha256, info=dict(info)
        )

    def get_dataset(self, dataset_id: str) -> DatasetRow:
        return self._get(DatasetRow, dataset_id, "dataset")

    def list_datasets(self, *, offset: int = 0, limit: int = 50) -> Page:
        """Newest first."""
        return self._page(select(DatasetRow), (DatasetRow.created_at.desc(), DatasetRow.id.desc()), offset, limit)

    def _page(self, query: Any, order: Sequence[Any], offset: int, limit: int) -> Page:
        offset, limit = max(int(offset), 0), max(int(limit), 0)
        with self._read() as s:
            total = int(s.scalar(select(func.count()).select_from(query.subquery())) or 0)
            items = list(s.scalars(query.order_by(*order).offset(offset).limit(limit)).all())
        return Page(items=items, total=total, offset=offset, limit=limit)

    # -- jobs ---------------------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        model_id: str,
        dataset_id: str,
        spec: dict[str, Any],
        progress_total: int | None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[JobRow, bool]:
        """(job, created). With an Idempotency-Key already used: the existing job and False if the request hash
        matches, Conflict otherwise. Writes the job row and a 'state' event (None -> queued) in one transaction."""
        try:
            return self._create_job(model_id, dataset_id, spec, progress_total, idempotency_key, request_hash)
        except IntegrityError:
            if idempotency_key is None:
                raise
            # a concurrent request with the same key won the race (PostgreSQL): answer as if it came first
            return self._create_job(model_id, dataset_id, spec, progress_total, idempotency_key, request_hash)

    def _create_job(
        self,
        model_id: str,
        dataset_id: str,
        spec: dict[str, Any],
        progress_total: int | None,
        idempotency_key: str | None,
        request_hash: str | None,
    ) -> tuple[JobRow, bool]:
        now = utcnow()
        with self._write() as s:
            if idempotency_key is not None:
                existing = s.scalars(select(JobRow).where(JobRow.idempotency_key == idempotency_key)).first()
                if existing is not None:
                    if existing.request_hash != request_hash:
                        raise Conflict("this Idempotency-Key was already used with a different request")
                    return existing, False
            self._check_exists(s, ModelRow, model_id, "model")
            self._check_exists(s, DatasetRow, dataset_id, "dataset")
            job = JobRow(
                id=new_id(),
                state=JobState.queued.value,
                model_id=model_id,
                dataset_id=dataset_id,
                spec=dict(spec),
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                progress_done=0,
                progress_total=progress_total,
                workers=_spec_workers(spec),
                best=None,
                front_size=0,
                error=None,
                cancel_requested=False,
                worker_id=None,
                lease_expires_at=None,
                attempts=0,
                created_at=now,
                updated_at=now,
            )
            s.add(job)
            s.flush()
            s.add(JobEvent(job_id=job.id, kind="state", from_state=None, to_state=job.state, data={}, created_at=now))
        return job, True

    def get_job(self, job_id: str) -> JobRow:
        return self._get(JobRow, job_id, "job")

    def list_jobs(self, *, state: str | None = None, offset: int = 0, limit: int = 50) -> Page:
        """Newest first."""
        query = select(JobRow)
        if state is not None:
            query = query.where(JobRow.state == state)
        return self._page(query, (JobRow.created_at.desc(), JobRow.id.desc()), offset, limit)

    def transition(self, job_id: str, to: JobState, *, worker_id: str | None = None, **data: Any) -> JobRow:
        """THE state-machine function: checks ALLOWED, updates the row (timestamps, lease, error, worker) and
        writes an event row (kind 'state', from/to, data) in one transaction. Conflict on an invalid move.

        ``data`` goes to the event; some keys also set the row: ``error`` (failed), ``best`` (a summary),
        ``lease_seconds`` (to running). With ``worker_id``, leaving 'running' requires holding the job
        (:class:`LeaseLost` otherwise)."""
        to = JobState(to)
        with self._write() as s:
            job = self._lock_job(s, job_id)
            if worker_id is not None and job.state == JobState.running.value and to is not JobState.running:
                self._check_holder(s, job, worker_id)
            self._transition(s, job, to, worker_id, data)
        return job

    def request_cancel(self, job_id: str) -> JobRow:
        """queued -> cancelled at once; running -> cancel_requested=True (the worker stops within one
        evaluation and moves it to cancelled); already cancelled -> unchanged; succeeded/failed -> Conflict."""
        with self._write() as s:
            job = self._lock_job(s, job_id)
            state = JobState(job.state)
            if state is JobState.queued:
                job.cancel_requested = True
                self._transition(s, job, JobState.cancelled, None, {"reason": "cancel requested"})
            elif state is JobState.running:
                if not job.cancel_requested:
                    job.cancel_requested = True
                    job.updated_at = utcnow()
                    s.add(
                        JobEvent(job_id=job.id, kind="log", data={"message": "cancel requested"}, created_at=utcnow())
                    )
            elif state is not JobState.cancelled:
                raise Conflict(f"job {job_id} already {state.value}: it cannot be cancelled")
        return job

    def add_event(self, job_id: str, kind: str = "log", **data: Any) -> JobEvent:
        """A non-state event (e.g. a 'log' line from the worker: an export that failed, a note)."""
        with self._write() as s:
            self._lock_job(s, job_id)
            event = JobEvent(job_id=job_id, kind=kind, data=data, created_at=utcnow())
            s.add(event)
        return event

    # -- workers ------------------------------------------------------------------------------------------
    def claim_job(self, worker_id: str, lease_seconds: float) -> JobRow | None:
        """Claim one job: the oldest queued one, or a running one whose lease expired (its worker died).
        PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED; SQLite: BEGIN IMMEDIATE (one writer at a time).
        Sets state running (event), worker_id, lease_expires_at = now + lease, attempts += 1, started_at.
        With nothing to start, joins a running shared job with a free or expired slot (see the module docstring):
        the job row is returned unchanged in state, the worker's slot is :meth:`slot_of`."""

        def claimable() -> Any:
            return or_(
                JobRow.state == JobState.queued.value,
                and_(JobRow.state == JobState.running.value, JobRow.lease_expires_at < utcnow()),
            )

        with self._read() as s:  # idle workers poll: look before taking a lock (SQLite's is database-wide)
            if s.scalar(select(JobRow.id).where(or_(claimable(), self._joinable(worker_id))).limit(1)) is None:
                return None
        with self._write() as s:
            while True:
                query = select(JobRow).where(claimable()).order_by(JobRow.created_at, JobRow.id).limit(1)
                if self._pg:
                    query = query.with_for_update(skip_locked=True)
                job = s.scalars(query).first()
                if job is None:
                    return self._join(s, worker_id, lease_seconds)
                if job.state == JobState.running.value:
                    self._transition(
                        s, job, JobState.queued, None, {"reason": "lease expired", "previous_worker": job.worker_id}
                    )
                    if job.cancel_requested:
                        self._transition(s, job, JobState.cancelled, None, {"reason": "cancel requested"})
                        s.flush()
                        continue
                self._transition(s, job, JobState.running, worker_id, {"lease_seconds": float(lease_seconds)})
                return job

    @staticmethod
    def _live_slots() -> Any:
        """Correlated: how many live slots the outer ``jobs`` row has."""
        return (
            select(func.count())
            .select_from(JobSlot)
            .where(JobSlot.job_id == JobRow.id, JobSlot.lease_expires_at >= utcnow())
            .scalar_subquery()
        )

    def _joinable(self, worker_id: str) -> Any:
        """A running shared job with a free (or expired) slot, a live lease, no cancel request, budget left,
        and no slot of this worker."""
        mine = select(JobSlot.job_id).where(JobSlot.job_id == JobRow.id, JobSlot.worker_id == worker_id).exists()
        return and_(
            JobRow.state == JobState.running.value,
            JobRow.workers > 1,
            JobRow.lease_expires_at >= utcnow(),
            JobRow.cancel_requested.is_(False),
            or_(JobRow.progress_total.is_(None), JobRow.progress_done < JobRow.progress_total),
            self._live_slots() < JobRow.workers,
            ~mine,
        )

    def _join(self, s: Session, worker_id: str, lease_seconds: float) -> JobRow | None:
        """Take the lowest free or expired slot of the oldest joinable shared job (no state change)."""
        query = select(JobRow).where(self._joinable(worker_id)).order_by(JobRow.created_at, JobRow.id).limit(1)
        if self._pg:
            query = query.with_for_update(skip_locked=True)
        job = s.scalars(query).first()
        if job is None:
            return None
        now = utcnow()
        expires = now + timedelta(seconds=float(lease_seconds))
        slots = {r.slot: r for r in s.scalars(select(JobSlot).where(JobSlot.job_id == job.id)).all()}
        number = next(k for k in range(job.workers) if k not in slots or slots[k].lease_expires_at < now)
        previous = slots.get(number)
        if previous is None:
            s.add(JobSlot(job_id=job.id, slot=number, worker_id=worker_id, lease_expires_at=expires, claimed_at=now))
        else:  # a dead holder's slot: its reservation goes back to the pool
            previous.worker_id, previous.lease_expires_at = worker_id, expires
            previous.reserved_index, previous.claimed_at = None, now
        if number == 0:
            job.worker_id = worker_id
        job.lease_expires_at = max(job.lease_expires_at or expires, expires)
        job.updated_at = now
        data: dict[str, Any] = {"message": f"worker {worker_id} joined (slot {number})", "worker_id": worker_id}
        data["slot"] = number
        if previous is not None:
            data["previous_worker"] = previous.worker_id if previous.worker_id != worker_id else None
        s.add(JobEvent(job_id=job.id, kind="log", data=data, created_at=now))
        return job

    def renew_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> JobRow:
        """Extend the lease; LeaseLost if another worker holds it or the job left 'running'. Returns the row
        (the worker reads cancel_requested from it). A shared job's holder renews its slot."""
        with self._write() as s:
            job = self._lock_job(s, job_id)
            slot = self._check_holder(s, job, worker_id)
            now = utcnow()
            expires = now + timedelta(seconds=float(lease_seconds))
            if slot is None:
                job.lease_expires_at = expires
            else:
                slot.lease_expires_at = expires
                job.lease_expires_at = max(job.lease_expires_at or expires, expires)
            job.updated_at = now
        return job

    def release_job(self, job_id: str, worker_id: str) -> None:
        """running -> queued (graceful stop, e.g. SIGTERM): lease cleared; the next claim resumes the job.
        A holder of a shared job gives up its slot; the job goes back to queued only if no other holder is live."""
        with self._write() as s:
            job = self._lock_job(s, job_id)
            slot = self._check_holder(s, job, worker_id)
            if slot is not None and self._drop_slot(s, job, slot):
                return
            self._transition(s, job, JobState.queued, worker_id, {"reason": "released"})

    @staticmethod
    def _drop_slot(s: Session, job: JobRow, slot: JobSlot) -> bool:
        """Delete ``slot``; True when another live holder keeps the job running."""
        now = utcnow()
        others = s.scalar(
            select(func.count())
            .select_from(JobSlot)
            .where(JobSlot.job_id == job.id, JobSlot.slot != slot.slot, JobSlot.lease_expires_at >= now)
        )
        if not others:
            return False
        s.delete(slot)
        data = {"message": f"worker {slot.worker_id} left (slot {slot.slot})", "worker_id": slot.worker_id}
        s.add(JobEvent(job_id=job.id, kind="log", data={**data, "slot": slot.slot}, created_at=now))
        return True

    # -- shared jobs --------------------------------------------------------------------------------------
    def slot_of(self, job_id: str, worker_id: str) -> int | None:
        """The slot ``worker_id`` holds in a shared job (None: none)."""
        with self._read() as s:
            return s.scalar(select(JobSlot.slot).where(JobSlot.job_id == job_id, JobSlot.worker_id == worker_id))

    def slot_lease(self, job_id: str, slot: int) -> datetime | None:
        """When the lease of a shared job's ``slot`` runs out (None: nobody holds it)."""
        with self._read() as s:
            row = s.scalars(select(JobSlot).where(JobSlot.job_id == job_id, JobSlot.slot == slot)).first()
        return None if row is None else row.lease_expires_at

    def live_workers(self, job_id: str) -> list[str]:
        """The holders of a shared job whose lease is live, by slot."""
        with self._read() as s:
            return list(
                s.scalars(
                    select(JobSlot.worker_id)
                    .where(JobSlot.job_id == job_id, JobSlot.lease_expires_at >= utcnow())
                    .order_by(JobSlot.slot)
                ).all()
            )

    def search_count(self, job_id: str) -> int:
        """How many search evaluations (baseline excluded) the job has stored."""
        with self._read() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(EvaluationRow)
                    .where(EvaluationRow.job_id == job_id, EvaluationRow.stage == "search", EvaluationRow.index > 0)
                )
                or 0
            )

    def reserve_index(self, job_id: str, worker_id: str, budget: int | None) -> int | None:
        """The evaluation index ``worker_id`` (a holder of a shared job) computes next: its current
        reservation, else the lowest index neither stored nor reserved by a live holder; None once stored +
        live reservations reach ``budget``. Dead holders' reservations are dropped first. LeaseLost if not a
        holder."""
        with self._write() as s:
            job = self._lock_job(s, job_id)
            slot = self._check_holder(s, job, worker_id)
            if slot is None:
                raise Conflict(f"job {job_id} is not shared: its evaluations are indexed by its one worker")
            if slot.reserved_index is not None:
                return slot.reserved_index
            now = utcnow()
            s.execute(
                update(JobSlot)
                .where(JobSlot.job_id == job_id, JobSlot.lease_expires_at < now, JobSlot.reserved_index.is_not(None))
                .values(reserved_index=None)
            )
            stored = set(
                s.scalars(
                    select(EvaluationRow.index).where(
                        EvaluationRow.job_id == job_id, EvaluationRow.stage == "search", EvaluationRow.index > 0
                    )
                ).all()
            )
            reserved = set(
                s.scalars(
                    select(JobSlot.reserved_index).where(
                        JobSlot.job_id == job_id, JobSlot.reserved_index.is_not(None), JobSlot.slot != slot.slot
                    )
                ).all()
            )
            if budget is not None and len(stored) + len(reserved) >= budget:
                return None
            index = 1
            while index in stored or index in reserved:
                index += 1
            slot.reserved_index = index
            return index

    def leave_slot(self, job_id: str, worker_id: str) -> bool:
        """A holder of a shared job whose search is over: True if it holds slot 0 now (it finishes the job:
        it held it, or slot 0's holder is dead and it moved there); False if it gave its slot up (the holder of
        slot 0 finishes). LeaseLost if not a holder."""
        with self._write() as s:
            job = self._lock_job(s, job_id)
            slot = self._check_holder(s, job, worker_id)
            assert slot is not None, "leave_slot is for shared jobs"
            if slot.slot == 0:
                return True
            now = utcnow()
            first = s.scalars(select(JobSlot).where(JobSlot.job_id == job_id, JobSlot.slot == 0)).first()
            if first is None or first.lease_expires_at < now:
                if first is not None:
                    s.delete(first)
                    s.flush()
                s.execute(
                    update(JobSlot)
                    .where(JobSlot.job_id == job_id, JobSlot.slot == slot.slot)
                    .values(slot=0, reserved_index=None)
                )
                job.worker_id = worker_id
                message = f"worker {worker_id} took over slot 0 to finish the job"
                s.add(JobEvent(job_id=job_id, kind="log", data={"message": message, "worker_id": worker_id}))
                return True
            s.delete(slot)
            data = {"message": f"worker {worker_id} left (slot {slot.slot})", "worker_id": worker_id, "slot": slot.slot}
            s.add(JobEvent(job_id=job_id, kind="log", data=data, created_at=now))
            return False

    def record_evaluation(
        self,
        job_id: str,
        worker_id: str,
        record: dict[str, Any],
        *,
        done: int,
        best: dict[str, Any] | None,
        front: Sequence[tuple[str, int]],
        derive: Callable[[list[dict[str, Any]]], tuple[dict[str, Any] | None, Sequence[tuple[str, int]]]] | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        """Store one evaluation (``Evaluation.to_json()``), update progress/best/front flags (``front`` holds
        (stage, index) of the current front points), and write an 'evaluation' event, in one transaction.
        Idempotent on (job, stage, index). LeaseLost if ``worker_id`` no longer holds the job.

        ``derive`` (for shared jobs, whose holders each see only their own evaluations): called under the job's
        lock with every stored record plus this one, it returns (best, front) in place of ``best``/``front``;
        ``progress_done`` is then the stored search count. A shared job's search evaluation (index > 0) is
        accepted only under its holder's reservation (:meth:`reserve_index`; LeaseLost otherwise).

        ``weights_sha256``: a fine-tuned point's stored weights (an artefact), which its exports load."""
        evaluation = Evaluation.from_json(record)  # a malformed record fails here, before anything is written
        summary = evaluation_summary(evaluation)
        stage, index = summary["stage"], summary["index"]
        with self._write() as s:
            job = self._lock_job(s, job_id)
            slot = self._check_holder(s, job, worker_id)
            stored = s.scalar(
                select(EvaluationRow.id).where(
                    EvaluationRow.job_id == job_id, EvaluationRow.stage == stage, EvaluationRow.index == index
                )
            )
            if stored is not None:
                return  # already recorded (a resumed job replaying its history)
            if slot is not None and stage == "search" and index > 0:
                if slot.reserved_index != index:
                    raise LeaseLost(f"worker {worker_id} has no reservation for evaluation {index} of job {job_id}")
                slot.reserved_index = None
            if derive is not None:
                records = list(s.scalars(select(EvaluationRow.record).where(EvaluationRow.job_id == job_id)).all())
                best, front = derive([*records, record])
                done = sum(1 for r in [*records, record] if r.get("stage", "search") == "search" and r["index"] > 0)
            keys = sorted({(str(st), int(i)) for st, i in front})
            s.execute(
                update(EvaluationRow)
                .where(EvaluationRow.job_id == job_id, EvaluationRow.on_front.is_(True))
                .values(on_front=False)
            )
            if keys:
                s.execute(
                    update(EvaluationRow)
                    .where(EvaluationRow.job_id == job_id, tuple_(EvaluationRow.stage, EvaluationRow.index).in_(keys))
                    .values(on_front=True)
                )
            now = utcnow()
            s.add(
                EvaluationRow(
                    job_id=job_id,
                    index=index,
                    stage=stage,
                    quality=summary["quality"],
                    latency_ms=summary["latency_ms"],
                    latency_ratio=summary["latency_ratio"],
                    macs=summary["macs"],
                    params=summary["params"],
                    size_bytes=evaluation.size_bytes,
                    reward=summary["reward"],
                    on_front=(stage, index) in keys,
                    plan=record["plan"],
                    record=record,
                    created_at=now,
                    worker_id=worker_id,
                    weights_sha256=weights_sha256,
                )
            )
            job.progress_done = max(job.progress_done or 0, int(done))
            job.best = best
            job.front_size = len(keys)
            job.updated_at = now
            data = {
                "evaluation": summary,
                "done": job.progress_done,
                "total": job.progress_total,
                "best": best,
                "front_size": job.front_size,
                "worker_id": worker_id,
            }
            s.add(JobEvent(job_id=job_id, kind="evaluation", data=data, created_at=now))

    def evaluations(self, job_id: str, *, stage: str | None = None, offset: int = 0, limit: int = 100) -> Page:
        """Ordered by (stage == 'finetuned', index)."""
        with self._read() as s:
            self._require_job(s, job_id)
        query = select(EvaluationRow).where(EvaluationRow.job_id == job_id)
        if stage is not None:
            query = query.where(EvaluationRow.stage == stage)
        order = (EvaluationRow.stage == "finetuned", EvaluationRow.index, EvaluationRow.id)
        return self._page(query, order, offset, limit)

    def all_records(self, job_id: str) -> list[dict[str, Any]]:
        """Every stored evaluation's record, in order (what a resuming worker replays)."""
        with self._read() as s:
            self._require_job(s, job_id)
            return list(
                s.scalars(
                    select(EvaluationRow.record)
                    .where(EvaluationRow.job_id == job_id)
                    .order_by(EvaluationRow.stage == "finetuned", EvaluationRow.index, EvaluationRow.id)
                ).all()
            )

    def front(self, job_id: str) -> list[EvaluationRow]:
        """The current front points (``on_front``), fastest first."""
        with self._read() as s:
            self._require_job(s, job_id)
            return list(
                s.scalars(
                    select(EvaluationRow)
                    .where(EvaluationRow.job_id == job_id, EvaluationRow.on_front.is_(True))
                    .order_by(EvaluationRow.latency_ratio, EvaluationRow.quality.desc(), EvaluationRow.id)
                ).all()
            )

    def events_after(self, job_id: str, after_id: int = 0, limit: int = 500) -> list[JobEvent]:
        """The job's events with ``id > after_id``, oldest first (the SSE feed)."""
        with self._read() as s:
            self._require_job(s, job_id)
            return list(
                s.scalars(
                    select(JobEvent)
                    .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                    .order_by(JobEvent.id)
                    .limit(max(int(limit), 0))
                ).all()
            )

    def last_event(self, job_id: str, kind: str) -> JobEvent | None:
        """The job's latest event of ``kind`` (e.g. the ``probes`` a resumed knapsack job starts from), or None."""
        with self._read() as s:
            self._require_job(s, job_id)
            return s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.kind == kind)
                .order_by(JobEvent.id.desc())
                .limit(1)
            ).first()

    # -- exports ------------------------------------------------------------------------------------------
    def add_export(
        self,
        *,
        job_id: str,
        index: int,
        stage: str,
        format: str,
        artefact_sha256: str,
        meta: dict[str, Any],
        worker_id: str | None = None,
        phase: str | None = None,
        seconds: float | None = None,
    ) -> ExportRow:
        """Store (or replace: a resumed job exports again) the export of one point in one format, and mark its
        export request ``done`` (one of origin ``job`` is written if there was none). With ``worker_id``:
        LeaseLost unless that worker holds the job. With ``phase``: an ``export`` event too."""
        with self._write() as s:
            job = self._lock_job(s, job_id)
            if worker_id is not None:
                self._check_holder(s, job, worker_id)
            row = self._store_export(s, job_id, index, stage, format, artefact_sha256, meta)
            now = utcnow()
            req = self._job_request(s, job_id, index, stage, format, now)
            req.state, req.worker_id, req.lease_expires_at, req.error = ExportRequestState.done.value, None, None, None
            req.seconds, req.finished_at, req.updated_at = seconds, now, now
            if phase is not None:
                s.flush()
                self._export_event(s, req, ok=True, phase=phase)
        return row

    def fail_export(
        self,
        *,
        job_id: str,
        index: int,
        stage: str,
        format: str,
        error: str,
        worker_id: str,
        phase: str,
        seconds: float | None = None,
    ) -> ExportRequest:
        """Record that the job's worker could not export one point in one format (the best, before the job
        succeeds): its request is ``failed`` with ``error`` (one is written if there was none), with an
        ``export`` event. LeaseLost unless ``worker_id`` holds the job."""
        with self._write() as s:
            job = self._lock_job(s, job_id)
            self._check_holder(s, job, worker_id)
            now = utcnow()
            req = self._job_request(s, job_id, index, stage, format, now)
            req.state, req.worker_id, req.lease_expires_at = ExportRequestState.failed.value, None, None
            req.error, req.seconds, req.finished_at, req.updated_at = error, seconds, now, now
            s.flush()
            self._export_event(s, req, ok=False, phase=phase)
            return req

    def failed_export(self, job_id: str, *, index: int, stage: str, format: str) -> ExportRequest | None:
        """The failed request of one point in one format, if its last export failed."""
        with self._read() as s:
            req = s.scalars(self._request_of(job_id, index, stage, format)).first()
        return req if req is not None and req.state == ExportRequestState.failed.value else None

    def purge_export_requests(self, older_than_s: float) -> int:
        """Delete the done and failed export requests that finished more than ``older_than_s`` seconds ago (their
        exports stay); returns how many."""
        cutoff = utcnow() - timedelta(seconds=float(older_than_s))
        with self._write() as s:
            result = s.execute(
                delete(ExportRequest).where(
                    ExportRequest.state.in_(_FINISHED_EXPORT),
                    func.coalesce(ExportRequest.finished_at, ExportRequest.updated_at) < cutoff,
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _job_request(
        self, s: Session, job_id: str, index: int, stage: str, format: str, now: datetime
    ) -> ExportRequest:
        """The request of one point in one format, written (origin ``job``, as taken now) if there was none."""
        req = s.scalars(self._request_of(job_id, index, stage, format)).first()
        if req is None:
            req = ExportRequest(
                id=new_id(), job_id=job_id, index=index, stage=stage, format=format, origin="job",
                priority=EXPORT_PRIORITY["user"], attempts=1, created_at=now, started_at=now,
            )  # fmt: skip
            s.add(req)
        return req

    @staticmethod
    def _request_of(job_id: str, index: int, stage: str, format: str) -> Any:
        return select(ExportRequest).where(
            ExportRequest.job_id == job_id,
            ExportRequest.stage == stage,
            ExportRequest.index == index,
            ExportRequest.format == format,
        )

    def _store_export(
        self, s: Session, job_id: str, index: int, stage: str, format: str, artefact_sha256: str, meta: dict[str, Any]
    ) -> ExportRow:
        self._check_exists(s, Artefact, artefact_sha256, "artefact")
        row = s.scalars(_export_of(job_id, index, stage, format)).first()
        if row is None:
            row = ExportRow(
                job_id=job_id,
                index=index,
                stage=stage,
                format=format,
                artefact_sha256=artefact_sha256,
                meta=dict(meta),
                created_at=utcnow(),
            )
            s.add(row)
        else:
            row.artefact_sha256 = artefact_sha256
            row.meta = dict(meta)
        return row

    def get_export(self, job_id: str, *, index: int, stage: str, format: str) -> ExportRow:
        with self._read() as s:
            row = s.scalars(_export_of(job_id, index, stage, format)).first()
        if row is None:
            raise NotFound(f"job {job_id} has no {format} export of the {stage} point {index}")
        return row

    def exports(self, job_id: str) -> list[ExportRow]:
        with self._read() as s:
            self._require_job(s, job_id)
            return list(
                s.scalars(
                    select(ExportRow)
                    .where(ExportRow.job_id == job_id)
                    .order_by(ExportRow.stage == "finetuned", ExportRow.index, ExportRow.format)
                ).all()
            )

    def evaluation(self, job_id: str, *, stage: str, index: int) -> EvaluationRow:
        """One stored evaluation; NotFound if the job or the point is absent."""
        with self._read() as s:
            self._require_job(s, job_id)
            row = s.scalars(
                select(EvaluationRow).where(
                    EvaluationRow.job_id == job_id, EvaluationRow.stage == stage, EvaluationRow.index == index
                )
            ).first()
        if row is None:
            raise NotFound(f"job {job_id} has no {stage} evaluation {index}")
        return row

    # -- the export queue ---------------------------------------------------------------------------------
    def request_export(
        self, job_id: str, *, stage: str, index: int, format: str, origin: str = "user"
    ) -> tuple[ExportRequest, bool]:
        """(request, ready): ``ready`` when the export is stored already (the request is then ``done``; one is
        written for an export that had none). Otherwise the point's request is queued: a new one, a failed one
        queued again (attempts reset), or a queued background one raised to ``origin``'s priority. The caller
        checks that the job has finished and the point exists."""
        priority = EXPORT_PRIORITY.get(origin, EXPORT_PRIORITY["background"])
        with self._write() as s:
            self._lock_job(s, job_id)
            now = utcnow()
            req = s.scalars(self._request_of(job_id, index, stage, format)).first()
            exported = s.scalar(select(ExportRow.id).where(
                ExportRow.job_id == job_id, ExportRow.stage == stage, ExportRow.index == index,
                ExportRow.format == format,
            ))  # fmt: skip
            if req is None:
                req = ExportRequest(
                    id=new_id(), job_id=job_id, index=index, stage=stage, format=format, origin=origin,
                    priority=priority, attempts=0, created_at=now, updated_at=now,
                    state=ExportRequestState.queued.value,
                )  # fmt: skip
                s.add(req)
            if exported is not None:
                if req.state != ExportRequestState.done.value:
                    req.state, req.finished_at, req.error = ExportRequestState.done.value, now, None
                    req.worker_id, req.lease_expires_at, req.updated_at = None, None, now
                return req, True
            if req.state == ExportRequestState.failed.value:
                req.state, req.attempts, req.error, req.finished_at = ExportRequestState.queued.value, 0, None, None
                req.updated_at = now
            if priority < req.priority:
                req.priority, req.origin, req.updated_at = priority, origin, now
            return req, False

    def enqueue_exports(
        self, job_id: str, points: Sequence[tuple[str, int]], formats: Sequence[str], *, origin: str = "background"
    ) -> int:
        """Queue every (stage, index) point in every format that has neither an export nor a request; returns
        how many were queued (idempotent)."""
        priority = EXPORT_PRIORITY.get(origin, EXPORT_PRIORITY["background"])
        with self._write() as s:
            self._lock_job(s, job_id)
            have: set[tuple[str, int, str]] = set()
            for cls in (ExportRequest, ExportRow):
                query = select(cls.stage, cls.index, cls.format).where(cls.job_id == job_id)  # type: ignore[attr-defined]
                have |= {(str(st), int(i), str(f)) for st, i, f in s.execute(query).all()}
            now, added = utcnow(), 0
            for stage, index in points:
                for fmt in formats:
                    if (stage, index, fmt) in have:
                        continue
                    have.add((stage, index, fmt))
                    s.add(ExportRequest(
                        id=new_id(), job_id=job_id, index=index, stage=stage, format=fmt, origin=origin,
                        priority=priority, attempts=0, state=ExportRequestState.queued.value,
                        created_at=now + timedelta(microseconds=added), updated_at=now,
                    ))  # fmt: skip
                    added += 1
            return added

    def claim_export(
        self, worker_id: str, lease_seconds: float, *, max_priority: int | None = None, job_id: str | None = None
    ) -> ExportRequest | None:
        """Claim the next export request: queued, or running with an expired lease (its worker died), lowest
        priority first, then oldest; at most ``max_priority`` and of job ``job_id`` when given. A background
        request waits for its job to finish; a user's (priority ``user``) is claimable while the job runs too.
        PostgreSQL: ``FOR UPDATE
        SKIP LOCKED``; SQLite: inside ``BEGIN IMMEDIATE``. A request whose worker died on it
        :data:`MAX_EXPORT_ATTEMPTS` times is failed instead (with an ``export`` event)."""

        def claimable() -> Any:
            cond = and_(
                or_(
                    ExportRequest.state == ExportRequestState.queued.value,
                    and_(
                        ExportRequest.state == ExportRequestState.running.value,
                        ExportRequest.lease_expires_at < utcnow(),
                    ),
                ),
                or_(
                    ExportRequest.priority <= EXPORT_PRIORITY["user"],
                    ExportRequest.job_id.in_(select(JobRow.id).where(JobRow.state.in_(TERMINAL_STATES))),
                ),
            )
            if job_id is not None:
                cond = and_(cond, ExportRequest.job_id == job_id)
            return cond if max_priority is None else and_(cond, ExportRequest.priority <= max_priority)

        with self._read() as s:  # idle workers poll: look before taking SQLite's database-wide lock
            if s.scalar(select(ExportRequest.id).where(claimable()).limit(1)) is None:
                return None
        with self._write() as s:
            while True:
                query = (
                    select(ExportRequest)
                    .where(claimable())
                    .order_by(ExportRequest.priority, ExportRequest.created_at, ExportRequest.id)
                    .limit(1)
                )
                if self._pg:
                    query = query.with_for_update(skip_locked=True)
                req = s.scalars(query).first()
                if req is None:
                    return None
                now = utcnow()
                if req.state == ExportRequestState.running.value and req.attempts >= MAX_EXPORT_ATTEMPTS:
                    req.state, req.finished_at, req.updated_at = ExportRequestState.failed.value, now, now
                    req.error = f"gave up after {req.attempts} attempts: the exporting worker kept stopping"
                    req.worker_id, req.lease_expires_at = None, None
                    s.flush()
                    self._export_event(s, req, ok=False, phase=req.origin)
                    continue
                req.state, req.worker_id = ExportRequestState.running.value, worker_id
                req.lease_expires_at = now + timedelta(seconds=float(lease_seconds))
                req.attempts = (req.attempts or 0) + 1
                req.started_at, req.updated_at = now, now
                return req

    def _held_export(self, s: Session, request_id: str, worker_id: str) -> ExportRequest:
        req = s.scalars(select(ExportRequest).where(ExportRequest.id == request_id).with_for_update()).one_or_none()
        if req is None:
            raise NotFound(f"no export request {request_id!r}")
        if req.state != ExportRequestState.running.value or req.worker_id != worker_id:
            raise LeaseLost(f"worker {worker_id} does not hold export request {request_id} (state {req.state})")
        return req

    def renew_export_lease(self, request_id: str, worker_id: str, lease_seconds: float) -> None:
        """LeaseLost unless ``worker_id`` still holds the request."""
        with self._write() as s:
            req = self._held_export(s, request_id, worker_id)
            req.lease_expires_at = utcnow() + timedelta(seconds=float(lease_seconds))

    def finish_export(
        self,
        request_id: str,
        worker_id: str,
        *,
        seconds: float,
        artefact_sha256: str | None = None,
        meta: dict[str, Any] | None = None,
        error: str | None = None,
        retry: bool = False,
    ) -> ExportRequest:
        """The held request's outcome, with an ``export`` event, in one transaction: with ``artefact_sha256`` the
        export is stored and the request ``done``; else ``error``: queued again when ``retry`` and claims are
        left, failed otherwise. LeaseLost unless ``worker_id`` holds the request."""
        with self._write() as s:
            req = self._held_export(s, request_id, worker_id)
            self._lock_job(s, req.job_id)
            now = utcnow()
            req.seconds, req.updated_at, req.lease_expires_at = float(seconds), now, None
            if artefact_sha256 is not None:
                self._store_export(s, req.job_id, req.index, req.stage, req.format, artefact_sha256, meta or {})
                req.state, req.error, req.finished_at, req.worker_id = ExportRequestState.done.value, None, now, None
            elif retry and req.attempts < MAX_EXPORT_ATTEMPTS:
                req.state, req.error, req.worker_id = ExportRequestState.queued.value, error, None
            else:
                req.state, req.error, req.finished_at = ExportRequestState.failed.value, error, now
                req.worker_id = None
            s.flush()
            if req.state != ExportRequestState.queued.value:
                self._export_event(s, req, ok=req.state == ExportRequestState.done.value, phase=req.origin)
            return req

    @staticmethod
    def _export_event(s: Session, req: ExportRequest, *, ok: bool, phase: str) -> None:
        """An ``export`` event: the point, format, outcome, seconds and the job's export progress."""
        counts = dict(
            s.execute(
                select(ExportRequest.state, func.count())
                .where(ExportRequest.job_id == req.job_id)
                .group_by(ExportRequest.state)
            ).all()
        )
        data: dict[str, Any] = {
            "point": {"stage": req.stage, "index": req.index},
            "format": req.format,
            "request_id": req.id,
            "ok": ok,
            "seconds": req.seconds,
            "phase": phase,
            "done": sum(int(counts.get(k, 0)) for k in _FINISHED_EXPORT),
            "total": sum(int(v) for v in counts.values()),
        }
        if not ok:
            data["error"] = req.error
        s.add(JobEvent(job_id=req.job_id, kind="export", data=data, created_at=utcnow()))

    def export_requests(self, job_id: str) -> list[ExportRequest]:
        """The job's export requests, in claim order (priority, then age)."""
        with self._read() as s:
            self._require_job(s, job_id)
            return list(
                s.scalars(
                    select(ExportRequest)
                    .where(ExportRequest.job_id == job_id)
                    .order_by(ExportRequest.priority, ExportRequest.created_at, ExportRequest.id)
                ).all()
            )

    def get_export_request(self, job_id: str, request_id: str) -> ExportRequest:
        with self._read() as s:
            req = s.get(ExportRequest, request_id)
        if req is None or req.job_id != job_id:
            raise NotFound(f"job {job_id} has no export request {request_id!r}")
        return req

    def pending_exports(self, job_id: str) -> int:
        """How many of the job's export requests are queued or running."""
        with self._read() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(ExportRequest)
                    .where(ExportRequest.job_id == job_id, ExportRequest.state.not_in(_FINISHED_EXPORT))
                )
                or 0
            )
