"""``/v1/jobs``: create (validated by ``JobSpec.validate()``, torch-free; ``Idempotency-Key`` honoured), list,
get, cancel, live events (SSE), evaluations, the Pareto front, export requests (``/exports``: a point of a job,
running or finished, in a format, made by a worker) and downloads of exported models."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from autoprune.errors import AutopruneError
from autoprune.job import JobSpec
from autoprune.names import MEDIA_TYPES, SUFFIXES
from service.api import deps
from service.api.events import EventHub
from service.api.problems import PROBLEM_MEDIA_TYPE, Problem, problem_responses
from service.api.schemas import (
    EvaluationOut,
    EvaluationPage,
    ExportOut,
    ExportRequestCreate,
    ExportRequestList,
    ExportRequestOut,
    JobCreate,
    JobOut,
    JobPage,
    Pareto,
)
from service.artefacts import ArtefactStore
from service.db.engine import check_job_workers, check_no_storage_options
from service.db.models import TERMINAL_STATES, EvaluationRow, ExportRow, JobRow, JobState
from service.db.repository import NotFound, Repository
from service.settings import Settings

router = APIRouter()

JobId = Annotated[str, Path(min_length=1, max_length=64)]
RepoDep = Annotated[Repository, Depends(deps.repo)]
StoreDep = Annotated[ArtefactStore, Depends(deps.store)]
StateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Format = Literal["onnx", "safetensors", "pt2"]
Stage = Literal["search", "finetuned"]

SPEC_KEYS = tuple(k for k in JobCreate.model_fields if k not in ("model_id", "dataset_id"))


def _terminal(state: str) -> bool:
    return state in TERMINAL_STATES


# --- create / list / get / cancel ------------------------------------------------------------------------------


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    summary="Create a search job",
    responses={
        200: {"description": "The job created earlier with the same Idempotency-Key and body", "model": JobOut},
        **problem_responses(400, 401, 409, 422),
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    repo: RepoDep,
    settings: Annotated[Settings, Depends(deps.settings)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="Repeat a request safely: the same key and body return the same job (200); "
            "the same key with another body is a 409.",
        ),
    ] = None,
) -> JobOut:
    try:
        model = repo.get_model(body.model_id)
    except NotFound:
        raise Problem(422, f"no model with id {body.model_id!r} (upload one with POST /v1/models)") from None
    try:
        dataset = repo.get_dataset(body.dataset_id)
    except NotFound:
        raise Problem(422, f"no dataset with id {body.dataset_id!r} (create one with POST /v1/datasets)") from None
    knobs: dict[str, Any] = body.model_dump(include=set(SPEC_KEYS))
    spec = JobSpec(
        model=model.architecture or "model.pt2",
        data=dataset.builtin or "dataset",
        kwargs=dict(model.kwargs or {}),
        **{**knobs, "export_formats": tuple(knobs["export_formats"])},
    )
    try:
        check_no_storage_options(body.strategy_options)
        spec.validate()
        check_job_workers(body.workers, settings.db_url, settings.study_storage)
    except AutopruneError as exc:
        raise Problem(422, str(exc).splitlines()[0], slug="invalid-job") from None
    if body.metric == "accuracy" and dataset.info.get("labelled") is False:
        raise Problem(
            422,
            "metric 'accuracy' needs labels but the dataset has none; use agreement, kl or cosine",
            slug="invalid-job",
        )
    # "the same request" is judged by content: the model and dataset by what they are (a client that retries a
    # submit re-uploads the same files and gets new ids), the settings with their defaults filled in
    same = {
        "model": [model.kind, model.architecture, model.kwargs, model.artefact_sha256],
        "dataset": [dataset.kind, dataset.builtin, dataset.artefact_sha256],
        "spec": body.model_dump(mode="json", include=set(SPEC_KEYS)),
    }
    request_hash = hashlib.sha256(json.dumps(same, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    job, created = repo.create_job(
        model_id=model.id,
        dataset_id=dataset.id,
        spec=knobs,
        progress_total=body.budget,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.get("/jobs", response_model=JobPage, responses=problem_responses(401, 422))
def list_jobs(
    repo: RepoDep,
    state: Annotated[StateName | None, Query(description="Only jobs in this state.")] = None,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobPage:
    """Newest first."""
    page = repo.list_jobs(state=state, offset=offset, limit=limit)
    return JobPage(items=[JobOut.of(j) for j in page.items], total=page.total, offset=page.offset, limit=page.limit)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=problem_responses(401, 404))
def get_job(job_id: JobId, repo: RepoDep) -> JobOut:
    return JobOut.of(repo.get_job(job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=problem_responses(401, 404, 409))
def cancel_job(job_id: JobId, repo: RepoDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops within one evaluation (``cancel_requested``
    until its worker moves it to ``cancelled``); a finished one is a 409."""
    return JobOut.of(repo.request_cancel(job_id))


