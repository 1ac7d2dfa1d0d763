"""The web dashboard at ``/``: one static page, one script and one stylesheet from ``service/api/static/``.

The page itself needs no key and holds no data; it asks for an API key (kept in the tab's ``sessionStorage``)
and every data call it makes goes to the ``/v1`` API with ``Authorization: Bearer <key>``, so it sees exactly
what the key may see. Everything it loads comes from this server: the Pareto plot is SVG the script draws
itself, so there is no vendored plotting bundle and no CDN, and the Content-Security-Policy below makes the
browser refuse anything from elsewhere."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.problems import Problem

STATIC = Path(__file__).with_name("static")
ASSETS = "/dashboard"
"""URL prefix of the script and stylesheet (the page is ``/``)."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) so an upgraded server's page and script stay in step
}
_FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    """The dashboard page (no key needed: it holds no data)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get(f"{ASSETS}/{{name}}")
def asset(name: str) -> FileResponse:
    """The page's script and stylesheet (only these two names: nothing else of the folder is served)."""
    media_type = _FILES.get(name)
    if media_type is None:
        raise Problem(404, f"no dashboard asset {name[:60]!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=_HEADERS)
