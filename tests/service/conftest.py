"""Fixtures for the service tests: a fresh database per test on SQLite (a file) and on the real PostgreSQL.

PostgreSQL: ``AUTOPRUNE_TEST_PG`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432``) names the server;
each test gets its own database ``autoprune_test_<random>``, created through the ``postgres`` database and
dropped afterwards. The PostgreSQL parameters are skipped (with the reason) only when the server is unreachable.

Also the helpers of the subprocess tests, as fixtures: ``free_port``, ``clean_env``, ``start_server`` (a real
``autoprune serve`` on 127.0.0.1), ``running_server`` and ``wait_for``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from service.db.engine import make_engine, normalize_url, upgrade
from service.db.repository import Repository
from service.launch import clean_env as _clean_env
from service.launch import free_port as _free_port
from service.launch import start_serve
from service.settings import parse_key_list

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
        if os.environ.get("CI"):  # CI promises both databases: a missing server is a failure, not a skip
            pytest.fail(f"{reason}; CI runs the contract suite on PostgreSQL too", pytrace=False)
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


@contextlib.contextmanager
def migrated_repository(url: str) -> Iterator[Repository]:
    """A repository on the database at ``url``, migrated to the head revision first (engine disposed after)."""
    upgrade(url)
    engine = make_engine(url)
    try:
        yield Repository(engine)
    finally:
        engine.dispose()


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    """A repository on a freshly migrated database."""
    with migrated_repository(db_url) as r:
        yield r


@pytest.fixture
def pg_repo(pg_url: str) -> Iterator[Repository]:
    """A repository on a freshly migrated PostgreSQL database (the one ``pg_url`` names)."""
    with migrated_repository(pg_url) as r:
        yield r


# -- subprocesses: free ports, a clean environment, a real server, waiting ---------------------------------------
def submit_job(repo: Repository, spec: dict[str, Any]) -> str:
    """A queued job of the built-in resnet20 on digits with ``spec`` (the worker tests' submission)."""
    model = repo.create_model(name="r", kind="architecture", architecture="resnet20", kwargs={}, artefact_sha256=None)
    data = repo.create_dataset(name="digits", kind="builtin", builtin="digits", artefact_sha256=None, info={})
    job, _ = repo.create_job(model_id=model.id, dataset_id=data.id, spec=spec, progress_total=spec["budget"])
    return job.id


@dataclass
class ServerProcess:
    """An ``autoprune serve`` subprocess on 127.0.0.1 (from ``start_server``); ``key``: its first API key."""

    url: str
    key: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def args(self) -> list[str]:
        """The client commands' flags for this server."""
        return ["--url", self.url, "--key", self.key]

    def client(self, key: str | None = "") -> httpx.Client:
        """An httpx client with ``Authorization: Bearer <key>`` ("": ``self.key``; None: no header)."""
        key = self.key if key == "" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then wait: the exit code, or None when it was still running after ``timeout`` s (killed)."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def _start_server(data_dir: Path, *args: str, timeout: float = 60, **env: str) -> ServerProcess:
    """``autoprune serve --port <free> --data-dir <data_dir> *args`` with ``clean_env(**env)``, its output in
    ``<data_dir>/../server-<port>.log``; returns once ``/health`` answers 200 (:class:`ServeFailed` if it exits or
    does not within ``timeout`` s)."""
    port = _free_port()
    log = data_dir.parent / f"server-{port}.log"
    url, proc = start_serve(data_dir, *args, log=log, env=_clean_env(**env), port=port, timeout=timeout)
    key = parse_key_list(env["AUTOPRUNE_API_KEYS"])[0] if "AUTOPRUNE_API_KEYS" in env else ""
    if not key:  # serve generated one and saved it
        key = (data_dir / "api-key").read_text().strip()
    return ServerProcess(url, key, data_dir, proc, log)


@contextlib.contextmanager
def _running_server(data_dir: Path, *args: str, **env: str) -> Iterator[ServerProcess]:
    """:func:`_start_server` for the block, stopped after it; AssertionError when it then had to be killed or had
    logged a Traceback (a request crashed it)."""
    server = _start_server(data_dir, *args, **env)
    try:
        yield server
    finally:
        code = server.stop()
        output = server.output()
        assert code is not None, f"still running 30 s after SIGTERM (killed):\n{output}"
        assert "Traceback" not in output, output


def _wait_for(condition: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.05) -> None:
    """Poll ``condition`` every ``interval`` s until it is true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function: a TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_port


@pytest.fixture(scope="session")
def clean_env() -> Callable[..., dict[str, str]]:
    """A function: this environment without ``AUTOPRUNE_*`` variables, plus the keyword arguments."""
    return _clean_env


@pytest.fixture(scope="session")
def start_server() -> Callable[..., ServerProcess]:
    """A function ``(data_dir, *serve_args, timeout=60, **env) -> ServerProcess``: a real server, up; the caller
    stops it (``ServerProcess.stop``)."""
    return _start_server


@pytest.fixture(scope="session")
def running_server() -> Callable[..., contextlib.AbstractContextManager[ServerProcess]]:
    """A context manager ``(data_dir, *serve_args, **env)``: ``start_server`` for the block, then stopped; fails
    when the server had to be killed or logged a Traceback."""
    return _running_server


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    """A function ``(condition, timeout, what, *, interval=0.05)``: poll until true, AssertionError on timeout."""
    return _wait_for


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """A real uvicorn serving ``app`` on 127.0.0.1 in a thread of this process (so that a test can read the app's
    own counters, e.g. ``app.state.events``); yields its URL, stops it after the block."""
    import threading

    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    _wait_for(lambda: server.started or not thread.is_alive(), 60, "uvicorn to start")
    if not server.started:
        raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
