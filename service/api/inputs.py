"""``/v1/models`` and ``/v1/datasets``: streamed uploads (the raw request body, not multipart), validated
without torch and stored in the content-addressed artefact store; rows written through the repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.api import catalog, deps, uploads
from service.api.problems import Problem, problem_responses
from service.api.schemas import DatasetBuiltin, DatasetOut, ModelOut
from service.artefacts import ArtefactStore
from service.db.repository import Repository
from service.settings import Settings

router = APIRouter()

_BINARY_TYPES = {"application/octet-stream", "application/zip", "application/x-zip-compressed"}
_MAX_JSON_BYTES = 64 * 1024
_BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}


def _media_type(request: Request) -> str | None:
    raw = request.headers.get("content-type")
    return raw.split(";", 1)[0].strip().lower() if raw else None


def _require_binary(request: Request, what: str) -> None:
    mt = _media_type(request)
    if mt is not None and mt not in _BINARY_TYPES:
        raise Problem(
            415,
            f"send the {what} file itself as the request body (Content-Type: application/octet-stream), "
            f"not {mt}" + (" (multipart form uploads are not accepted)" if mt.startswith("multipart/") else ""),
            slug="unsupported-media-type",
        )


def _invalid(exc: uploads.UploadInvalid) -> Problem:
    return Problem(exc.status, str(exc), slug="invalid-file" if exc.status == 422 else "unsupported-media-type")


async def _store_upload(
    request: Request, store: ArtefactStore, repo: Repository, settings: Settings, check: Any, suffix: str
) -> tuple[str | None, int, dict[str, Any]]:
    """Stream, validate with ``check(path) -> info`` (may return (info, suffix)), store; (sha256, size, info).

    An empty body gives (None, 0, {}) without calling ``check``."""
    async with uploads.receive(
        request.stream(), request.headers, max_bytes=settings.max_upload_bytes, directory=store.root
    ) as (path, size):
        if size == 0:
            return None, 0, {}
        try:
            result = await run_in_threadpool(check, path)
        except uploads.UploadInvalid as exc:
            raise _invalid(exc) from None
        info, suffix = result if isinstance(result, tuple) else (result, suffix)
        sha, stored = await run_in_threadpool(store.put_file, Path(path), suffix)
    media = "application/zip" if suffix in (".pt2", ".npz") else "application/octet-stream"
    await run_in_threadpool(repo.add_artefact, sha, stored, media, suffix)
    return sha, stored, info


RowId = Annotated[str, PathParam(min_length=1, max_length=64, description="The id the upload returned.")]


@router.post(
    "/models",
    status_code=201,
    response_model=ModelOut,
    summary="Upload a model",
    responses=problem_responses(400, 401, 413, 415, 422),
    openapi_extra={"requestBody": {"required": False, "content": {"application/octet-stream": _BINARY_BODY}}},
)
async def create_model(
    request: Request,
    response: Response,
    repo: Annotated[Repository, Depends(deps.repo)],
    store: Annotated[ArtefactStore, Depends(deps.store)],
    settings: Annotated[Settings, Depends(deps.settings)],
    architecture: Annotated[
        str | None,
        Query(
            max_length=100,
            description="Architecture name (`GET /v1/catalog`; case-insensitive). Required unless `format=pt2` "
            "(OpenAPI cannot state that one of two parameters is required; the server answers 422 without either).",
            json_schema_extra={"enum": catalog.architectures()},
        ),
    ] = None,
    kwargs: Annotated[str | None, Query(max_length=10000, description="Architecture kwargs, a JSON object.")] = None,
    format: Annotated[
        Literal["safetensors", "pt2"] | None,
        Query(description="`pt2` for a torch.export program; default: safetensors weights for `architecture`."),
    ] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> ModelOut:
    """The body is the raw file: safetensors weights for ``architecture`` (an empty body uses the shipped or
    initial weights), or with ``format=pt2`` a ``torch.export.save`` program. Nothing is unpickled."""
    if format == "pt2":
        if architecture is not None or kwargs is not None:
            raise Problem(422, "a .pt2 program carries its own architecture: give format=pt2 without architecture")
        _require_binary(request, ".pt2")
        sha, _, _info = await _store_upload(request, store, repo, settings, uploads.check_pt2, ".pt2")
        if sha is None:
            raise Problem(422, "the request body is empty: send the .pt2 file as the body")
        row = await run_in_threadpool(
            lambda: repo.create_model(
                name=name or "pt2 program", kind="pt2", architecture=None, kwargs={}, artefact_sha256=sha
            )
        )
    else:
        if architecture is None:
            raise Problem(422, "give architecture=<name> (with optional safetensors weights as the body) or format=pt2")
        arch = catalog.normalise_architecture(architecture)
        if arch is None:
            raise Problem(
                422,
                f"unknown architecture {architecture!r}; available: {', '.join(catalog.architectures())}",
                slug="unknown-architecture",
            )
        kw: dict[str, Any] = {}
        if kwargs is not None:
            try:
                kw = json.loads(kwargs)
            except ValueError:
                raise Problem(422, 'kwargs must be a JSON object, e.g. {"num_classes": 10}') from None
            if not isinstance(kw, dict):
                raise Problem(422, 'kwargs must be a JSON object, e.g. {"num_classes": 10}')
        if uploads.declared_length(request.headers) != 0:
            _require_binary(request, "safetensors")
        sha, _, _info = await _store_upload(request, store, repo, settings, uploads.check_weights, ".safetensors")
        row = await run_in_threadpool(
            lambda: repo.create_model(
                name=name or arch, kind="architecture", architecture=arch, kwargs=kw, artefact_sha256=sha
            )
        )
    response.headers["Location"] = f"/v1/models/{row.id}"
    return ModelOut.of(row)


@router.get("/models/{model_id}", response_model=ModelOut, responses=problem_responses(401, 404))
def get_model(model_id: RowId, repo: Annotated[Repository, Depends(deps.repo)]) -> ModelOut:
    return ModelOut.of(repo.get_model(model_id))


def _check_dataset(fmt: str | None) -> Any:
    def check(path: Path) -> tuple[dict[str, Any], str]:
        kind = fmt or uploads.sniff_dataset(path)
        if kind == "npz":
            return uploads.check_npz(path), ".npz"
        return uploads.check_safetensors_dataset(path), ".safetensors"

    return check


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a dataset or name a built-in one",
    responses=problem_responses(400, 401, 413, 415, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/DatasetBuiltin"}},
                "application/octet-stream": _BINARY_BODY,
            },
        }
    },
)
async def create_dataset(
    request: Request,
    response: Response,
    repo: Annotated[Repository, Depends(deps.repo)],
    store: Annotated[ArtefactStore, Depends(deps.store)],
    settings: Annotated[Settings, Depends(deps.settings)],
    format: Annotated[
        Literal["npz", "safetensors"] | None, Query(description="Format of the uploaded file (default: sniffed).")
    ] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> DatasetOut:
    """A JSON body ``{"builtin": "digits" | "mnist1d"}`` names a built-in dataset; any other body is the raw
    ``.npz`` / ``.safetensors`` file (arrays ``x``/``y`` or ``x_train``/``y_train``/``x_val``/``y_val``)."""
    if _media_type(request) == "application/json":
        if (uploads.declared_length(request.headers) or 0) > _MAX_JSON_BYTES:
            raise Problem(413, f"a JSON dataset request is at most {_MAX_JSON_BYTES} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > _MAX_JSON_BYTES:
                raise Problem(413, f"a JSON dataset request is at most {_MAX_JSON_BYTES} bytes")
        try:
            body = DatasetBuiltin.model_validate_json(raw or b"null")
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_url=False)]
            ) from None
        row = await run_in_threadpool(
            lambda: repo.create_dataset(
                name=name or body.name or body.builtin,
                kind="builtin",
                builtin=body.builtin,
                artefact_sha256=None,
                info={"builtin": body.builtin, "labelled": True},
            )
        )
    else:
        _require_binary(request, ".npz/.safetensors")
        sha, _, info = await _store_upload(request, store, repo, settings, _check_dataset(format), "")
        if sha is None:
            raise Problem(
                422, 'the request body is empty: send an .npz/.safetensors file, or JSON {"builtin": "digits"}'
            )
        row = await run_in_threadpool(
            lambda: repo.create_dataset(
                name=name or "uploaded", kind="file", builtin=None, artefact_sha256=sha, info=info
            )
        )
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return DatasetOut.of(row)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=problem_responses(401, 404))
def get_dataset(dataset_id: RowId, repo: Annotated[Repository, Depends(deps.repo)]) -> DatasetOut:
    return DatasetOut.of(repo.get_dataset(dataset_id))
