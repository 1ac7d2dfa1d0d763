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

``--source DIR`` runs the server from another checkout (e.g. ``git archive HEAD | tar -x -C /tmp/old``) with this
virtual environment, to compare before and after on the same machine.

    .venv/bin/python benchmarks/service.py [--watchers 50] [--requests 300] [--source DIR] [--no-export]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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

KEY = "benchmark-key-0123456789"


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON data of each event of a ``text/event-stream`` (this script is ``service.py``: it cannot import
    the ``service`` package's client, its own name shadows it)."""
    data: list[str] = []
    for line in lines:
        if line == "" and data:
            yield json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(data_dir: Path, source: Path | None) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPRUNE_")}
    env.update(AUTOPRUNE_API_KEYS=KEY, COLUMNS="200", NO_COLOR="1")
    log = (data_dir.parent / "serve.log").open("wb")
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=source)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited:\n{(data_dir.parent / 'serve.log').read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve did not come up")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
            for i, _ in enumerate(parse_sse(r.iter_lines())):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--source", type=Path, default=None, help="run the server from this checkout")
    parser.add_argument("--no-export", action="store_true", help="skip the export-stage job")
    parser.add_argument("--export-budget", type=int, default=30, help="evaluations of the export-stage job")
    parser.add_argument("--watch", nargs=3, metavar=("URL", "JOB", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch:
        watch_main(args.watch[0], args.watch[1], int(args.watch[2]))
        return

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-") as tmp, serve(Path(tmp) / "data", args.source) as url:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
        data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
        base = {"model_id": model, "dataset_id": data, "strategy": "random", "val_samples": 100, "max_ratio": 0.5}

        # a warm-up job: the worker imports torch and builds its first objective once (not what a submit costs)
        warm = api.post("/v1/jobs", json={**base, "budget": 1, "export_formats": ["onnx"]}).json()["id"]
        wait_until(lambda: api.get(f"/v1/jobs/{warm}").json()["state"] in ("succeeded", "failed"), 300, 0.2)

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
                events = list(parse_sse(r.iter_lines()))
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
