"""The supervisor of ``autoprune serve``'s embedded worker: it reaps it, logs its death, restarts it with back-off.

Before this, ``serve`` started the worker and looked at it again only at shutdown: after a ``kill -9`` the worker
stayed a zombie, nothing was logged, ``/health`` said ok and jobs stayed queued for ever (issue 13.4).

A thread waits on the child (so it is reaped at once). When it dies unasked, one log line says how (exit code or
signal) and when it restarts: after 1 s, then 2, 4, ... capped at ``max_delay`` while it keeps dying within
``fast_s`` of its start; a worker that ran longer than that starts over at 1 s. After ``max_fast_deaths`` fast
deaths in a row the supervisor gives up, says so, and the state is ``stopped`` (``/health`` answers 503: nothing
will run the queued jobs). States: ``starting`` -> ``running`` -> ``restarting`` -> ``running`` ... or
``stopped``; ``stop()`` (serve's shutdown) moves to ``stopped`` without a restart. A job the dead worker held is
released by its lease running out, and the restarted worker (or any other) claims it again.

Torch-free: the ``serve`` process never imports torch (the worker is a child process).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

log = logging.getLogger("autoprune.serve")

State = Literal["starting", "running", "restarting", "stopped"]


def describe_exit(returncode: int) -> str:
    """``exit code 3`` / ``killed by signal 9 (SIGKILL)`` for a Popen return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-returncode} ({name})"
    return f"exit code {returncode}"


class WorkerSupervisor:
    """Run ``start()``'s process, restart it when it dies unasked (see the module docstring)."""

    def __init__(
        self,
        start: Callable[[], subprocess.Popen[bytes]],
        *,
        name: str = "embedded worker",
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        fast_s: float = 60.0,
        max_fast_deaths: int = 5,
        stop_timeout: float = 60.0,
    ) -> None:
        self._start = start
        self.name = name
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.fast_s = fast_s
        """A death within this many seconds of the start is a fast one (a crash loop, not a one-off kill)."""
        self.max_fast_deaths = max_fast_deaths
        self.stop_timeout = stop_timeout
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.state: State = "starting"
        self.restarts = 0
        """Restarts so far (a restart that failed to start the process counts too)."""
        self.fast_deaths = 0
        """Fast deaths in a row (reset by a worker that lived longer than ``fast_s``)."""
        self.last_exit: str | None = None
        self.retry_at: float | None = None
        """``time.monotonic()`` of the next restart while ``restarting``."""

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None or proc.returncode is not None else proc.pid

    def start(self) -> int:
        """Start the process and its watcher thread; the pid."""
        proc = self._start()
        with self._lock:
            self._proc = proc
            self.state = "running"
        self._thread = threading.Thread(target=self._watch, args=(proc,), name="worker-supervisor", daemon=True)
        self._thread.start()
        return proc.pid

    def status(self) -> dict[str, Any]:
        """What ``/health`` shows: state, pid, restarts, the last death and (restarting) the seconds to the next
        start."""
        with self._lock:
            retry_in = None
            if self.state == "restarting" and self.retry_at is not None:
                retry_in = round(max(self.retry_at - time.monotonic(), 0.0), 1)
            return {
                "state": self.state,
                "pid": self.pid,
                "restarts": self.restarts,
                "last_exit": self.last_exit,
                "retry_in_s": retry_in,
            }

    def _delay(self) -> float:
        return float(min(self.base_delay * 2 ** max(self.fast_deaths - 1, 0), self.max_delay))

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        while True:
            started = time.monotonic()
            code = proc.wait()  # reaps it: no zombie
            lived = time.monotonic() - started
            if self._stopping.is_set():
                return
            how = describe_exit(code)
            with self._lock:
                self.last_exit = how
                self.fast_deaths = self.fast_deaths + 1 if lived < self.fast_s else 1
                if self.fast_deaths >= self.max_fast_deaths:
                    self.state = "stopped"
                    self.retry_at = None
                    log.error(
                        "%s (pid %d) died: %s, after %.1f s; it died %d times in a row within %.0f s of starting: "
                        "not restarting it (queued jobs wait for another worker: `autoprune worker`)",
                        self.name, proc.pid, how, lived, self.fast_deaths, self.fast_s,
                    )  # fmt: skip
                    return
                delay = self._delay()
                self.state = "restarting"
                self.retry_at = time.monotonic() + delay
                log.warning(
                    "%s (pid %d) died: %s, after %.1f s; restarting it in %.0f s (restart %d)",
                    self.name, proc.pid, how, lived, delay, self.restarts + 1,
                )  # fmt: skip
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.restarts += 1
                try:
                    proc = self._start()
                except OSError as exc:
                    self.state = "stopped"
                    self.last_exit = f"could not start: {exc}"
                    log.error("%s could not be restarted: %s", self.name, exc)
                    return
                self._proc = proc
                self.state = "running"
                self.retry_at = None
            log.warning("%s restarted: pid %d", self.name, proc.pid)

    def stop(self) -> int | None:
        """No more restarts; SIGTERM (the worker finishes its evaluation and releases its job), SIGKILL after
        ``stop_timeout``; the exit code (None when it was not running)."""
        with self._lock:
            self._stopping.set()
            self.state = "stopped"
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if self._thread is not None:
            self._thread.join(5)
        return code


__all__ = ["WorkerSupervisor", "describe_exit"]
