"""The REST API (FastAPI, under ``/v1``): validates, writes rows, reads rows; never imports torch."""

from __future__ import annotations

from service.api.app import create_app

__all__ = ["create_app"]
