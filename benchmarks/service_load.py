"""The service under SSE watchers, and the embedded default's first-candidate and export times.

Starts a real ``autoprune serve`` (API + embedded worker, SQLite in a temporary directory) and a ResNet-20 /
digits random-search job that keeps running, then prints a table:

* ``GET /v1/jobs`` p50/p99/max over ``--requests`` sequential requests with 0 and with ``--watchers`` SSE streams
  open on the running job (issue 13.5: one poller per job, target p99 < 50 ms), and how long the watchers waited
  for their first event (the snapshot);
* submit -> first candidate: from ``POST /v1/jobs`` to the job's first recorded candidate (target < 5 s; the
  worker is idle and warm, the model and data are uploaded before);
* the export stage of a finished job: from its last search evaluation to ``succeeded`` (every front point and
  the best exported as ONNX), with the front's size (``--no-export`` skips it).

``--workers-only`` measures instead how several workers on one host share it (issue 13.6): a ``serve
--no-worker`` API and worker processes started by this script, each worker on its own ResNet-20 / digits
random-search job, evaluations/s over ``--window`` seconds once every job has its first candidate, for 1 worker;
2 workers pinned to one core each (``--cpus``); 2 unpinned with the measurement lock; 2 unpinned without it
(``AUTOPRUNE_MEASURE_LOCK=false``). Beside it: the median measure stage and what the latency protocols say
(``exclusive``, lock waits). ``--pg SERVER_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432``) runs
it on a fresh PostgreSQL database, dropped afterwards; default SQLite.

``--export-only`` measures the export of a front after a search (issue 13.7) on the embedded default: a
ResNet-20 / digits random search of ``--export-budget`` evaluations (default 30: a front of about 10) exported as
ONNX (``AUTOPRUNE_EXPORT_FRONT=eager``), then the time from its last search evaluation to the best point's file
(the ``export`` event of phase ``job``), to ``succeeded``, and to the last front file (every background export
made); then, while a second job runs on the only worker, how long a user's export request of the finished job
(``POST /v1/jobs/{id}/exports``, a point in ``pt2``) takes to be made (``--request-timeout``, default 120 s).

``--source DIR`` runs the server from another checkout (e.g. ``git archive HEAD | tar -x -C /tmp/old``) with this
virtual environment, to compare before and after on the same machine.

    .venv/bin/python benchmarks/service_load.py [--watchers 50] [--requests 300] [--source DIR] [--no-export]
    .venv/bin/python benchmarks/service_load.py --workers-only [--window 45] [--pg postgresql+psycopg://...]
    .venv/bin/python benchmarks/service_load.py --export-only [--export-budget 30] [--source DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from service.client import parse_sse
from service.launch import ServeFailed, clean_env, start_serve

KEY = "benchmark-key-0123456789"


def events_of(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON data of each event of a ``text/event-stream`` (the service client's parser)."""
    for event in parse_sse(lines):
        if isinstance(event.data, dict):
            yield event.data