# --- live events -------------------------------------------------------------------------------------------------


def _existing_job(job_id: JobId, repo: RepoDep) -> JobRow:
    """Looked up in a dependency, so a 404 is answered before the event stream starts."""
    return repo.get_job(job_id)


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Live progress (Server-Sent Events)",
    responses=problem_responses(401, 404, 422),
)
async def job_events(
    request: Request,
    job: Annotated[JobRow, Depends(_existing_job)],
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=20, description="Resume after this event id (set by EventSource)."),
    ] = None,
    after: Annotated[int | None, Query(ge=0, description="Resume after this event id (like Last-Event-ID).")] = None,
    follow_exports: Annotated[
        bool,
        Query(
            description="Go on past the terminal state until none of the job's exports is queued or running "
            "(their `export` events)."
        ),
    ] = False,
) -> AsyncIterator[ServerSentEvent]:
    """First a ``snapshot`` event (the job as ``GET /v1/jobs/{id}`` returns it), then one event per stored job
    event after ``Last-Event-ID`` (all of them without it): ``state`` (a transition) and ``evaluation`` (one
    recorded evaluation, with progress), ``export`` (one export done or failed: point, format, done/total of the
    job's exports, seconds, ok, phase), ``log``, ``finetune``. Event ids are the job-event ids. The stream ends
    after the event that moves the job to a terminal state (or at once when the job already finished and nothing
    is left to send); with ``follow_exports``, once the job has finished and its last queued export is made."""
    cursor = after or 0
    if last_event_id is not None:
        with contextlib.suppress(ValueError):  # a foreign id: ignore it
            cursor = max(cursor, int(last_event_id))
    hub: EventHub = request.app.state.events
    yield ServerSentEvent(event="snapshot", data=JobOut.of(job).model_dump(mode="json"), retry=2000)
    if follow_exports:  # the short tail after a job: one poller per such stream
        async for event in hub.follow(job.id, cursor):
            yield event
        return
    # one poller per job, whatever the number of watchers (service.api.events)
    async for event in hub.stream(job.id, cursor, finished=_terminal(job.state)):
        yield event


# --- results -------------------------------------------------------------------------------------------------------


