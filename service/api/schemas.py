"""Request and response bodies of the API (pydantic). Requests forbid unknown keys."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents import STRATEGIES
from autoprune.job import METRICS, SELECTIONS
from autoprune.plan import CRITERIA
from autoprune.reward import FORMS
from service.db.models import DatasetRow, EvaluationRow, ExportRow, JobEvent, JobRow, ModelRow


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


ExportFormat = Literal["onnx", "safetensors", "pt2"]


def _default_formats() -> list[ExportFormat]:
    return ["onnx", "safetensors", "pt2"]  # every point downloadable in every format


def _choice(default: str, values: Iterable[str], description: str) -> Any:
    """A string field whose choices the OpenAPI document lists (``JobSpec.validate`` is what enforces them,
    with its own messages)."""
    return Field(default, description=description, json_schema_extra={"enum": list(values)})


class JobCreate(_Request):
    """A search job: the model and dataset (ids from ``POST /v1/models`` and ``POST /v1/datasets``) and the
    :class:`autoprune.job.JobSpec` settings (same names and defaults as ``autoprune search``)."""

    model_id: str = Field(min_length=1, max_length=32)
    dataset_id: str = Field(min_length=1, max_length=32)
    strategy: str = _choice("random", STRATEGIES, "Search strategy (`GET /v1/catalog`).")
    strategy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the strategy (`GET /v1/catalog`); `storage` and `study_name` are refused: "
        "the operator sets where studies are kept.",
    )
    budget: int | None = Field(20, ge=1, le=1_000_000, description="Number of candidate evaluations.")
    seconds: float | None = Field(None, gt=0, le=1e9, description="Wall-clock limit (checked between evaluations).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    metric: str = _choice("accuracy", METRICS, "Quality metric (`agreement`, `kl`, `cosine` need no labels).")
    objective: str = _choice("mnasnet", FORMS, "Reward form.")
    target: float = Field(0.5, gt=0, le=2, description="Target latency as a fraction of the unpruned model's.")
    select: str = _choice("reward", SELECTIONS, "Which point is best.")
    max_quality_drop: float = Field(0.01, ge=0, le=1, description="For select=latency: relative quality loss allowed.")
    max_latency_ratio: float = Field(0.5, gt=0, le=10, description="For select=quality: latency ratio allowed.")
    max_ratio: float = Field(0.8, gt=0, le=0.95, description="Largest pruning ratio per group.")
    criterion: str = _choice("l1", CRITERIA, "Importance criterion.")
    round_to: int = Field(8, ge=1, le=4096, description="Round kept widths to a multiple of this.")
    bn_batches: int = Field(8, ge=0, le=10_000, description="BatchNorm re-estimation batches per candidate (0: off).")
    val_samples: int | None = Field(
        None, ge=1, le=10**9, description="Evaluate on this many validation samples (all when unset)."
    )
    runtime: str = _choice("torch", ("torch", "onnxruntime"), "Latency runtime.")
    threads: int = Field(1, ge=1, le=1024, description="Threads pinned while timing.")
    batch_size: int = Field(1, ge=1, le=65536, description="Batch size of the timed input.")
    train_epochs: int = Field(0, ge=0, le=10_000, description="Train the model first when it has no weights (0: off).")
    finetune_top: int = Field(0, ge=0, le=10_000, description="Fine-tune the top K front points after the search.")
    finetune_steps: int = Field(200, ge=1, le=10**7)
    distill: bool = True
    export_formats: list[ExportFormat] = Field(default_factory=_default_formats, min_length=1, max_length=3)
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Workers that may run this job at once, sharing one Optuna study (optuna-tpe / optuna-nsga2; "
        "needs the service on PostgreSQL or AUTOPRUNE_STUDY_STORAGE).",
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


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: bool
    version: str
    detail: str | None = None


class StrategyOut(BaseModel):
    name: str
    summary: str
    options: list[str]


class Catalog(BaseModel):
    architectures: list[str]
    datasets: list[str]
    strategies: list[StrategyOut]
    metrics: list[str]
    objectives: list[str]
    export_formats: list[str]
