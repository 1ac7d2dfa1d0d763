"""Every query and every state transition of the service, in one module (the API and workers call only this).

CONTRACT (signatures fixed; bodies being implemented). Rows returned are detached snapshots (expire_on_commit
off) so callers can read them after the session closes. All timestamps are timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from service.db.models import DatasetRow, EvaluationRow, ExportRow, JobEvent, JobRow, JobState, ModelRow


class RepositoryError(Exception):
    """Base of the repository's typed errors (the API maps them to problem+json)."""


class NotFound(RepositoryError):  # noqa: N818
    pass


class Conflict(RepositoryError):  # noqa: N818
    """E.g. an Idempotency-Key reused with a different body, cancelling a finished job, an invalid transition."""


class LeaseLost(RepositoryError):  # noqa: N818
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


class Repository:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- artefacts, models, datasets --------------------------------------------------------------------
    def add_artefact(self, sha256: str, size_bytes: int, media_type: str, suffix: str = "") -> None:
        """Record a stored file (idempotent: the same hash twice is one row)."""
        raise NotImplementedError

    def create_model(
        self, *, name: str, kind: str, architecture: str | None, kwargs: dict[str, Any], artefact_sha256: str | None
    ) -> ModelRow:
        raise NotImplementedError

    def get_model(self, model_id: str) -> ModelRow:
        """NotFound if absent."""
        raise NotImplementedError

    def create_dataset(
        self, *, name: str, kind: str, builtin: str | None, artefact_sha256: str | None, info: dict[str, Any]
    ) -> DatasetRow:
        raise NotImplementedError

    def get_dataset(self, dataset_id: str) -> DatasetRow:
        raise NotImplementedError

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
        raise NotImplementedError

    def get_job(self, job_id: str) -> JobRow:
        raise NotImplementedError

    def list_jobs(self, *, state: str | None = None, offset: int = 0, limit: int = 50) -> Page:
        """Newest first."""
        raise NotImplementedError

    def transition(self, job_id: str, to: JobState, *, worker_id: str | None = None, **data: Any) -> JobRow:
        """THE state-machine function: checks ALLOWED, updates the row (timestamps, lease, error, worker) and
        writes an event row (kind 'state', from/to, data) in one transaction. Conflict on an invalid move."""
        raise NotImplementedError

    def request_cancel(self, job_id: str) -> JobRow:
        """queued -> cancelled at once; running -> cancel_requested=True (the worker stops within one
        evaluation and moves it to cancelled); already cancelled -> unchanged; succeeded/failed -> Conflict."""
        raise NotImplementedError

    # -- workers ------------------------------------------------------------------------------------------
    def claim_job(self, worker_id: str, lease_seconds: float) -> JobRow | None:
        """Claim one job: the oldest queued one, or a running one whose lease expired (its worker died).
        PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED; SQLite: BEGIN IMMEDIATE (one writer at a time).
        Sets state running (event), worker_id, lease_expires_at = now + lease, attempts += 1, started_at."""
        raise NotImplementedError

    def renew_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> JobRow:
        """Extend the lease; LeaseLost if another worker holds it or the job left 'running'. Returns the row
        (the worker reads cancel_requested from it)."""
        raise NotImplementedError

    def release_job(self, job_id: str, worker_id: str) -> None:
        """running -> queued (graceful stop, e.g. SIGTERM): lease cleared; the next claim resumes the job."""
        raise NotImplementedError

    def record_evaluation(
        self,
        job_id: str,
        worker_id: str,
        record: dict[str, Any],
        *,
        done: int,
        best: dict[str, Any] | None,
        front: Sequence[tuple[str, int]],
    ) -> None:
        """Store one evaluation (``Evaluation.to_json()``), update progress/best/front flags (``front`` holds
        (stage, index) of the current front points), and write an 'evaluation' event, in one transaction.
        Idempotent on (job, stage, index). LeaseLost if ``worker_id`` no longer holds the job."""
        raise NotImplementedError

    def evaluations(
        self, job_id: str, *, stage: str | None = None, offset: int = 0, limit: int = 100
    ) -> Page:
        """Ordered by (stage == 'finetuned', index)."""
        raise NotImplementedError

    def all_records(self, job_id: str) -> list[dict[str, Any]]:
        """Every stored evaluation's record, in order (what a resuming worker replays)."""
        raise NotImplementedError

    def front(self, job_id: str) -> list[EvaluationRow]:
        raise NotImplementedError

    def events_after(self, job_id: str, after_id: int = 0, limit: int = 500) -> list[JobEvent]:
        raise NotImplementedError

    # -- exports ------------------------------------------------------------------------------------------
    def add_export(
        self, *, job_id: str, index: int, stage: str, format: str, artefact_sha256: str, meta: dict[str, Any]
    ) -> ExportRow:
        raise NotImplementedError

    def get_export(self, job_id: str, *, index: int, stage: str, format: str) -> ExportRow:
        raise NotImplementedError

    def exports(self, job_id: str) -> list[ExportRow]:
        raise NotImplementedError
