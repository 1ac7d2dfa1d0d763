"""Issue 13.4: ``autoprune serve``'s embedded worker is supervised: reaped, its death logged, restarted with
back-off, shown in ``/health`` (200 ``degraded`` while restarting, 503 once given up)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from service.api.app import create_app
from service.db.engine import upgrade
from service.settings import Settings
from service.supervisor import WorkerSupervisor, describe_exit
from tests.service.conftest import serve_in_thread

if TYPE_CHECKING:
    from tests.service.conftest import ServerProcess

KEY = "supervisor-key-0123456789"


def _child(code: str) -> Callable[[], subprocess.Popen[bytes]]:
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def _gone(pid: int) -> bool:
    """Reaped: no process (a zombie would still have its /proc entry, state Z)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "zombie" not in status  # (a new process may have the pid by now: then it is not a zombie)


def test_back_off_doubles_up_to_the_cap_and_exits_are_described() -> None:
    sup = WorkerSupervisor(_child("pass"), base_delay=1, max_delay=30)
    delays = []
    for n in range(1, 8):
        sup.fast_deaths = n
        delays.append(sup._delay())
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exit code 3"


class _Current:
    """The supervisor ``/health`` reads (swapped between the two parts of the test)."""

    sup: WorkerSupervisor | None = None

    def status(self) -> dict[str, Any]:
        assert self.sup is not None
        return self.sup.status()


def test_health_shows_the_worker_restarting_and_503_once_given_up(
    tmp_path: Path, wait_for: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autoprune.serve")
    settings = Settings(data_dir=tmp_path, api_keys=[KEY])
    upgrade(settings.db_url)
    current = _Current()
    app = create_app(settings, worker=current)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as anon:
        # a worker that runs, then is killed: reaped, logged, "restarting" (a long back-off keeps it there)
        current.sup = sup = WorkerSupervisor(_child("import time; time.sleep(600)"), base_delay=3600, max_delay=3600)
        pid = sup.start()
        h = anon.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert h.json()["worker"] == {
            "state": "running",
            "pid": pid,
            "restarts": 0,
            "last_exit": None,
            "retry_in_s": None,
        }
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: anon.get("/health").json()["worker"]["state"] == "restarting", 30, "the restart")
        h = anon.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded", h.json()
        worker = h.json()["worker"]
        assert worker["last_exit"] == "killed by signal 9 (SIGKILL)" and worker["pid"] is None
        assert worker["retry_in_s"] > 0 and "SIGKILL" in h.json()["detail"]
        assert _gone(pid), "the killed worker was not reaped"
        deaths = [r.getMessage() for r in caplog.records if str(pid) in r.getMessage()]
        assert len(deaths) == 1, deaths  # one line: how it died, after how long, when it restarts
        assert deaths[0].startswith(f"embedded worker (pid {pid}) died: killed by signal 9 (SIGKILL), after ")
        assert deaths[0].endswith("; restarting it in 3600 s (restart 1)")
        assert sup.stop() == -signal.SIGKILL and sup.status()["state"] == "stopped"  # no restart after stop()

        # a worker that dies at once, every time: restarted with back-off, then given up on (503)
        caplog.clear()
        current.sup = sup = WorkerSupervisor(_child("raise SystemExit(3)"), base_delay=0.01, max_fast_deaths=3)
        sup.start()
        wait_for(lambda: sup.status()["state"] == "stopped", 60, "the supervisor to give up")
        h = anon.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable" and h.json()["database"] is True
        assert h.json()["worker"]["restarts"] == 2 and h.json()["worker"]["last_exit"] == "exit code 3"
        assert "kept dying" in h.json()["detail"]
        messages = [r.getMessage() for r in caplog.records]
        assert sum("died: exit code 3" in m and "; restarting it in" in m for m in messages) == 2
        assert sum("restarted: pid" in m for m in messages) == 2
        assert any("died 3 times in a row" in m and "not restarting it" in m for m in messages), messages
        assert sup.stop() == 3


@pytest.mark.slow
def test_serve_restarts_its_embedded_worker_after_kill_9_and_runs_jobs_again(
    tmp_path: Path, start_server: Callable[..., ServerProcess], wait_for: Callable[..., None]
) -> None:
    s = start_server(tmp_path / "data", timeout=90, AUTOPRUNE_API_KEYS=KEY, COLUMNS="200", NO_COLOR="1")
    try:
        with s.client() as api:
            first = api.get("/health").json()["worker"]
            assert first["state"] == "running" and first["restarts"] == 0, first
            pid = first["pid"]
            assert f"embedded worker: pid {pid}" in s.output()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: api.get("/health").json()["worker"]["restarts"] == 1, 60, "the restart")
            h = api.get("/health")
            assert h.status_code == 200 and h.json()["status"] == "ok", h.json()
            again = h.json()["worker"]
            assert again["state"] == "running" and again["pid"] not in (None, pid)
            assert again["last_exit"] == "killed by signal 9 (SIGKILL)"
            assert _gone(pid), "the killed worker is a zombie"
            lines = [line for line in s.output().splitlines() if f"pid {pid})" in line]
            assert len(lines) == 1 and "killed by signal 9 (SIGKILL)" in lines[0], s.output()
            assert "restarting it in 1 s (restart 1)" in lines[0]

            # a job submitted afterwards runs on the restarted worker
            model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
            data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
            body = {"model_id": model, "dataset_id": data, "strategy": "random", "budget": 1, "val_samples": 50}
            job = api.post("/v1/jobs", json={**body, "export_formats": ["onnx"]})
            assert job.status_code == 201, job.text
            job_id = job.json()["id"]
            wait_for(lambda: api.get(f"/v1/jobs/{job_id}").json()["state"] in ("succeeded", "failed"), 300, "the job")
            final = api.get(f"/v1/jobs/{job_id}").json()
            assert final["state"] == "succeeded", (final, s.output())
            assert final["progress"]["done"] == 1
            assert api.get(f"/v1/jobs/{job_id}/models/best", params={"format": "onnx"}).status_code == 200
    finally:
        code = s.stop(60)
    assert code == 0, s.output()
    assert "Traceback" not in s.output(), s.output()
