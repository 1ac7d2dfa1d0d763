"""Service settings (pydantic-settings): environment variables prefixed ``AUTOPRUNE_``, built in the app factory
and the worker main, never at import time."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_KEY_LENGTH = 16
"""Shortest API key accepted: ``secrets.token_urlsafe(32)`` (what ``serve`` generates) is 43 characters."""
PLACEHOLDER_KEYS = frozenset({"change-me", "changeme", "secret", "password", "api-key", "apikey", "test"})
"""Keys refused whatever their length: examples copied from documentation."""


def parse_key_list(value: Any) -> Any:
    """``AUTOPRUNE_API_KEYS`` as written: a JSON list (``["k1", "k2"]``), comma-separated (``k1,k2``) or one key
    (``k1``); blanks dropped. pydantic-settings would JSON-decode a list field and fail on the last two."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"AUTOPRUNE_API_KEYS looks like a JSON list but is not valid JSON: {exc}") from None
        else:
            value = text.split(",")
    if isinstance(value, list | tuple):
        return [k.strip() if isinstance(k, str) else k for k in value if not (isinstance(k, str) and not k.strip())]
    return value


def weak_key_reason(key: str) -> str | None:
    """Why ``key`` is too weak to guard the API (None when it is not)."""
    if key.lower() in PLACEHOLDER_KEYS:
        return "is a placeholder from an example"
    if len(key) < MIN_KEY_LENGTH:
        return f"is {len(key)} characters long (at least {MIN_KEY_LENGTH})"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOPRUNE_", extra="ignore")

    data_dir: Path = Path("autoprune-data")
    """Where the embedded default keeps its SQLite file, artefacts and generated API key."""
    database_url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///<data_dir>/autoprune.db``. PostgreSQL: ``postgresql+psycopg://...``."""
    artefact_dir: Path | None = None
    """Content-addressed files (uploads, exported models); default ``<data_dir>/artefacts``."""
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted bearer keys (env: a JSON list, comma-separated, or one key), each at least
    :data:`MIN_KEY_LENGTH` characters and no placeholder (checked by the API, see :func:`weak_key_reason`).
    Empty: ``serve`` generates one into ``<data_dir>/api-key``."""
    max_upload_bytes: int = 512 * 1024 * 1024
    lease_seconds: float = 30.0
    """A running job whose worker has not renewed its lease for this long is reclaimed."""
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    """How often an idle worker looks for queued jobs."""

    study_storage: str | None = None
    """Optuna storage URL of the studies that jobs with ``workers > 1`` share; default: the service's own
    database when it is PostgreSQL (schema ``optuna``). Operator configuration only: the API refuses a job's
    ``strategy_options.storage``."""

    measure_lock: bool = True
    """Workers on this host take per-core measurement locks while they time latency, so that two of them never
    time on the same cores at once (pinned to disjoint cores with ``--cpus``, they never wait for each other)."""
    measure_lock_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "autoprune-measure")
    """The lock files' directory: one every worker of this host sees (in containers: a shared volume)."""
    measure_lock_timeout_s: float = Field(default=30.0, ge=0)
    """Longest wait for the locks; then the figure is timed anyway and recorded as ``exclusive="timeout"``."""
    export_front: Literal["eager", "lazy"] = "eager"
    """``AUTOPRUNE_EXPORT_FRONT``: a job's worker exports its best point, then the job succeeds; ``eager`` then
    queues the rest of the front as background exports (any idle worker makes them), ``lazy`` exports other
    points only on request (``POST /v1/jobs/{id}/exports``)."""
    export_request_retention_s: float = Field(default=86400.0, gt=0)
    """``AUTOPRUNE_EXPORT_REQUEST_RETENTION_S``: done and failed export requests older than this are deleted by
    the workers (the exported files and their ``exports`` rows stay; a later request of an exported point is
    answered from the file at once)."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return parse_key_list(value)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'autoprune.db').resolve()}"

    @property
    def latency_host(self) -> dict[str, Any]:
        """This host's measurement settings for :meth:`autoprune.job.JobSpec.latency_config`."""
        if not self.measure_lock:
            return {}
        return {"lock_dir": str(self.measure_lock_dir), "lock_timeout_s": self.measure_lock_timeout_s}

    @property
    def artefacts(self) -> Path:
        return (self.artefact_dir or self.data_dir / "artefacts").resolve()


class InvalidSettings(ValueError):
    """The service's configuration cannot be used; the message is one line naming the variable."""


def load_settings(**overrides: Any) -> Settings:
    """:class:`Settings` from the environment (``overrides`` win), with pydantic's errors turned into one
    :class:`InvalidSettings` line that names the ``AUTOPRUNE_`` variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "_".join(str(p) for p in first.get("loc", ())).upper() or "?"
        raise InvalidSettings(f"AUTOPRUNE_{name}: {first.get('msg', 'invalid value')}") from None
    except SettingsError as exc:
        raise InvalidSettings(str(exc).splitlines()[0]) from None


def check_api_keys(keys: list[str]) -> None:
    """:class:`InvalidSettings` naming the first key too weak to guard the API (the key itself is not shown)."""
    for i, key in enumerate(keys):
        reason = weak_key_reason(key)
        if reason is not None:
            raise InvalidSettings(
                f"AUTOPRUNE_API_KEYS: key {i + 1} of {len(keys)} {reason}; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`, or leave AUTOPRUNE_API_KEYS unset "
                "and `autoprune serve` writes one into <data_dir>/api-key"
            )
