"""SQLAlchemy 2.0 typed models. Schema changes go through Alembic migrations (service/db/migrations).

Files never live in the database: uploads and exported models are content-addressed files in the artefact
directory, referenced here by their SHA-256.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
TERMINAL_STATES = frozenset(s.value for s in TERMINAL)
"""The terminal states as stored in ``jobs.state``."""


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


class Artefact(Base):
    """A file in the artefact directory, named by its content hash."""

    __tablename__ = "artefacts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))
    suffix: Mapped[str] = mapped_column(String(20), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelRow(Base):
    """An uploaded model: an architecture (+ kwargs) with safetensors weights, or a ``.pt2`` program."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # "architecture" | "pt2"
    architecture: Mapped[str | None] = mapped_column(String(100), nullable=True)
    kwargs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artefact_sha256: Mapped[str | None] = mapped_column(ForeignKey("artefacts.sha256"), nullable=True)
    """Weights (.safetensors) or program (.pt2); None: an architecture with the shipped/initial weights."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetRow(Base):
    """An uploaded dataset file (.npz / .safetensors) or a built-in one by name."""

    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # "builtin" | "file"
    builtin: Mapped[str | None] = mapped_column(String(100), nullable=True)
    artefact_sha256: Mapped[str | None] = mapped_column(ForeignKey("artefacts.sha256"), nullable=True)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """What the API could read without torch: array names, shapes, dtypes, sample count."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    state: Mapped[str] = mapped_column(String(20), default=JobState.queued.value, index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    spec: Mapped[dict[str, Any]] = mapped_column()
    """The search settings: :class:`autoprune.job.JobSpec` fields other than model/data/weights/kwargs."""
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Hash of the creating request body: the same Idempotency-Key with a different body is a conflict."""
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    best: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """Summary of the best evaluation so far (index, stage, quality, latency ratio, reward)."""
    front_size: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a worker claimed it (> 1: resumed after a worker died or was stopped)."""
    workers: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """How many workers may hold the job at once (``JobSpec.workers``). Above 1 the holders are rows of
    :class:`JobSlot`; ``worker_id`` then names the holder of slot 0 and ``lease_expires_at`` the latest lease
    of any slot (so the job is reclaimed as a whole only once every holder is gone)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class JobEvent(Base):
    """One row per state transition and per recorded evaluation: the job's history and the SSE feed."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # "state" | "evaluation" | "log"
    from_state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    to_state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvaluationRow(Base):
    """Every evaluation of a job: the plan and all metrics; ``record`` is ``Evaluation.to_json()``."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("job_id", "stage", "index", name="uq_evaluation_job_stage_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(20))  # "search" | "finetuned"
    quality: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    latency_ratio: Mapped[float] = mapped_column(Float)
    macs: Mapped[int] = mapped_column(BigInteger)
    params: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    reward: Mapped[float] = mapped_column(Float)
    on_front: Mapped[bool] = mapped_column(Boolean, default=False)
    plan: Mapped[dict[str, Any]] = mapped_column()
    record: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    worker_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    """The worker that recorded it (several workers share one job when ``jobs.workers > 1``)."""
    weights_sha256: Mapped[str | None] = mapped_column(ForeignKey("artefacts.sha256"), nullable=True)
    """A fine-tuned point's trained weights (a ``.safetensors`` artefact, stored once when it was fine-tuned):
    its exports load them into the pruned shape instead of training again. None for search points (rebuilt from
    the plan) and for points fine-tuned before migration 0003 (they cannot be rebuilt without retraining)."""


class ExportRow(Base):
    """An exported model of one front point (or the best) of a job, in one format."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("job_id", "stage", "index", "format", name="uq_export_point_format"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(20))
    format: Mapped[str] = mapped_column(String(20))  # "onnx" | "safetensors" (a zip with the plan) | "pt2"
    artefact_sha256: Mapped[str] = mapped_column(ForeignKey("artefacts.sha256"))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The export report: verification (max abs diff), re-measured latency and speed-up, the evaluation."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobSlot(Base):
    """One holder of a job that several workers share (``jobs.workers > 1``): slot 0 is taken by the claim that
    starts the job, slots 1.. by workers that join it; each slot has its own lease, renewed by its heartbeat.

    ``reserved_index`` is the evaluation index this holder is computing now: the shared budget counts stored
    evaluations plus live reservations, so the holders together stop at exactly ``budget`` evaluations, and a
    dead holder's reservation (lease expired) goes back to the pool."""

    __tablename__ = "job_slots"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    worker_id: Mapped[str] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reserved_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExportRequestState(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


EXPORT_PRIORITY = {"user": 0, "background": 10}
"""Lower first: a user's request (``POST /v1/jobs/{id}/exports``) before the worker's own background exports of
the front (``AUTOPRUNE_EXPORT_FRONT=eager``). ``job``: the best point, exported by the job's worker itself."""


class ExportRequest(Base):
    """One export of one point of a job in one format, as a queue entry: queued -> running (a worker
    holds its lease) -> done (an :class:`ExportRow` exists) or failed (after its retries, or at once when the
    point cannot be exported in that format). A worker that dies leaves it running with an expired lease: the
    next claim takes it again (one attempt more). The best point's exports, made by the job's own worker before
    the job succeeds, are recorded here as ``done`` (origin ``job``), so the list shows every export of the job."""

    __tablename__ = "export_requests"
    __table_args__ = (UniqueConstraint("job_id", "stage", "index", "format", name="uq_export_request_point_format"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(20))
    format: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), default=ExportRequestState.queued.value, index=True)
    origin: Mapped[str] = mapped_column(String(20))  # "user" | "background" | "job"
    priority: Mapped[int] = mapped_column(Integer, default=EXPORT_PRIORITY["background"])
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    """How long the export that finished it took (rebuilding the model included)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
