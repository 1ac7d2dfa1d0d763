"""The host-wide measurement lock: real ``flock`` locks contended by real processes, the order they are taken in,
the bounded wait, and what the latency protocol records (including records stored before it existed).

No assertion depends on how long anything takes: only on what was held when, and what was recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprune.errors import InvalidConfigError
from autoprune.latency import DeterministicMeter, Latency, LatencyConfig, LatencyProtocol, Meter
from autoprune.measure_lock import MeasureLock, MeasureLockError, current_cpus

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"warmup": 1, "min_repeats": 3, "max_repeats": 6, "block": 3}

HOLDER = textwrap.dedent(
    """
    import sys, time
    from autoprune.measure_lock import MeasureLock
    directory, cpus, seconds = sys.argv[1], [int(c) for c in sys.argv[2].split(",")], float(sys.argv[3])
    with MeasureLock(directory, timeout_s=60).hold(cpus) as held:
        assert held.exclusive == "locked", held
        print("held", flush=True)
        if seconds < 0:
            sys.stdin.readline()  # until the test closes stdin
        else:
            time.sleep(seconds)
    """
)

HOLDS = textwrap.dedent(
    """
    import json, sys, time
    from autoprune.measure_lock import MeasureLock
    lock = MeasureLock(sys.argv[1], timeout_s=120)
    sys.stdin.readline()  # start together
    spans = []
    for _ in range(int(sys.argv[2])):
        with lock.hold() as held:
            assert held.exclusive == "locked", held
            start = time.monotonic()
            time.sleep(0.03)
            spans.append((start, time.monotonic()))
    print(json.dumps(spans), flush=True)
    """
)


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the locks of every core of this one until the test ends."""
    proc = _python(HOLDER, str(tmp_path), ",".join(map(str, current_cpus())), "-1")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


@pytest.fixture(scope="module")
def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 16, generator=torch.Generator().manual_seed(0))


def _locked_elsewhere(path: Path) -> bool:
    """Whether another open file description holds ``path``'s flock (probed without waiting)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock if it got it
    return False


def test_two_processes_take_turns(tmp_path: Path) -> None:
    """Two processes timing on the same cores never hold the lock at the same time (CLOCK_MONOTONIC is one
    clock for every process of the host, so their spans compare)."""
    procs = [_python(HOLDS, str(tmp_path), "6") for _ in range(2)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    spans = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        spans.append([tuple(s) for s in json.loads(out)])
    assert [len(s) for s in spans] == [6, 6]
    for a_start, a_end in spans[0]:
        for b_start, b_end in spans[1]:
            assert a_end <= b_start or b_end <= a_start, "both processes held the lock at once"


def test_a_measurement_times_out_on_a_held_lock_and_still_runs(
    holder: subprocess.Popen[str], tmp_path: Path, small: nn.Module, x: torch.Tensor
) -> None:
    meter = Meter(LatencyConfig(**SMALL, lock_dir=str(tmp_path), lock_timeout_s=0.2))
    lat = meter.measure(small, x, reference=small)
    p = lat.protocol
    assert p.exclusive == "timeout"
    assert p.lock_wait_ms >= 200  # it waited the whole bound, then timed anyway
    assert p.repeats >= SMALL["min_repeats"] and lat.median_ms > 0
    assert p.cpus == current_cpus()
    assert holder.poll() is None  # the other process still holds its locks: nothing was taken from it


def test_a_measurement_waits_for_the_other_process_and_then_holds_the_lock(
    tmp_path: Path, small: nn.Module, x: torch.Tensor
) -> None:
    proc = _python(HOLDER, str(tmp_path), ",".join(map(str, current_cpus())), "0.5")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    try:
        lat = Meter(LatencyConfig(**SMALL, lock_dir=str(tmp_path), lock_timeout_s=60)).measure(small, x)
    finally:
        proc.wait(30)
    assert lat.protocol.exclusive == "locked"
    assert lat.protocol.lock_wait_ms > 0
    # released afterwards: the next measurement gets the locks without waiting for anyone
    assert not any(_locked_elsewhere(tmp_path / f"cpu{c}.lock") for c in current_cpus())


def test_disjoint_cores_do_not_wait_for_each_other(tmp_path: Path) -> None:
    proc = _python(HOLDER, str(tmp_path), "0", "-1")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with MeasureLock(tmp_path, timeout_s=0).hold([1]) as held:
            assert held.exclusive == "locked" and held.cpus == (1,)
        with MeasureLock(tmp_path, timeout_s=0).hold([0, 1]) as held:
            assert held.exclusive == "timeout"  # core 0 is the other process's
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def test_locks_are_taken_in_ascending_core_order(tmp_path: Path) -> None:
    """Asked for cores (1, 0) while another process holds core 1, the measurement first takes core 0, then
    waits for 1: the order every process follows, so none waits for a lock held by one waiting for its own."""
    proc = _python(HOLDER, str(tmp_path), "1", "-1")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    results: list[object] = []
    waiter = threading.Thread(
        target=lambda: results.append(_hold(MeasureLock(tmp_path, timeout_s=60, poll_s=0.005), [1, 0]))
    )
    waiter.start()
    try:
        deadline = 600
        while not _locked_elsewhere(tmp_path / "cpu0.lock") and deadline:
            threading.Event().wait(0.02)
            deadline -= 1
        assert _locked_elsewhere(tmp_path / "cpu0.lock"), "core 0 was not taken first"
        assert waiter.is_alive()  # still waiting for core 1
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        waiter.join(60)
    assert results == [("locked", (0, 1))]


def _hold(lock: MeasureLock, cpus: list[int]) -> tuple[str, tuple[int, ...]]:
    with lock.hold(cpus) as held:
        return held.exclusive, held.cpus


def test_a_lock_that_cannot_be_created_is_a_typed_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(MeasureLockError, match="cannot open the measurement lock"), MeasureLock(blocker).hold([0]):
        pass
    with pytest.raises(InvalidConfigError):
        MeasureLock(tmp_path, timeout_s=float("nan"))
    with pytest.raises(InvalidConfigError):
        LatencyConfig(lock_timeout_s=-1)


def test_without_a_lock_dir_the_protocol_says_off(small: nn.Module, x: torch.Tensor) -> None:
    p = Meter(LatencyConfig(**SMALL)).measure(small, x).protocol
    assert p.exclusive == "off" and p.lock_wait_ms == 0 and p.cpus == current_cpus()
    assert DeterministicMeter().measure(small, x).protocol.exclusive == "off"


def test_protocol_round_trip_and_old_records(tmp_path: Path, small: nn.Module, x: torch.Tensor) -> None:
    lat = Meter(LatencyConfig(**SMALL, lock_dir=str(tmp_path))).measure(small, x, reference=small)
    assert lat.protocol.exclusive == "locked"
    data = json.loads(json.dumps(lat.to_json()))
    assert data["protocol"]["cpus"] == list(current_cpus()) and data["protocol"]["exclusive"] == "locked"
    back = Latency.from_json(data)
    assert back == lat and back.protocol.cpus == current_cpus() and isinstance(back.protocol.cpus, tuple)

    old = json.loads(json.dumps(lat.to_json()))  # as stored before the lock existed
    for key in ("cpus", "exclusive", "lock_wait_ms"):
        del old["protocol"][key]
    legacy = Latency.from_json(old)
    assert legacy.protocol.cpus == () and legacy.protocol.exclusive == "off" and legacy.protocol.lock_wait_ms == 0
    assert legacy.median_ms == lat.median_ms
    assert LatencyProtocol.from_json(old["protocol"]).runtime == lat.protocol.runtime
