"""RFC 9457 problem details (``application/problem+json``) for every error the API returns.

Handlers cover the API's own :class:`Problem`, routing errors (404, 405), request validation (422, with the
field errors; malformed JSON is a 400), the repository's typed errors (NotFound -> 404, Conflict -> 409), a
too-large upload (413) and, last, any other exception (500, without internals in the body).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.artefacts import TooLarge
from service.db.repository import Conflict, LeaseLost, NotFound

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://autoprune.dev/problems/"
log = logging.getLogger("autoprune.api")


class ProblemModel(BaseModel):
    """An RFC 9457 problem document (the schema the OpenAPI document advertises for errors)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.title = title
        self.headers = dict(headers or {})
        self.extra = extra


def _slug(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")
    except ValueError:
        return "error"


def problem_response(
    request: Request,
    status: int,
    detail: str | None,
    *,
    slug: str | None = None,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body: dict[str, Any] = {
        "type": TYPE_BASE + (slug or _slug(status)),
        "title": title or phrase,
        "status": status,
        "detail": detail,
        "instance": _clip(request.url.path),
        **extra,
    }
    return JSONResponse(
        jsonable_encoder(body), status_code=status, headers=dict(headers or {}), media_type=PROBLEM_MEDIA_TYPE
    )


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route serves on this path (Starlette's own 405 names the first route's only)."""
    from starlette.routing import Match

    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def _clip(text: str, limit: int = 200) -> str:
    """A request path as a problem names it: never echoed at length (a 10,000-character id is cut)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        item = {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        out.append(item)
    return out


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            request, exc.status, exc.detail, slug=exc.slug, title=exc.title, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else None
        if exc.status_code == 404 and detail in (None, "Not Found"):
            detail = f"no route for {request.url.path}"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
            if detail in (None, "Method Not Allowed"):
                detail = f"{request.method} is not allowed on {request.url.path}" + (
                    f" (allowed: {', '.join(allowed)})" if allowed else ""
                )
        return problem_response(request, exc.status_code, detail, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        if any(e["type"] == "json_invalid" for e in errors):
            msgs = "; ".join(e["msg"] for e in errors if e["type"] == "json_invalid")
            return problem_response(
                request, 400, f"the request body is not valid JSON ({msgs})", slug="malformed-json", errors=errors
            )
        summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        return problem_response(request, 422, f"invalid request: {summary}", slug="validation-error", errors=errors)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return problem_response(request, 404, str(exc) or "not found")

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return problem_response(request, 409, str(exc) or "conflict")

    @app.exception_handler(LeaseLost)
    async def _lease(request: Request, exc: LeaseLost) -> JSONResponse:  # not expected from API calls
        return problem_response(request, 409, str(exc) or "lease lost")

    @app.exception_handler(TooLarge)
    async def _too_large(request: Request, exc: TooLarge) -> JSONResponse:
        return problem_response(request, 413, str(exc), headers={"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # not the server's fault and nobody is left to answer: one line in the log, no traceback
        log.warning("client went away during %s %s (request body incomplete)", request.method, _clip(request.url.path))
        return problem_response(request, 400, "the client closed the connection before sending the whole body")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, f"internal error ({type(exc).__name__}); see the server log")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries advertising problem+json for ``statuses``."""
    return {
        s: {
            "description": HTTPStatus(s).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemModel"}}},
        }
        for s in statuses
    }
