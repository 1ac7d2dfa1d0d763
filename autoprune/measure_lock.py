"""Exclusive latency measurement across the processes of one host: one ``fcntl`` lock file per CPU core.

Two workers that time models on the same cores at once slow each other down and both record the slowdown
(issue 13.6: 0.20 -> 0.53 s per measure stage). A measurement therefore takes the lock of every core its
process may run on (``os.sched_getaffinity(0)``) for as long as it times, and nothing else:

* the locks are taken in ascending core order, so two processes wanting overlapping sets cannot deadlock;
* workers pinned to disjoint cores (``--cpus``) take disjoint locks and time in parallel; unpinned workers (or a
  pinned and an unpinned one) share cores, hence locks, and take turns;
* the wait is bounded: after ``timeout_s`` the measurement runs anyway and says so (``exclusive="timeout"``),
  so a stuck neighbour slows a job down but never stops it.

``flock`` locks belong to an open file description: two threads of one process each open the file and exclude
each other too, and the kernel drops a lock when its holder dies (no stale lock after ``kill -9``). The lock
directory must be on a file system every process sees (a shared volume between containers on one host).

The library takes the directory as an argument (:class:`~autoprune.latency.LatencyConfig.lock_dir`); the
service reads it from its settings and passes it in.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autoprune.errors import AutopruneError, InvalidConfigError

Exclusive = Literal["locked", "timeout", "off"]
"""``locked``: every core's lock was held while timing; ``timeout``: the bounded wait ran out and the
measurement ran without the locks; ``off``: no lock directory was configured."""


class MeasureLockError(AutopruneError):
    """The lock directory or a lock file cannot be created or opened."""


def current_cpus() -> tuple[int, ...]:
    """The cores this process (thread) may run on, ascending."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        return tuple(sorted(getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))  # pragma: no cover - not Linux


@dataclass(frozen=True)
class Held:
    """What a measurement got from :meth:`MeasureLock.hold`."""

    cpus: tuple[int, ...]
    exclusive: Exclusive
    wait_ms: float
    """How long the measurement waited for the locks (the whole bound when it timed out)."""


class MeasureLock:
    """Per-core lock files in ``directory`` (created if missing), waited for at most ``timeout_s`` seconds."""

    def __init__(self, directory: str | os.PathLike[str], timeout_s: float = 30.0, *, poll_s: float = 0.02) -> None:
        if not (isinstance(timeout_s, int | float) and timeout_s >= 0):  # `not >=`: rejects NaN
            raise InvalidConfigError(f"measurement lock timeout must be a number >= 0, got {timeout_s!r}")
        if not poll_s > 0:
            raise InvalidConfigError(f"measurement lock poll interval must be > 0, got {poll_s!r}")
        self.directory = Path(directory)
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)

    def path(self, cpu: int) -> Path:
        return self.directory / f"cpu{int(cpu)}.lock"

    def _open(self, cpu: int) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return os.open(self.path(cpu), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise MeasureLockError(
                f"cannot open the measurement lock {self.path(cpu)}: {exc.strerror or exc}"
            ) from None

    def _acquire(self, fd: int, deadline: float) -> bool:
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, self.poll_s)  # quick for a short hold, then polling gently

    @contextmanager
    def hold(self, cpus: Iterable[int] | None = None) -> Iterator[Held]:
        """Hold the locks of ``cpus`` (default: this process's affinity) for the ``with`` block.

        Locks are taken in ascending order; if they are not all held within ``timeout_s`` the ones taken are
        released and the block runs anyway with ``exclusive="timeout"``."""
        wanted = tuple(sorted(set(current_cpus() if cpus is None else (int(c) for c in cpus))))
        fds: list[int] = []
        start = time.monotonic()
        deadline = start + self.timeout_s
        try:
            got_all = True
            for cpu in wanted:
                fd = self._open(cpu)
                fds.append(fd)
                if not self._acquire(fd, deadline):
                    got_all = False
                    break
            wait_ms = (time.monotonic() - start) * 1000
            if not got_all:  # hold nothing rather than some: a timed-out measurement must not block others
                while fds:
                    os.close(fds.pop())
            yield Held(cpus=wanted, exclusive="locked" if got_all else "timeout", wait_ms=wait_ms)
        finally:
            while fds:
                os.close(fds.pop())  # closing the last descriptor releases its flock


def unlocked(cpus: Iterable[int] | None = None) -> Held:
    """What a measurement without a lock directory records."""
    return Held(cpus=tuple(sorted(set(current_cpus() if cpus is None else cpus))), exclusive="off", wait_ms=0.0)
