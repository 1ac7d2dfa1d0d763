"""Fixtures for the service tests: a fresh database per test on SQLite (a file) and on the real PostgreSQL.

PostgreSQL: ``AUTOPRUNE_TEST_PG`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432``) names the server;
each test gets its own database ``autoprune_test_<random>``, created through the ``postgres`` database and
dropped afterwards. The PostgreSQL parameters are skipped (with the reason) only when the server is unreachable.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from service.db.engine import make_engine, normalize_url, upgrade
from service.db.repository import Repository

PG_SERVER = normalize_url(os.environ.get("AUTOPRUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")).rstrip("/")


@functools.cache
def pg_unavailable() -> str | None:
    """None when the PostgreSQL server answers, else why not."""
    engine = create_engine(f"{PG_SERVER}/postgres", connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_SERVER} is unreachable ({type(exc).__name__}: {str(exc).strip()[:200]})"
    finally:
        engine.dispose()
    return None


def _pg_admin(sql: str) -> None:
    engine = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards)."""
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"autoprune_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'autoprune.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database of each kind: the contract suite runs against both."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    """A repository on a freshly migrated database."""
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        yield Repository(engine)
    finally:
        engine.dispose()
