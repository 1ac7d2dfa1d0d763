"""Service settings (pydantic-settings): environment variables prefixed ``AUTOPRUNE_``, built in the app factory
and the worker main, never at import time."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOPRUNE_", extra="ignore")

    data_dir: Path = Path("autoprune-data")
    """Where the embedded default keeps its SQLite file, artefacts and generated API key."""
    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///<data_dir>/autoprune.db``. PostgreSQL: ``postgresql+psycopg://...``."""
    artefact_dir: Path | None = None
    """Content-addressed files (uploads, exported models); default ``<data_dir>/artefacts``."""
    api_keys: list[str] = Field(default_factory=list)
    """Accepted bearer keys (env: a JSON list or comma-separated). Empty: ``serve`` generates one into
    ``<data_dir>/api-key``."""
    max_upload_bytes: int = 512 * 1024 * 1024
    lease_seconds: float = 30.0
    """A running job whose worker has not renewed its lease for this long is reclaimed."""
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    """How often an idle worker looks for queued jobs."""

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'autoprune.db').resolve()}"

    @property
    def artefacts(self) -> Path:
        return (self.artefact_dir or self.data_dir / "artefacts").resolve()
