"""Request and response bodies of the API (pydantic). Requests forbid unknown keys."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from agents import STRATEGIES
from autoprune.job import JobSpec, Knob
from service.db.models import DatasetRow, EvaluationRow, ExportRequest, ExportRow, JobEvent, JobRow, ModelRow


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


ExportFormat = Literal["onnx", "safetensors", "pt2"]


def _spec_field(knob: Knob) -> tuple[Any, Any]:
    """A job body field from a :class:`JobSpec` setting: its type, default, description and bounds (``JobSpec.
    validate`` enforces them again, with its own messages, for spec files and the CLI)."""
    kinds: dict[type, Any] = {int: int, float: float, str: str, bool: bool, tuple: list[ExportFormat]}
    kind = kinds.get(knob.kind, dict[str, Any])
    extra: dict[str, Any] = {"description": knob.doc}
    if knob.kind in (int, float, bool):
        extra["strict"] = True  # `budget: true` is not 1, `distill: 1` is not true
    if knob.kind in (int, float):
        if knob.lo is not None:
            extra["gt" if knob.lo_open else "ge"] = knob.lo
        if knob.hi is not None:
            extra["le"] = knob.hi
    choices = list(STRATEGIES) if knob.name == "strategy" else knob.choices
    if choices and knob.kind is str:
        extra["json_schema_extra"] = {"enum": list(choices)}
    if knob.kind is tuple:
        default = list(knob.default)
        extra.update(default_factory=lambda: list(default), min_length=1, max_length=len(knob.choices or ()))
    elif knob.kind is dict:
        extra["default_factory"] = dict
    else:
        extra["default"] = knob.default
    return (kind | None if knob.optional else kind), Field(**extra)


if TYPE_CHECKING:

    class JobCreate(_Request):
        model_id: str
        dataset_id: str

        def __getattr__(self, name: str) -> Any: ...

else:
    JobCreate = create_model(
        "JobCreate",
        __base__=_Request,
        __doc__="A search job: the model and dataset (ids from `POST /v1/models` and `POST /v1/datasets`) and "
        "the settings of `autoprune.job.JobSpec` (the same names, defaults and bounds as `autoprune search`).",
        model_id=(str, Field(min_length=1, max_length=32)),
        dataset_id=(str, Field(min_length=1, max_length=32)),
        **{knob.name: _spec_field(knob) for knob in JobSpec.knobs()},
    )


class DatasetBuiltin(_Request):
    builtin: Literal["digits", "mnist1d"]
    name: str | None = Field(None, max_length=200)


class ModelOut(BaseModel):
    id: str
    name: str
    kind: str
    architecture: str | None
    kwargs: dict[str, Any]
    sha256: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: ModelRow) -> ModelOut:
        return cls(
            id=row.id,
            name=row.name,
            kind=row.kind,
            architecture=row.architecture,
            kwargs=dict(row.kwargs or {}),
            sha256=row.artefact_sha256,
            created_at=row.created_at,
        )


class DatasetOut(BaseModel):
    id: str
    name: str
    kind: str
    builtin: str | None
    sha256: str | None
    info: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: DatasetRow) -> DatasetOut:
        return cls(
            id=row.id,
            name=row.name,
            kind=row.kind,
            builtin=row.builtin,
            sha256=row.artefact_sha256,
            info=dict(row.info or {}),
            created_at=row.created_at,
        )


class Progress(BaseModel):
    done: int
    total: int | None


class JobOut(BaseModel):
    id: str
    state: str
    model_id: str
    dataset_id: str
    spec: dict[str, Any]
    progress: Progress
    best: dict[str, Any] | None = Field(description="The best evaluation so far (index, stage, quality, ...).")
    front_size: int
    error: str | None
    cancel_requested: bool
    attempts: int = Field(description="Times a worker claimed the job (> 1: resumed).")
    worker_id: str | None
    created_at: datetime
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: JobRow) -> JobOut:
        return cls(
            id=row.id,
            state=row.state,
            model_id=row.model_id,
            dataset_id=row.dataset_id,
            spec=dict(row.spec or {}),
            progress=Progress(done=row.progress_done or 0, total=row.progress_total),
            best=row.best,
            front_size=row.front_size or 0,
            error=row.error,
            cancel_requested=bool(row.cancel_requested),
            attempts=row.attempts or 0,
            worker_id=row.worker_id,
            created_at=row.created_at,
            updated_at=row.updated_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    offset: int
    limit: int


class EvaluationOut(BaseModel):
    index: int
    stage: str
    quality: float = Field(description="Quality on the validation split (what the search scored).")
    test_quality: float | None = Field(
        None, description="Quality on the held-out test split: fine-tuned (delivered) points only, else null."
    )
    latency_ms: float
    latency_ratio: float
    macs: int
    params: int
    size_bytes: int
    reward: float
    on_front: bool
    plan: dict[str, Any]
    record: dict[str, Any] = Field(description="The full evaluation record (`Evaluation.to_json()`).")
    created_at: datetime

    @classmethod
    def of(cls, row: EvaluationRow) -> EvaluationOut:
        return cls(
            index=row.index,
            stage=row.stage,
            quality=row.quality,
            test_quality=(row.record or {}).get("test_quality"),
            latency_ms=row.latency_ms,
            latency_ratio=row.latency_ratio,
            macs=row.macs,
            params=row.params,
            size_bytes=row.size_bytes,
            reward=row.reward,
            on_front=bool(row.on_front),
            plan=dict(row.plan or {}),
            record=dict(row.record or {}),
            created_at=row.created_at,
        )


class EvaluationPage(BaseModel):
    items: list[EvaluationOut]
    total: int
    offset: int
    limit: int


class Pareto(BaseModel):
    job_id: str
    state: str
    best: dict[str, Any] | None
    points: list[EvaluationOut]


class ExportOut(BaseModel):
    job_id: str
    index: int
    stage: str
    format: str
    sha256: str
    size_bytes: int | None
    url: str
    meta: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: ExportRow, size: int | None, url: str) -> ExportOut:
        return cls(
            job_id=row.job_id,
            index=row.index,
            stage=row.stage,
            format=row.format,
            sha256=row.artefact_sha256,
            size_bytes=size,
            url=url,
            meta=dict(row.meta or {}),
            created_at=row.created_at,
        )


class ExportRequestCreate(_Request):
    """Export one recorded point of a job (running, finished, cancelled or failed) in one format."""

    point: Literal["best"] | Annotated[int, Field(ge=0, le=999_999_999, strict=True)] = Field(
        description="`best` or an evaluation index."
    )
    stage: Literal["search", "finetuned"] | None = Field(
        default=None, description="search or finetuned (default: the best's stage; for an index, finetuned if "
        "that point was fine-tuned)."
    )  # fmt: skip
    format: ExportFormat = Field(description="onnx, safetensors (a zip with the plan) or pt2.")


class ExportRequestOut(BaseModel):
    """An export request: ``queued`` -> ``running`` -> ``done`` (``download_url`` serves the file) or
    ``failed`` (``error``)."""

    id: str
    job_id: str
    index: int
    stage: str
    format: str
    state: Literal["queued", "running", "done", "failed"]
    origin: str = Field(description="user (a request), background (the front, queued by the worker) or job (the "
                        "best point, exported before the job succeeded).")  # fmt: skip
    priority: int
    attempts: int
    error: str | None
    seconds: float | None = Field(description="How long the export took (rebuilding the model included).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    url: str = Field(description="This request.")
    download_url: str | None = Field(description="The file, once done.")

    @classmethod
    def of(cls, row: ExportRequest) -> ExportRequestOut:
        base = f"/v1/jobs/{row.job_id}"
        done = row.state == "done"
        return cls(
            id=row.id,
            job_id=row.job_id,
            index=row.index,
            stage=row.stage,
            format=row.format,
            state=row.state,  # type: ignore[arg-type]
            origin=row.origin,
            priority=row.priority,
            attempts=row.attempts,
            error=row.error,
            seconds=row.seconds,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            url=f"{base}/exports/{row.id}",
            download_url=f"{base}/models/{row.index}?format={row.format}&stage={row.stage}" if done else None,
        )


class ExportRequestList(BaseModel):
    items: list[ExportRequestOut]
    done: int = Field(description="Requests done or failed.")
    total: int
    pending: int = Field(description="Requests queued or running.")


class EventOut(BaseModel):
    """The data of one SSE event (one ``job_events`` row)."""

    id: int
    job_id: str
    kind: str
    from_state: str | None
    to_state: str | None
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: JobEvent) -> EventOut:
        return cls(
            id=row.id,
            job_id=row.job_id,
            kind=row.kind,
            from_state=row.from_state,
            to_state=row.to_state,
            data=dict(row.data or {}),
            created_at=row.created_at,
        )


class WorkerHealth(BaseModel):
    """The embedded worker of ``autoprune serve`` (absent with ``--no-worker``: workers run elsewhere)."""

    state: Literal["starting", "running", "restarting", "stopped"]
    pid: int | None = None
    restarts: int = Field(0, description="Restarts since serve started.")
    last_exit: str | None = Field(None, description="How it last died, e.g. 'killed by signal 9 (SIGKILL)'.")
    retry_in_s: float | None = Field(None, description="Seconds to the next restart (while restarting).")


class Health(BaseModel):
    """``ok``; ``degraded`` (200) while the embedded worker restarts; ``unavailable`` (503) when the database is
    unreachable or the embedded worker is down for good (it kept dying, so nothing runs the queued jobs)."""

    status: Literal["ok", "degraded", "unavailable"]
    database: bool
    version: str
    detail: str | None = None
    worker: WorkerHealth | None = None


class StrategyOut(BaseModel):
    name: str
    summary: str
    options: list[str]


class Catalog(BaseModel):
    architectures: list[str]
    datasets: list[str]
    strategies: list[StrategyOut]
    default_strategy: str = Field(description="The strategy of a job that names none (the dashboard's choice).")
    metrics: list[str]
    objectives: list[str]
    export_formats: list[str]
