"""Pin a worker process to some CPU cores (``--cpus 0``, ``0-1``, ``0,2``, ``0-1,4``).

Workers pinned to disjoint cores time latency without disturbing each other, and their measurement locks
(:mod:`autoprune.measure_lock`, one per core of the affinity) never collide; unpinned workers share every core
and take turns on the locks.
"""

from __future__ import annotations

import os
import re

_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


class CpuSpecError(ValueError):
    """A ``--cpus`` value that is malformed or names cores this process may not use; the message is one line."""


def available_cpus() -> set[int]:
    getaffinity = getattr(os, "sched_getaffinity", None)
    return set(getaffinity(0)) if getaffinity is not None else set(range(os.cpu_count() or 1))


def parse_cpus(spec: str, available: set[int] | None = None) -> tuple[int, ...]:
    """The cores of ``spec`` (comma-separated numbers and ranges ``a-b``), ascending; :class:`CpuSpecError`
    when it is malformed, a range runs backwards, or a core is not in ``available`` (default: this process's
    affinity)."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise CpuSpecError(f"--cpus {spec!r}: give core numbers and ranges, e.g. 0, 0-1 or 0,2")
    cpus: set[int] = set()
    for part in text.split(","):
        match = _PART.match(part.strip())
        if match is None:
            raise CpuSpecError(f"--cpus {spec!r}: {part.strip()!r} is not a core number or a range a-b (e.g. 0-1)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise CpuSpecError(f"--cpus {spec!r}: the range {lo}-{hi} runs backwards")
        if hi - lo > 4096:
            raise CpuSpecError(f"--cpus {spec!r}: the range {lo}-{hi} is larger than any machine")
        cpus.update(range(lo, hi + 1))
    allowed = available_cpus() if available is None else available
    missing = sorted(cpus - allowed)
    if missing:
        shown = ",".join(str(c) for c in missing[:8]) + ("..." if len(missing) > 8 else "")
        raise CpuSpecError(
            f"--cpus {spec!r}: core(s) {shown} not available to this process (available: {format_cpus(allowed)})"
        )
    return tuple(sorted(cpus))


def format_cpus(cpus: set[int] | tuple[int, ...] | list[int]) -> str:
    """``0-3,6`` for {0, 1, 2, 3, 6}."""
    ordered = sorted(cpus)
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts) or "none"


def pin(spec: str) -> tuple[int, ...]:
    """Parse ``spec`` and restrict this process (and the threads and children it starts afterwards) to it."""
    cpus = parse_cpus(spec)
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is None:  # pragma: no cover - not Linux
        raise CpuSpecError("--cpus needs os.sched_setaffinity (Linux)")
    try:
        setaffinity(0, cpus)
    except OSError as exc:
        raise CpuSpecError(f"--cpus {spec!r}: cannot pin to these cores: {exc.strerror or exc}") from None
    return cpus