@router.get("/jobs/{job_id}/evaluations", response_model=EvaluationPage, responses=problem_responses(401, 404, 422))
def job_evaluations(
    job_id: JobId,
    repo: RepoDep,
    stage: Annotated[Stage | None, Query()] = None,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EvaluationPage:
    """Every evaluation of the job (search stage first, then the fine-tuned points), paginated."""
    repo.get_job(job_id)
    page = repo.evaluations(job_id, stage=stage, offset=offset, limit=limit)
    return EvaluationPage(
        items=[EvaluationOut.of(e) for e in page.items], total=page.total, offset=page.offset, limit=page.limit
    )


@router.get("/jobs/{job_id}/pareto", response_model=Pareto, responses=problem_responses(401, 404))
def job_pareto(job_id: JobId, repo: RepoDep) -> Pareto:
    """The current Pareto front (quality up, measured latency down) and the best point under the job's
    ``select`` rule."""
    job = repo.get_job(job_id)
    return Pareto(
        job_id=job.id, state=job.state, best=job.best, points=[EvaluationOut.of(e) for e in repo.front(job_id)]
    )


def _export_url(row: ExportRow) -> str:
    return f"/v1/jobs/{row.job_id}/models/{row.index}?format={row.format}&stage={row.stage}"


def _artefact_file(repo: Repository, store: ArtefactStore, row: ExportRow) -> tuple[Any, str]:
    """(path or None, media type) of an export's stored file (named by hash + the suffix stored with it)."""
    try:
        artefact = repo.get_artefact(row.artefact_sha256)
    except NotFound:
        return None, ""
    path = store.path_for(row.artefact_sha256, artefact.suffix or "")
    return (path if path.is_file() else None), artefact.media_type or MEDIA_TYPES.get(row.format, "")


def _size(repo: Repository, store: ArtefactStore, row: ExportRow) -> int | None:
    path, _ = _artefact_file(repo, store, row)
    return None if path is None else int(path.stat().st_size)


@router.get("/jobs/{job_id}/models", response_model=list[ExportOut], responses=problem_responses(401, 404))
def job_models(job_id: JobId, repo: RepoDep, store: StoreDep) -> list[ExportOut]:
    """The exported models of the job (front points / the best, per format)."""
    repo.get_job(job_id)
    return [ExportOut.of(r, _size(repo, store, r), _export_url(r)) for r in repo.exports(job_id)]


def _best_point(job: JobRow) -> tuple[int, str] | None:
    best = job.best or {}
    if not isinstance(best.get("index"), int):
        return None
    return best["index"], str(best.get("stage") or "search")


def _resolve_export(repo: Repository, job_id: str, point: str, format: str, stage: str | None) -> ExportRow:
    job = repo.get_job(job_id)
    if point == "best" and not _terminal(job.state):
        raise Problem(
            409,
            f"job {job.id} is {job.state}: its best point is chosen and exported when it finishes (a numbered "
            f"point can be requested now: POST /v1/jobs/{job.id}/exports)",
            slug="job-not-finished",
        )
    exports = [e for e in repo.exports(job_id) if e.format == format]
    if point == "best":
        marked = [e for e in exports if (e.meta or {}).get("best") is True]
        best = _best_point(job)
        if marked:
            found = marked[0]
        elif best is not None:
            found = next((e for e in exports if (e.index, e.stage) == best), None)  # type: ignore[assignment]
        else:
            found = None  # type: ignore[assignment]
        if found is None:
            if best is not None:
                _raise_if_failed(repo, job, best[0], best[1], format, "its best point")
            why = "" if job.state == JobState.succeeded.value else f" (the job {job.state})"
            raise Problem(
                404,
                f"job {job.id} has no {format} export of its best point{why}; request one with "
                f"POST /v1/jobs/{job.id}/exports",
                slug="no-export",
            )
        return found
    try:
        index = int(point)
        if index < 0:
            raise ValueError
    except ValueError:
        raise Problem(422, f"point must be 'best' or an evaluation index, got {point!r}") from None
    matches = [e for e in exports if e.index == index and (stage is None or e.stage == stage)]
    if not matches:
        for st in [stage] if stage is not None else ["finetuned", "search"]:
            _raise_if_failed(repo, job, index, st, format, f"point {index} ({st})")
        have = sorted({f"{e.index} ({e.stage})" for e in exports})
        raise Problem(
            404,
            f"point {index}{f' ({stage})' if stage else ''} of job {job.id} was not exported as {format}"
            + (f"; exported points: {', '.join(have)}" if have else "")
            + f"; request it with POST /v1/jobs/{job.id}/exports",
            slug="no-export",
        )
    # the same plan after fine-tuning is the better model of that point
    return sorted(matches, key=lambda e: e.stage != "finetuned")[0]


def _raise_if_failed(repo: Repository, job: JobRow, index: int, stage: str, format: str, what: str) -> None:
    """A 404 ``export-failed`` problem saying why, when the last export of that point in ``format`` failed."""
    failed = repo.failed_export(job.id, index=index, stage=stage, format=format)
    if failed is not None:
        raise Problem(
            404,
            f"the {format} export of {what} of job {job.id} failed: {failed.error or 'no reason recorded'}; "
            f"request it again with POST /v1/jobs/{job.id}/exports",
            slug="export-failed",
        )


def _find_evaluation(repo: Repository, job_id: str, index: int, stage: str) -> EvaluationRow | None:
    for e in repo.front(job_id):
        if (e.index, e.stage) == (index, stage):
            return e
    offset = 0
    while True:
        page = repo.evaluations(job_id, stage=stage, offset=offset, limit=500)
        for e in page.items:
            if e.index == index:
                return e  # type: ignore[no-any-return]
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return None


PointPath = Annotated[str, Path(description="`best` or an evaluation index.", pattern=r"^(best|[0-9]{1,9})$")]
FormatQuery = Annotated[Format, Query(description="onnx, safetensors (a zip with the plan) or pt2.")]
StageQuery = Annotated[Stage | None, Query(description="search or finetuned (default: finetuned if exported).")]


@dataclass(frozen=True)
class _ExportRequest:
    """What ``/jobs/{job_id}/models/{point}`` and its ``/meta`` name: the parameters and the export they resolve to."""

    job_id: str
    point: str
    stage: Stage | None
    row: ExportRow
    repo: Repository
    store: ArtefactStore


def _export_request(
    job_id: JobId,
    point: PointPath,
    repo: RepoDep,
    store: StoreDep,
    format: FormatQuery = "onnx",
    stage: StageQuery = None,
) -> _ExportRequest:
    """The parameters of the model endpoints, resolved by :func:`_resolve_export` (409, 404, 422)."""
    return _ExportRequest(job_id, point, stage, _resolve_export(repo, job_id, point, format, stage), repo, store)


ExportRequest = Annotated[_ExportRequest, Depends(_export_request)]


@router.get(
    "/jobs/{job_id}/models/{point}",
    response_class=FileResponse,
    summary="Download an exported model",
    responses={
        200: {
            "description": "The model file",
            "content": {"application/onnx": {}, "application/zip": {}, "application/octet-stream": {}},
        },
        **problem_responses(401, 404, 409, 422),
    },
)
def download_model(req: ExportRequest) -> FileResponse:
    """The stored export of a point (or ``best``) in ``format``; its metadata at ``.../meta``. A numbered point
    is served as soon as its export is done, while the job still runs too; ``best`` is a 409 until the job has
    finished (the best point is chosen then). 404 when that point or format was not exported (``export-failed``,
    with the error, when its export failed)."""
    row, stage = req.row, req.stage
    path, media_type = _artefact_file(req.repo, req.store, row)
    if path is None:
        raise Problem(404, f"the stored file of this export is missing from the artefact store ({row.artefact_sha256})")
    meta_url = f"/v1/jobs/{row.job_id}/models/{req.point}/meta?format={row.format}" + (
        f"&stage={stage}" if stage else ""
    )
    headers = {
        "ETag": f'"{row.artefact_sha256}"',
        "X-Autoprune-Sha256": row.artefact_sha256,
        "X-Autoprune-Point": f"{row.stage}/{row.index}",
        "Link": f'<{meta_url}>; rel="describedby"',
    }
    filename = f"job-{row.job_id[:12]}-{row.stage}-{row.index}{SUFFIXES[row.format]}"
    return FileResponse(path, media_type=media_type or MEDIA_TYPES[row.format], filename=filename, headers=headers)


class ModelMeta(ExportOut):
    evaluation: EvaluationOut | None


@router.get(
    "/jobs/{job_id}/models/{point}/meta", response_model=ModelMeta, responses=problem_responses(401, 404, 409, 422)
)
def model_meta(req: ExportRequest) -> ModelMeta:
    """What the export report recorded (verification, re-measured latency) and the point's evaluation."""
    row = req.row
    ev = _find_evaluation(req.repo, req.job_id, row.index, row.stage)
    base = ExportOut.of(row, _size(req.repo, req.store, row), _export_url(row))
    return ModelMeta(**base.model_dump(), evaluation=EvaluationOut.of(ev) if ev is not None else None)


# --- export requests -----------------------------------------------------------------------------------------------

RequestId = Annotated[str, Path(min_length=1, max_length=64, description="An export request's id.")]


def _point_to_export(repo: Repository, job: JobRow, body: ExportRequestCreate) -> EvaluationRow:
    """The stored evaluation ``body`` names (404 if none)."""
    stage: str | None
    if body.point == "best":
        best = _best_point(job)
        if best is None:
            raise Problem(404, f"job {job.id} has no evaluations: there is no best point", slug="no-point")
        index, stage = best[0], body.stage or best[1]
    else:
        index, stage = int(body.point), body.stage
    stages = [stage] if stage is not None else ["finetuned", "search"]
    for st in stages:
        with contextlib.suppress(NotFound):
            return repo.evaluation(job.id, stage=st, index=index)
    raise Problem(
        404, f"job {job.id} has no {stage + ' ' if stage else ''}evaluation {index}", slug="no-point"
    )  # fmt: skip


@router.post(
    "/jobs/{job_id}/exports",
    status_code=202,
    response_model=ExportRequestOut,
    summary="Request the export of one point",
    responses={
        200: {"description": "The file exists already (`download_url`)", "model": ExportRequestOut},
        **problem_responses(401, 404, 409, 422),
    },
)
def request_export(job_id: JobId, body: ExportRequestCreate, response: Response, repo: RepoDep) -> ExportRequestOut:
    """Queue the export of a point (``best`` or an evaluation index) in one format: 202 with ``Location`` (the
    request; poll it until ``done``, then download ``download_url``), or 200 when the file exists already. A
    user's request goes before the workers' background exports. A running job's recorded points can be exported
    while it runs (its own worker makes the request between two of the job's steps, with the job's model and
    data, when no idle worker takes it first); ``best`` is then the best point so far. Cancelled and failed
    jobs' evaluations can be exported too. 409 for a point that cannot be rebuilt (fine-tuned before its weights
    were kept)."""
    job = repo.get_job(job_id)
    row = _point_to_export(repo, job, body)
    if row.stage == "finetuned" and row.weights_sha256 is None:
        raise Problem(
            409,
            f"fine-tuned point {row.index} of job {job.id} has no stored weights (it was fine-tuned before they were "
            "kept): it cannot be rebuilt without training it again",
            slug="point-not-rebuildable",
        )
    req, ready = repo.request_export(job.id, stage=row.stage, index=row.index, format=body.format, origin="user")
    out = ExportRequestOut.of(req)
    response.status_code = 200 if ready else 202
    response.headers["Location"] = out.url
    return out


@router.get("/jobs/{job_id}/exports", response_model=ExportRequestList, responses=problem_responses(401, 404))
def list_exports(job_id: JobId, repo: RepoDep) -> ExportRequestList:
    """The job's export requests (the best point's, made by the job's worker, included), in the order workers
    take them: a user's requests first, then the background exports of the front."""
    rows = repo.export_requests(job_id)
    items = [ExportRequestOut.of(r) for r in rows]
    done = sum(1 for r in rows if r.state in ("done", "failed"))
    return ExportRequestList(items=items, done=done, total=len(items), pending=len(items) - done)


@router.get(
    "/jobs/{job_id}/exports/{request_id}", response_model=ExportRequestOut, responses=problem_responses(401, 404)
)
def get_export_request(job_id: JobId, request_id: RequestId, repo: RepoDep) -> ExportRequestOut:
    """One export request: queued, running, done (``download_url``) or failed (``error``)."""
    repo.get_job(job_id)
    return ExportRequestOut.of(repo.get_export_request(job_id, request_id))


__all__ = ["PROBLEM_MEDIA_TYPE", "router"]