@contextmanager
def serve(data_dir: Path, source: Path | None, *extra: str, **env_extra: str) -> Iterator[str]:
    """A real ``autoprune serve`` (run from ``source`` when given) for the block, terminated after it."""
    env = clean_env(AUTOPRUNE_API_KEYS=KEY, COLUMNS="200", NO_COLOR="1", **env_extra)
    try:
        url, proc = start_serve(data_dir, *extra, log=data_dir.parent / "serve.log", env=env, cwd=source, timeout=120)
    except ServeFailed as e:
        raise SystemExit(str(e)) from None
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def get_latencies(api: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = api.get("/v1/jobs", params={"limit": 50})
        out.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text
    return out


class Watchers:
    """``n`` SSE streams of one job, in a process of their own (their threads would otherwise share this one's
    GIL with the timed requests); ``first_ms``: how long each stream waited for its first event (the snapshot)."""

    def __init__(self, url: str, job_id: str, n: int) -> None:
        self.first_ms: list[float] = []
        argv = [sys.executable, __file__, "--watch", url, job_id, str(n)]
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> Watchers:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # once every stream has its snapshot
        self.first_ms = [float(x) for x in line.split()]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._proc.terminate()
        self._proc.wait(30)


def watch_main(url: str, job_id: str, n: int) -> None:
    """The watchers' process: ``n`` streams; prints their times to the snapshot, then follows until killed."""
    first: list[float] = []
    lock = threading.Lock()
    ready = threading.Event()

    def run() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        t = time.perf_counter()
        with (
            httpx.Client(base_url=url, headers=headers, timeout=None) as c,
            c.stream("GET", f"/v1/jobs/{job_id}/events") as r,
        ):
            for i, _ in enumerate(events_of(r.iter_lines())):
                if i == 0:
                    with lock:
                        first.append((time.perf_counter() - t) * 1000)
                        if len(first) == n:
                            ready.set()

    for _ in range(n):
        threading.Thread(target=run, daemon=True).start()
    ready.wait(120)
    print(" ".join(f"{x:.1f}" for x in first), flush=True)
    threading.Event().wait()


def wait_until(fn: Any, timeout: float, interval: float = 0.02) -> float:
    start = time.perf_counter()
    while not fn():
        if time.perf_counter() - start > timeout:
            raise SystemExit("timed out")
        time.sleep(interval)
    return time.perf_counter() - start


@contextmanager
def fresh_pg_database(server: str | None) -> Iterator[str | None]:
    """A new database on the PostgreSQL ``server`` (its URL without a database), dropped afterwards; None: none."""
    if server is None:
        yield None
        return
    import uuid

    from sqlalchemy import create_engine

    server = server.rstrip("/")
    name = f"autoprune_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield f"{server}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def progress(api: httpx.Client, jobs: list[str]) -> list[int]:
    """Evaluations done so far by each job."""
    return [int(api.get(f"/v1/jobs/{j}").json()["progress"]["done"]) for j in jobs]


WORKER_SETUPS: list[tuple[str, list[list[str]], bool]] = [
    ("1 worker", [[]], True),
    ("2 workers pinned (--cpus 0 / --cpus 1)", [["--cpus", "0"], ["--cpus", "1"]], True),
    ("2 workers unpinned, measurement lock", [[], []], True),
    ("2 workers unpinned, no lock", [[], []], False),
]
"""(label, each worker's extra arguments, AUTOPRUNE_MEASURE_LOCK)."""


def workers_main(args: argparse.Namespace) -> None:
    """Evaluations/s of 1 and 2 workers on one host, pinned or not, with the measurement lock or without."""
    rows: list[tuple[str, ...]] = []
    cwd = args.source or Path(__file__).resolve().parents[1]
    with (
        tempfile.TemporaryDirectory(prefix="autoprune-bench-") as tmp,
        fresh_pg_database(args.pg) as pg_url,
    ):
        data_dir = Path(tmp) / "data"
        db_env = {"AUTOPRUNE_DATABASE_URL": pg_url} if pg_url else {}
        with serve(data_dir, args.source, "--no-worker", "--upgrade", **db_env) as url:
            api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
            data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
            base = {"model_id": model, "dataset_id": data, "strategy": "random", "val_samples": 100, "max_ratio": 0.5}
            single: float | None = None
            for label, worker_args, lock in WORKER_SETUPS:
                env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPRUNE_")}
                env.update(
                    AUTOPRUNE_DATA_DIR=str(data_dir.resolve()),
                    AUTOPRUNE_POLL_SECONDS="0.2",
                    AUTOPRUNE_MEASURE_LOCK="true" if lock else "false",
                    AUTOPRUNE_MEASURE_LOCK_DIR=str(Path(tmp) / "measure-locks"),
                    PYTHONPATH=str(cwd),
                    **db_env,
                )
                jobs = [
                    api.post("/v1/jobs", json={**base, "budget": 100000, "seed": i, "export_formats": ["onnx"]}).json()[
                        "id"
                    ]
                    for i in range(len(worker_args))
                ]
                logs = [(Path(tmp) / f"worker-{len(rows)}-{i}.log").open("wb") for i in range(len(worker_args))]
                procs = [
                    subprocess.Popen(
                        [sys.executable, "-m", "service.worker", "--log-level", "WARNING", *extra],
                        cwd=cwd,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                    for extra, log in zip(worker_args, logs, strict=True)
                ]
                try:
                    # every worker warm (torch loaded, the unpruned model timed) before the window opens
                    wait_until(lambda jobs=jobs: min(progress(api, jobs)) >= 1, 600, 0.2)
                    start_done, t0 = progress(api, jobs), time.perf_counter()
                    time.sleep(args.window)
                    end_done, elapsed = progress(api, jobs), time.perf_counter() - t0
                    load = os.getloadavg()[0]
                finally:
                    for j in jobs:
                        api.post(f"/v1/jobs/{j}/cancel")
                    for proc in procs:
                        proc.terminate()
                    for proc in procs:
                        try:
                            proc.wait(120)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                    for log in logs:
                        log.close()
                rate = (sum(end_done) - sum(start_done)) / elapsed
                single = rate if single is None else single
                measure, exclusive, waits = [], {}, []
                for j in jobs:
                    page = api.get(f"/v1/jobs/{j}/evaluations", params={"limit": 1000}).json()["items"]
                    for e in page:
                        if e["index"] == 0 or e["stage"] != "search":
                            continue
                        rec = e["record"]
                        protocol = rec["latency"]["protocol"]
                        if rec["latency"].get("cached"):
                            continue  # a figure answered from the shape cache was not timed now
                        measure.append(rec["timings"]["measure"])
                        exclusive[protocol.get("exclusive", "?")] = exclusive.get(protocol.get("exclusive", "?"), 0) + 1
                        waits.append(protocol.get("lock_wait_ms", 0.0))
                rows.append(
                    (
                        label,
                        f"{rate:.2f}",
                        f"{rate / single:.2f}x",
                        f"{statistics.median(measure):.2f} s" if measure else "-",
                        " ".join(f"{k} {n}" for k, n in sorted(exclusive.items())) or "-",
                        f"{statistics.median(waits):.0f} / {max(waits):.0f} ms" if waits else "-",
                        f"{load:.2f}",
                    )
                )
                print("  ".join(rows[-1]), file=sys.stderr, flush=True)
            api.close()

    head = ("setup", "eval/s", "vs 1", "measure (median)", "exclusive", "lock wait med/max", "load 1 min")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    db = "PostgreSQL" if args.pg else "SQLite"
    print(f"\n{db}, {os.cpu_count()} CPUs, window {args.window:.0f} s per setup")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def _client_and_warm_up(url: str) -> tuple[httpx.Client, dict[str, Any], str]:
    """A client of the server at ``url``, the job fields of a ResNet-20/digits random search, and the id of a
    finished warm-up job (the worker imports torch and builds its first objective once: not what a submit
    costs)."""
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
    data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
    base = {"model_id": model, "dataset_id": data, "strategy": "random", "val_samples": 100, "max_ratio": 0.5}
    warm = api.post("/v1/jobs", json={**base, "budget": 1, "export_formats": ["onnx"]}).json()["id"]
    wait_until(lambda: api.get(f"/v1/jobs/{warm}").json()["state"] in ("succeeded", "failed"), 300, 0.2)
    return api, base, warm


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["created_at"])


def export_main(args: argparse.Namespace) -> None:
    """Search end -> best file -> succeeded -> whole front exported, and a user's request behind a running job."""
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-") as tmp, serve(Path(tmp) / "data", args.source) as url:
        api, base, warm = _client_and_warm_up(url)
        wait_until(lambda: api.get(f"/v1/jobs/{warm}/exports").json()["pending"] == 0, 300, 0.2)

        spec = {**base, "budget": args.export_budget, "export_formats": ["onnx"]}
        exp = api.post("/v1/jobs", json=spec).json()["id"]
        wait_until(lambda: api.get(f"/v1/jobs/{exp}").json()["state"] in ("succeeded", "failed"), 900, 0.2)
        with api.stream("GET", f"/v1/jobs/{exp}/events", params={"follow_exports": "true"}) as r:
            events = list(events_of(r.iter_lines()))
        final = api.get(f"/v1/jobs/{exp}").json()
        search_end = max(_at(e) for e in events if e.get("kind") == "evaluation")
        exports = [e for e in events if e.get("kind") == "export"]
        best = [_at(e) for e in exports if e["data"].get("phase") == "job" and e["data"].get("ok")]
        done = [e for e in events if e.get("to_state") == final["state"]]
        listed = api.get(f"/v1/jobs/{exp}/exports").json()

        def since(t: datetime | None) -> str:
            return "-" if t is None else f"{(t - search_end).total_seconds():.2f} s"

        front = final["front_size"]
        rows.append((f"search ({args.export_budget} evaluations, front of {front})", final["state"]))
        rows.append(("search end -> best file ready (ONNX)", since(best[0] if best else None)))
        rows.append(("search end -> job succeeded", since(_at(done[0]) if done else None)))
        rows.append(
            (
                f"search end -> whole front exported ({listed['done']} files)",
                since(max(_at(e) for e in exports) if exports else None),
            )
        )
        failed = [i for i in listed["items"] if i["state"] == "failed"]
        if failed:
            rows.append(("failed exports", f"{len(failed)}: {failed[0]['error']}"))

        # a user's export request of the finished job while another job keeps the only worker busy
        busy = api.post("/v1/jobs", json={**base, "budget": 100000, "export_formats": ["onnx"]}).json()["id"]
        wait_until(lambda: api.get(f"/v1/jobs/{busy}").json()["progress"]["done"] >= 1, 300, 0.1)
        t0 = time.perf_counter()
        req = api.post(f"/v1/jobs/{exp}/exports", json={"point": "best", "format": "pt2"}).json()
        state = req["state"]
        while state not in ("done", "failed") and time.perf_counter() - t0 < args.request_timeout:
            time.sleep(0.1)
            state = api.get(req["url"]).json()["state"]
        waited = time.perf_counter() - t0
        running = api.get(f"/v1/jobs/{busy}").json()["state"]
        rows.append(
            (
                "user request (pt2 of the best) while another job runs",
                f"{state} after {waited:.2f} s (other job {running})"
                if state in ("done", "failed")
                else f"not made within {args.request_timeout:.0f} s (other job {running})",
            )
        )
        api.post(f"/v1/jobs/{busy}/cancel")
        wait_until(lambda: api.get(f"/v1/jobs/{busy}").json()["state"] == "cancelled", 300, 0.1)
        api.close()

    width = max(len(k) for k, _ in rows)
    print(f"\nexports (SQLite, embedded worker, {os.cpu_count()} CPUs)")
    print(f"{'measure':<{width}} | result")
    print(f"{'-' * width}-+-{'-' * 40}")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--source", type=Path, default=None, help="run the server from this checkout")
    parser.add_argument("--no-export", action="store_true", help="skip the export-stage job")
    parser.add_argument("--export-budget", type=int, default=30, help="evaluations of the export-stage job")
    parser.add_argument("--workers-only", action="store_true", help="only the 1 vs 2 workers comparison")
    parser.add_argument("--export-only", action="store_true", help="only the export times of a finished search")
    parser.add_argument(
        "--request-timeout", type=float, default=120.0, help="--export-only: seconds to wait for a user's request"
    )
    parser.add_argument("--window", type=float, default=45.0, help="seconds counted per --workers-only setup")
    parser.add_argument("--pg", default=None, help="PostgreSQL server URL for --workers-only (a fresh database)")
    parser.add_argument("--watch", nargs=3, metavar=("URL", "JOB", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch:
        watch_main(args.watch[0], args.watch[1], int(args.watch[2]))
        return
    if args.workers_only:
        workers_main(args)
        return
    if args.export_only:
        export_main(args)
        return

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-") as tmp, serve(Path(tmp) / "data", args.source) as url:
        api, base, _warm = _client_and_warm_up(url)

        t0 = time.perf_counter()
        job = api.post("/v1/jobs", json={**base, "budget": 1000, "export_formats": ["onnx"]}).json()["id"]
        wait_until(lambda: api.get(f"/v1/jobs/{job}").json()["progress"]["done"] >= 1, 300)
        first = time.perf_counter() - t0
        rows.append(("submit -> first candidate (SQLite, embedded worker)", f"{first:.2f} s"))

        get_latencies(api, 20)  # warm the connection
        idle = get_latencies(api, args.requests)
        with Watchers(url, job, args.watchers) as w:
            busy = get_latencies(api, args.requests)
            snapshots = list(w.first_ms)
        for label, lat in ((f"GET /v1/jobs, 0 watchers ({args.requests} requests)", idle),
                           (f"GET /v1/jobs, {args.watchers} SSE watchers", busy)):  # fmt: skip
            rows.append((label, f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms"))
        rows.append(
            (
                f"{args.watchers} watchers: time to the snapshot",
                f"p50 {statistics.median(snapshots):.0f} ms, max {max(snapshots):.0f} ms ({len(snapshots)} streams)",
            )
        )
        api.post(f"/v1/jobs/{job}/cancel")
        wait_until(lambda: api.get(f"/v1/jobs/{job}").json()["state"] == "cancelled", 120, 0.1)

        if not args.no_export:
            spec = {**base, "budget": args.export_budget, "export_formats": ["onnx"]}
            exp = api.post("/v1/jobs", json=spec).json()["id"]
            wait_until(lambda: api.get(f"/v1/jobs/{exp}").json()["state"] in ("succeeded", "failed"), 900, 0.2)
            final = api.get(f"/v1/jobs/{exp}").json()
            with api.stream("GET", f"/v1/jobs/{exp}/events") as r:
                events = list(events_of(r.iter_lines()))
            at = [datetime.fromisoformat(e["created_at"]) for e in events if e.get("kind") == "evaluation"]
            end = [datetime.fromisoformat(e["created_at"]) for e in events if e.get("to_state") == final["state"]]
            exports = api.get(f"/v1/jobs/{exp}/models").json()
            export_s = (end[-1] - at[-1]).total_seconds() if at and end else float("nan")
            rows.append(
                (
                    f"export stage ({final['state']}; {args.export_budget} evaluations)",
                    f"{export_s:.1f} s for a front of {final['front_size']} ({len(exports)} ONNX files)",
                )
            )
        api.close()

    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure':<{width}} | result")
    print(f"{'-' * width}-+-{'-' * 60}")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


if __name__ == "__main__":
    main()
