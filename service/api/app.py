"""The FastAPI application factory. The API process validates, writes rows and reads rows; it never imports
torch, Optuna or stable-baselines3 (a test checks it).

    uvicorn --factory service.api.app:app_from_env       # settings from AUTOPRUNE_* environment variables
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

import autoprune
from service.api import catalog, dashboard, inputs, jobs, problems
from service.api.auth import require_key
from service.api.events import EventHub
from service.api.schemas import Catalog, Health, StrategyOut, WorkerHealth
from service.artefacts import ArtefactStore
from service.db.repository import Repository
from service.settings import InvalidSettings, Settings, check_api_keys, load_settings

log = logging.getLogger("autoprune.api")


class WorkerStatus(Protocol):
    """What ``/health`` reads of an embedded worker (:class:`service.supervisor.WorkerSupervisor`)."""

    def status(self) -> dict[str, Any]: ...


DESCRIPTION = """Prune PyTorch models for real, measure their latency, and search per-group pruning ratios.

Upload a model (`POST /v1/models`) and a dataset (`POST /v1/datasets`), create a job (`POST /v1/jobs`), watch it
(`GET /v1/jobs/{id}/events`, Server-Sent Events) and download the best model (`GET /v1/jobs/{id}/models/best`).
Every `/v1` route needs `Authorization: Bearer <API key>`; every error is an RFC 9457 problem document
(`application/problem+json`)."""

DOCS_ASSETS = "/docs/assets"
DOCS_SPEC = "/docs/openapi-3.0.json"


def read_key_file(data_dir: Path) -> list[str]:
    path = data_dir / "api-key"
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError:
        return []
    return [key] if key else []


MAX_JSON_BODY_BYTES = 64 * 1024
"""The largest JSON request body (a job, a built-in dataset); files travel as raw uploads with their own limit."""


class JsonBodyCap:
    """ASGI middleware: a JSON request body over :data:`MAX_JSON_BODY_BYTES` is a 413 problem, whether its
    ``Content-Length`` says so up front or a chunked body grows past it (the rest is not read)."""

    def __init__(self, app: Any, max_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not headers.get("content-type", "").split(";")[0].strip().lower().endswith("json"):
            await self.app(scope, receive, send)
            return
        message = f"a JSON request body is at most {self.max_bytes} bytes"
        declared = headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        body = b""
        more = not too_large
        while more:  # a JSON body is small: read it here, up to the cap, and hand it on whole
            event = await receive()
            if event["type"] != "http.request":
                break
            body += event.get("body", b"")
            more = event.get("more_body", False)
            too_large = len(body) > self.max_bytes
            if too_large:
                break
        if too_large:
            from starlette.requests import Request

            from service.api.problems import problem_response

            response = problem_response(Request(scope), 413, message, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(
    settings: Settings | None = None, *, sse_poll_seconds: float = 0.5, worker: WorkerStatus | None = None
) -> FastAPI:
    """The API app for ``settings`` (built from the environment when omitted). Keys: ``settings.api_keys``, or
    the key ``autoprune serve`` wrote into ``<data_dir>/api-key``; without any the app refuses to start.

    ``worker``: the embedded worker's supervisor (``autoprune serve``), whose state ``/health`` reports."""
    from service.db.engine import make_engine

    settings = settings or load_settings()
    keys = [k for k in settings.api_keys if k] or read_key_file(settings.data_dir)
    if not keys:
        raise InvalidSettings(
            "no API key configured: set AUTOPRUNE_API_KEYS or run `autoprune serve`, which writes one "
            f"into {settings.data_dir / 'api-key'}"
        )
    check_api_keys(keys)
    engine = make_engine(settings.db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.events.close()
        engine.dispose()

    app = FastAPI(
        title="autoprune",
        version=autoprune.__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.repo = Repository(engine)
    app.state.store = ArtefactStore(settings.artefacts)
    app.state.api_keys = keys
    app.state.sse_poll_seconds = sse_poll_seconds
    app.state.events = EventHub(app.state.repo, sse_poll_seconds)
    problems.install(app)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    v1.include_router(inputs.router, tags=["inputs"])
    v1.include_router(jobs.router, tags=["jobs"])

    @v1.get("/catalog", response_model=Catalog, tags=["meta"], responses=problems.problem_responses(401))
    def get_catalog() -> Catalog:
        """Names the API accepts: architectures, built-in datasets, strategies (with their options), metrics."""
        from agents import STORAGE_OPTIONS, list_strategies
        from autoprune.job import JobSpec
        from autoprune.names import METRICS
        from autoprune.reward import FORMS

        return Catalog(
            architectures=catalog.architectures(),
            datasets=list(catalog.BUILTIN_DATASETS),
            strategies=[
                StrategyOut(name=s.name, summary=s.summary, options=[o for o in s.options if o not in STORAGE_OPTIONS])
                for s in list_strategies()
            ],
            default_strategy=next(k.default for k in JobSpec.knobs() if k.name == "strategy"),
            metrics=list(METRICS),
            objectives=list(FORMS),
            export_formats=list(catalog.EXPORT_FORMATS),
        )

    app.include_router(v1)
    app.add_middleware(JsonBodyCap)

    @app.get("/health", response_model=Health, tags=["meta"], responses={503: {"model": Health}})
    def health() -> Any:
        """Liveness, database reachability and (under ``autoprune serve``) the embedded worker; no key needed.

        200 ``ok``; 200 ``degraded`` while the embedded worker is being restarted; 503 ``unavailable`` when the
        database is unreachable or the embedded worker was given up on (it kept dying at start)."""
        embedded = WorkerHealth(**worker.status()) if worker is not None else None
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            body = Health(
                status="unavailable", database=False, version=autoprune.__version__, detail=detail, worker=embedded
            )
            return JSONResponse(body.model_dump(), status_code=503)
        if embedded is None or embedded.state in ("running", "starting"):
            return Health(status="ok", database=True, version=autoprune.__version__, worker=embedded)
        why = "the embedded worker died" + (f": {embedded.last_exit}" if embedded.last_exit else "")
        if embedded.state == "restarting":
            detail = f"{why}; restarting it (restart {embedded.restarts + 1})"
            return Health(
                status="degraded", database=True, version=autoprune.__version__, detail=detail, worker=embedded
            )
        detail = f"{why}, and kept dying: it is not restarted, nothing runs queued jobs (start `autoprune worker`)"
        body = Health(
            status="unavailable", database=True, version=autoprune.__version__, detail=detail, worker=embedded
        )
        return JSONResponse(body.model_dump(), status_code=503)

    _install_docs(app)
    app.include_router(dashboard.router)  # the web dashboard at / (its data calls go through /v1 with a key)
    return app


def _install_docs(app: FastAPI) -> None:
    """Swagger UI from the ``swagger_ui_bundle`` package (no CDN), and an OpenAPI document it can render."""
    import swagger_ui_bundle

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)), name="swagger-ui")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps["ProblemModel"] = problems.ProblemModel.model_json_schema()
            from service.api.schemas import DatasetBuiltin

            comps.setdefault("DatasetBuiltin", DatasetBuiltin.model_json_schema())
            _errors_as_problems(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=DOCS_SPEC,
            title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    @app.get(DOCS_SPEC, include_in_schema=False)
    def docs_spec() -> JSONResponse:
        return JSONResponse(openapi_30(app.openapi()))


def _errors_as_problems(schema: dict[str, Any]) -> None:
    """Every documented error answer is problem+json (FastAPI documents its 422 as ``HTTPValidationError``)."""
    problem = {problems.PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemModel"}}}
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            for code, response in op["responses"].items():
                if str(code)[0] in "45" and str(code) != "503":
                    response["content"] = dict(problem)
                    if str(code) == "422":
                        response["description"] = "Validation error (the field errors are in `errors`)"
    comps = schema.get("components", {}).get("schemas", {})
    text = json.dumps(schema.get("paths", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}" not in text:
            comps.pop(name, None)


def openapi_30(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document rewritten for the bundled Swagger UI 4, which renders OpenAPI 3.0 only:
    ``anyOf [X, null]`` / ``type: [X, null]`` become ``nullable``, ``const`` an ``enum``, schema ``examples`` an
    ``example`` and numeric ``exclusiveMinimum``/``Maximum`` the 3.0 booleans. ``/openapi.json`` stays 3.1."""
    doc = copy.deepcopy(schema)
    doc["openapi"] = "3.0.3"

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: walk(v) for k, v in node.items()}
        for key in ("anyOf", "oneOf"):
            alts = node.get(key)
            if isinstance(alts, list) and any(a == {"type": "null"} for a in alts):
                rest = [a for a in alts if a != {"type": "null"}]
                node.pop(key)
                node["nullable"] = True
                if len(rest) == 1 and "$ref" not in rest[0]:
                    node = {**rest[0], **node}
                elif len(rest) == 1:
                    node["allOf"] = rest
                elif rest:
                    node[key] = rest
        t = node.get("type")
        if isinstance(t, list):
            others = [x for x in t if x != "null"]
            if "null" in t:
                node["nullable"] = True
            node["type"] = others[0] if len(others) == 1 else others
            if isinstance(node["type"], list):
                node.pop("type")
        if "const" in node and "enum" not in node:
            node["enum"] = [node.pop("const")]
        if isinstance(node.get("examples"), list) and "type" in node:
            ex = node.pop("examples")
            if ex:
                node["example"] = ex[0]
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            v = node.get(bound)
            if isinstance(v, int | float) and not isinstance(v, bool):
                node[plain] = v
                node[bound] = True
        if node.get("contentMediaType") == "application/octet-stream":
            node.pop("contentMediaType")
            node["format"] = "binary"
        return node

    doc = walk(doc)
    doc["openapi"] = "3.0.3"
    return doc  # type: ignore[no-any-return]


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from the environment."""
    return create_app(load_settings())
