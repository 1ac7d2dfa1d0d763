"""Start ``autoprune serve`` as a subprocess on 127.0.0.1 and wait until it answers ``/health``.

For scripts that drive a real server over HTTP: the test suite's server fixtures and ``benchmarks/service_load.py``.
The server runs in a clean environment (no inherited ``AUTOPRUNE_*`` variable) with its output in a log file, so a
failure to come up is reported with what it printed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["ServeFailed", "clean_env", "free_port", "start_serve"]


class ServeFailed(RuntimeError):
    """The server exited, or did not answer ``/health``, before the deadline; the message holds its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``AUTOPRUNE_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPRUNE_")}
    env.update(extra)
    return env


def start_serve(
    data_dir: Path,
    *args: str,
    log: Path,
    env: dict[str, str],
    cwd: Path | None = None,
    port: int | None = None,
    timeout: float = 60,
) -> tuple[str, subprocess.Popen[bytes]]:
    """``python -m service.cli serve --port <port> --data-dir <data_dir> *args`` run in ``cwd`` with environment
    ``env``, stdout and stderr written to ``log``; returns its URL and process once ``/health`` answers 200.
    ``port`` defaults to a free one. :class:`ServeFailed` (the process killed) when it exits or does not answer
    within ``timeout`` seconds."""
    port = port or free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir), *args]
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServeFailed(f"the server exited ({proc.returncode}):\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ServeFailed(f"the server did not come up in {timeout:g} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
