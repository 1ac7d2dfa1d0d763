"""Engines and migrations.

* SQLite (the embedded default): WAL journal, a 30 s busy timeout, foreign keys on, usable from several
  threads. Python's sqlite3 module is told not to manage transactions itself; SQLAlchemy's ``begin`` emits
  ``BEGIN`` — or ``BEGIN IMMEDIATE`` for a connection with the :data:`IMMEDIATE` execution option, which the
  repository sets on every *write* transaction: the write lock is taken up front, so two processes never
  interleave read-then-write (a claim is atomic across processes) and a writer waits on the busy timeout
  instead of failing with ``database is locked`` when it upgrades a read lock.
* PostgreSQL through psycopg 3 (``postgresql://`` and ``postgres://`` URLs are rewritten to
  ``postgresql+psycopg://``).

:func:`upgrade` runs the Alembic migrations in ``service/db/migrations`` to head with a Config built in code
(no ``alembic.ini``); concurrent upgrades serialise (PostgreSQL advisory lock / SQLite immediate transaction).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from service.db.models import Base

if TYPE_CHECKING:
    from alembic.config import Config

    from service.settings import Settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
IMMEDIATE = "autoprune_sqlite_immediate"
"""Execution option: begin this connection's transaction with ``BEGIN IMMEDIATE`` on SQLite (ignored elsewhere)."""
BUSY_TIMEOUT_MS = 30_000
_MIGRATION_LOCK = 0x6175_746F_7072  # pg_advisory_xact_lock key ("autopr")


def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> ``postgresql+psycopg://``; other URLs unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` set up as described in the module docstring (``kwargs`` go to create_engine)."""
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    if u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000, **kwargs.pop("connect_args", {})}
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" hook below emits BEGIN
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(IMMEDIATE) else "BEGIN")

    return engine


# -- timestamps ---------------------------------------------------------------------------------------------
# SQLite has no time zones: a DateTime(timezone=True) comes back naive (the repository stores UTC only).
# Make every loaded timestamp aware again, so both databases hand out the same values.
_DATETIME_COLUMNS: dict[type, list[str]] = {}


def _datetime_columns(cls: type) -> list[str]:
    cols = _DATETIME_COLUMNS.get(cls)
    if cols is None:
        from sqlalchemy import DateTime, inspect

        mapper: Any = inspect(cls)
        cols = [c.key for c in mapper.column_attrs if isinstance(c.expression.type, DateTime)]
        _DATETIME_COLUMNS[cls] = cols
    return cols


@event.listens_for(Base, "load", propagate=True)
def _aware_on_load(target: Any, _context: Any) -> None:
    _make_aware(target)


@event.listens_for(Base, "refresh", propagate=True)
def _aware_on_refresh(target: Any, _context: Any, _attrs: Any) -> None:
    _make_aware(target)


def _make_aware(target: Any) -> None:
    state = target.__dict__
    for key in _datetime_columns(type(target)):
        value = state.get(key)
        if isinstance(value, datetime) and value.tzinfo is None:
            state[key] = value.replace(tzinfo=UTC)  # set in __dict__: no change is recorded


# -- migrations ---------------------------------------------------------------------------------------------
def alembic_config(url: str) -> Config:
    """An Alembic Config for ``url`` built in code (script location: ``service/db/migrations``)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` (idempotent; safe to call from several processes at once)."""
    from alembic import command

    cfg = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(**{IMMEDIATE: True})
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def ensure_schema(settings: Settings) -> None:
    """Bring the settings' database to the latest schema (the embedded default does this on start)."""
    upgrade(settings.db_url)


# -- where the workers of a shared job keep their Optuna study --------------------------------------------------

OPTUNA_SCHEMA = "optuna"
"""PostgreSQL schema of shared Optuna studies (created by migration 0002): Optuna's own ``alembic_version``
table would clash with the service's in ``public``."""


def shared_study_storage(db_url: str, study_storage: str | None = None) -> str | None:
    """Where the workers of a shared job keep their Optuna study: the operator's ``study_storage`` setting
    (``AUTOPRUNE_STUDY_STORAGE``), else the service's own database when it is PostgreSQL (``search_path`` =
    :data:`OPTUNA_SCHEMA`); None when neither. Never a job field (see ``agents.STORAGE_OPTIONS``)."""
    if study_storage:
        return str(study_storage)
    url = normalize_url(db_url)
    if not url.startswith("postgresql"):
        return None
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{OPTUNA_SCHEMA}"


def check_job_workers(workers: int, db_url: str, study_storage: str | None = None) -> None:
    """:class:`InvalidConfigError` unless a job with ``workers`` can run here (torch-free: the API may call it
    after ``JobSpec.validate()``, which checks the strategy)."""
    from autoprune.errors import InvalidConfigError

    if workers > 1 and shared_study_storage(db_url, study_storage) is None:
        raise InvalidConfigError(
            "workers > 1 shares one Optuna study between the workers: it needs the service on PostgreSQL or an "
            "AUTOPRUNE_STUDY_STORAGE database URL that every worker reaches (this service runs on SQLite)"
        )


def check_no_storage_options(strategy_options: Mapping[str, Any]) -> None:
    """:class:`InvalidConfigError` when a job's strategy options name a database or study: in the service those
    are the operator's (``AUTOPRUNE_STUDY_STORAGE``), never a caller's."""
    from agents import STORAGE_OPTIONS
    from autoprune.errors import InvalidConfigError

    named = sorted(STORAGE_OPTIONS & set(strategy_options))
    if named:
        raise InvalidConfigError(
            f"strategy option(s) {', '.join(named)} are not accepted by the service: where studies are kept is "
            "operator configuration (AUTOPRUNE_STUDY_STORAGE)"
        )
