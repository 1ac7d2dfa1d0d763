"""The service's database: typed models, Alembic migrations, engines and the repository (every query)."""

from service.db.engine import ensure_schema, make_engine, normalize_url, upgrade
from service.db.repository import ALLOWED, Conflict, LeaseLost, NotFound, Page, Repository, RepositoryError

__all__ = [
    "ALLOWED",
    "Conflict",
    "LeaseLost",
    "NotFound",
    "Page",
    "Repository",
    "RepositoryError",
    "ensure_schema",
    "make_engine",
    "normalize_url",
    "upgrade",
]
