"""Bearer API keys: ``Authorization: Bearer <key>`` on every ``/v1`` route (health and docs are open)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.problems import Problem

_bearer = HTTPBearer(auto_error=False, description="An API key from the server's settings (or `<data_dir>/api-key`).")


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"})


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The dependency guarding the API: the caller's key, or a 401 problem."""
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    given = credentials.credentials.encode()
    keys: list[str] = request.app.state.api_keys
    # compare against every key (constant time per key) so the answer's timing does not tell which one matched
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    if not ok:
        raise _unauthorized("invalid API key")
    return credentials.credentials
