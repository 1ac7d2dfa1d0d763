"""The service's command line, end to end: ``autoprune serve`` (API + embedded worker) as a subprocess, driven by
the client commands (``submit``, ``watch``, ``jobs``, ``download``, ``cancel``) as subprocesses; the downloaded
ONNX model runs in ONNX Runtime and reproduces the recorded figures."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest

ASSET = Path(__file__).resolve().parents[2] / "autoprune" / "assets" / "resnet20-digits.safetensors"

if TYPE_CHECKING:
    from tests.service.conftest import ServerProcess as Serve


CLI_TERMINAL = {"COLUMNS": "200", "NO_COLOR": "1"}
"""Added to the clean environment of every subprocess here: wide, colourless output."""


@pytest.fixture(scope="session")
def cli_env(clean_env: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    """conftest's ``clean_env`` with CLI_TERMINAL."""
    return lambda **extra: clean_env(**{**CLI_TERMINAL, **extra})


@pytest.fixture(scope="session")
def cli(cli_env: Callable[..., dict[str, str]]) -> Callable[..., Any]:
    """A function: ``python -m service.cli *args`` (output captured, no check), by default in ``cli_env()``."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None) -> Any:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            capture_output=True,
            text=True,
            env=env or cli_env(),
            timeout=timeout,
            cwd=cwd,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def start_serve(start_server: Callable[..., Serve]) -> Callable[..., Serve]:
    """A function ``(tmp, *serve_args, **env)``: conftest's ``start_server`` on ``tmp / "data"`` with
    CLI_TERMINAL, 90 s to come up."""
    return lambda tmp, *extra, **env: start_server(tmp / "data", *extra, timeout=90, **{**CLI_TERMINAL, **env})


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory, start_serve: Callable[..., Serve]) -> Iterator[Serve]:
    """``serve --no-worker``: jobs stay queued."""
    s = start_serve(tmp_path_factory.mktemp("cli"), "--no-worker", AUTOPRUNE_API_KEYS='["cli-key-0123456789abc"]')
    try:
        yield s
    finally:
        assert s.stop(60) is not None, "still running 60 s after SIGTERM (killed)"


def onnx_accuracy(path: Path) -> tuple[float, int]:
    """Accuracy of an ONNX classifier on the digits validation split the worker evaluated on."""
    import onnxruntime as ort

    from autoprune.data import load_dataset

    ds = load_dataset("digits")  # the job's dataset: the same split (val_fraction 0.2, seed 0)
    assert ds.y_val is not None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x, y = ds.x_val.numpy(), ds.y_val.numpy()
    preds = np.concatenate([sess.run(None, {name: x[i : i + 64]})[0].argmax(1) for i in range(0, len(x), 64)])
    return float((preds == y).mean()), len(y)


@pytest.mark.slow
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_serve_submit_watch_download(
    tmp_path: Path, db: str, request: pytest.FixtureRequest, start_serve: Callable[..., Serve], cli: Any
) -> None:
    url = request.getfixturevalue("pg_url" if db == "postgresql" else "sqlite_url")
    s = start_serve(tmp_path, "--upgrade", AUTOPRUNE_DATABASE_URL=url)
    try:
        # serve generated a key, saved it and printed it
        assert f"API key: {s.key}" in s.output()
        worker_pids = children_of(s.proc.pid)
        assert len(worker_pids) == 1, s.output()

        sub = cli(
            "submit", "--model", "resnet20", "--weights", str(ASSET), "--data", "digits",  # the default knapsack
            "--option", "probe_ratios=[0.5]", "--budget", "3", "--max-ratio", "0.5", "--export", "onnx", "--export", "safetensors", "--export", "pt2",
            *s.args(),
        )  # fmt: skip
        assert sub.returncode == 0, sub.stderr + s.output()
        job_id = sub.stdout.strip().splitlines()[-1]
        assert len(job_id) == 32 and "uploading" in sub.stderr

        watch = cli("watch", job_id, *s.args())
        assert watch.returncode == 0, watch.stdout + watch.stderr + s.output()
        assert "queued -> running" in watch.stdout and "running -> succeeded" in watch.stdout
        assert f"job {job_id} succeeded" in watch.stdout

        listing = cli("jobs", "--json", *s.args())
        assert listing.returncode == 0
        job = next(j for j in json.loads(listing.stdout)["items"] if j["id"] == job_id)
        assert job["state"] == "succeeded" and job["progress"] == {"done": 3, "total": 3}
        assert job["attempts"] == 1 and job["best"] is not None

        out = tmp_path / "out" / "best.onnx"
        dl = cli("download", job_id, "--format", "onnx", "-o", str(out), *s.args())
        assert dl.returncode == 0, dl.stderr
        assert f"wrote {out}" in dl.stdout

        with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.key}"}) as api:
            meta = api.get(f"/v1/jobs/{job_id}/models/best/meta", params={"format": "onnx"}).json()
            evals = api.get(f"/v1/jobs/{job_id}/evaluations").json()
            pareto = api.get(f"/v1/jobs/{job_id}/pareto").json()
            events = api.get(f"/v1/jobs/{job_id}/events").text
        # the file is the recorded export, and it reproduces the recorded figures in ONNX Runtime
        assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        assert meta["meta"]["best"] is True
        assert (meta["index"], meta["stage"]) == (job["best"]["index"], job["best"]["stage"])
        recorded = meta["evaluation"]["quality"]
        assert recorded == pytest.approx(job["best"]["quality"])
        accuracy, n = onnx_accuracy(out)
        assert abs(accuracy - recorded) <= 1.0 / n + 1e-9, (accuracy, recorded)
        assert meta["evaluation"]["params"] == meta["meta"]["evaluation"]["params"]

        assert evals["total"] == 4  # the unpruned baseline + 3 candidates
        assert len(pareto["points"]) == job["front_size"] >= 1
        assert events.count("event: evaluation") == 4 and events.count("event: snapshot") == 1
        assert events.count("event: probes") == 1  # the default knapsack's table, stored when probing ended

        # every front point was exported; any of them downloads, in either format
        point = pareto["points"][-1]["index"]
        st = tmp_path / "point.zip"
        dl2 = cli("download", job_id, "--point", str(point), "--format", "safetensors", "-o", str(st), *s.args())
        assert dl2.returncode == 0, dl2.stderr
        assert set(zipfile.ZipFile(st).namelist()) == {"model.safetensors", "model.plan.json", "evaluation.json"}
        # ... and as a torch.export program, which loads safely (no unpickling) and matches the ONNX file
        pt2_file = tmp_path / "best.pt2"
        dl3 = cli("download", job_id, "--format", "pt2", "-o", str(pt2_file), *s.args())
        assert dl3.returncode == 0, dl3.stderr
        import onnxruntime as ort
        import torch

        from autoprune.models.pt2 import load_pt2

        program, _ = load_pt2(pt2_file)
        x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        want = session.run(None, {session.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            got = program(torch.from_numpy(x)).numpy()
        assert np.abs(got - want).max() < 1e-4

        finished = cli("cancel", job_id, *s.args())
        assert finished.returncode == 2 and "error:" in finished.stderr and "409" in finished.stderr
    finally:
        code = s.stop(60)
    assert code == 0, s.output()  # None: still running 60 s after SIGTERM (killed)
    assert "Traceback" not in s.output(), s.output()
    for pid in worker_pids:  # the embedded worker went down with the server
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_client_commands_and_their_errors(
    api_only: Serve, tmp_path: Path, cli: Any, cli_env: Callable[..., dict[str, str]]
) -> None:
    s = api_only
    sub = cli("submit", "-m", "resnet20", "-d", "digits", "-n", "2", "--option", "ratios=[0.1]", *s.args())
    assert sub.returncode == 2 and "error:" in sub.stderr and "no option" in sub.stderr  # not an option of knapsack

    sub = cli("submit", "-m", "resnet20", "-d", "digits", "-n", "2", "--idempotency-key", "abc", *s.args())
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    again = cli("submit", "-m", "resnet20", "-d", "digits", "-n", "2", "--idempotency-key", "abc", *s.args())
    assert again.stdout.strip() == job_id

    listed = cli("jobs", "--state", "queued", *s.args())
    assert listed.returncode == 0 and job_id in listed.stdout and "knapsack" in listed.stdout

    early = cli("download", job_id, "-o", str(tmp_path / "x.onnx"), *s.args())
    assert early.returncode == 2 and "queued" in early.stderr and not (tmp_path / "x.onnx").exists()

    # settings from the environment instead of flags
    env = cli_env(AUTOPRUNE_URL=s.url, AUTOPRUNE_API_KEY=s.key)
    cancelled = cli("cancel", job_id, env=env)
    assert cancelled.returncode == 0 and f"job {job_id} cancelled" in cancelled.stdout
    watched = cli("watch", job_id, env=env)
    assert watched.returncode == 1 and f"job {job_id} cancelled" in watched.stdout
    gone = cli("download", job_id, env=env)
    assert gone.returncode == 2 and "best point" in gone.stderr

    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((30, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 30))
    up = cli("submit", "-m", "resnet20", "-d", str(data), "--weights", str(ASSET), "--seconds", "30", env=env)
    assert up.returncode == 0, up.stderr
    job = httpx.get(f"{s.url}/v1/jobs/{up.stdout.strip()}", headers={"Authorization": f"Bearer {s.key}"}).json()
    assert job["spec"]["seconds"] == 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "-m", "resnet20", "-d", "digits", "-s", "annealing"], "unknown strategy"),
        (["submit", "-m", "resnet21", "-d", "digits"], "unknown architecture"),
        (["submit", "-m", "resnet20", "-d", "digits", "-w", "/no/such.safetensors"], "no such file"),
        (["submit", "-m", "resnet20", "-d", "digits", "--kw", "oops"], "KEY=VALUE"),
        (["submit", "-d", "digits"], "--model"),
        (["watch", "0123456789abcdef"], "not found"),
        (["download", "0123456789abcdef", "--format", "tflite"], "--format"),
    ],
)
def test_cli_errors_are_one_line_exit_2(api_only: Serve, args: list[str], message: str, cli: Any) -> None:
    r = cli(*args, *api_only.args())
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message.lower() in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_server_missing_or_wrong_key(
    api_only: Serve, tmp_path: Path, cli: Any, cli_env: Callable[..., dict[str, str]], free_port: Callable[[], int]
) -> None:
    dead = cli("jobs", "--url", f"http://127.0.0.1:{free_port()}", "--key", "k")
    assert dead.returncode == 2 and "cannot reach" in dead.stderr
    wrong = cli("jobs", "--url", api_only.url, "--key", "nope")
    assert wrong.returncode == 2 and "401" in wrong.stderr and "invalid API key" in wrong.stderr
    nokey = cli("jobs", "--url", api_only.url, env=cli_env(AUTOPRUNE_DATA_DIR=str(tmp_path)))
    assert nokey.returncode == 2 and "no API key" in nokey.stderr
    # the key file serve writes is the default key
    (tmp_path / "api-key").write_text("cli-key-0123456789abc\n")
    keyed = cli("jobs", "--url", api_only.url, env=cli_env(AUTOPRUNE_DATA_DIR=str(tmp_path)))
    assert keyed.returncode == 0, keyed.stderr


def test_db_upgrade(tmp_path: Path, cli: Any) -> None:
    for _ in range(2):  # idempotent
        r = cli("db", "upgrade", "--data-dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert "database at revision" in r.stdout
    assert (tmp_path / "autoprune.db").is_file()


def test_library_commands_are_still_there(cli: Any) -> None:
    r = cli("--help")
    assert r.returncode == 0
    for command in ("measure", "prune", "search", "strategies", "serve", "worker", "db", "submit", "jobs", "watch"):
        assert command in r.stdout


@pytest.mark.slow
def test_serve_demo(tmp_path: Path, cli_env: Callable[..., dict[str, str]], free_port: Callable[[], int]) -> None:
    """The README's one command: serve, submit the bundled demo job, watch it, download the best ONNX, exit."""
    port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--demo", "--budget", "2", "--port", str(port)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    best = tmp_path / "out" / "demo-best.onnx"
    assert best.is_file() and f"best model: out{os.sep}demo-best.onnx" in r.stdout
    assert "running -> succeeded" in r.stdout
    assert (tmp_path / "autoprune-data" / "api-key").is_file()
    accuracy, _ = onnx_accuracy(best)
    assert accuracy > 0.9


# -- settings as operators write them (issue 13: HIGH 1, 3) -------------------------------------------------------
LONG_A, LONG_B = "operator-key-a-0123456789", "operator-key-b-0123456789"


@pytest.mark.parametrize(
    "written",
    [f"{LONG_A},{LONG_B}", f" {LONG_A} , {LONG_B} ", json.dumps([LONG_A, LONG_B])],
    ids=["csv", "spaces", "json"],
)
def test_api_keys_as_documented_start_the_server_and_every_key_works(
    tmp_path: Path, start_serve: Callable[..., Serve], written: str
) -> None:
    s = start_serve(tmp_path, "--no-worker", AUTOPRUNE_API_KEYS=written)
    try:
        for key in (LONG_A, LONG_B):
            with s.client(key) as c:
                assert c.get("/v1/jobs").status_code == 200
        with s.client(written.strip()) as c:  # the whole variable is not itself a key
            assert c.get("/v1/jobs").status_code == 401
    finally:
        assert s.stop(60) == 0


def test_a_single_key_without_brackets_is_one_key(tmp_path: Path, start_serve: Callable[..., Serve]) -> None:
    s = start_serve(tmp_path, "--no-worker", AUTOPRUNE_API_KEYS=LONG_A)
    try:
        with s.client(LONG_A) as c:
            assert c.get("/v1/jobs").status_code == 200
    finally:
        assert s.stop(60) == 0


@pytest.mark.parametrize(("keys", "why"), [("change-me", "placeholder"), ("k1,k2", "characters long")])
def test_weak_keys_refuse_to_serve_in_one_line(tmp_path: Path, cli: Any, cli_env: Any, keys: str, why: str) -> None:
    env = cli_env(AUTOPRUNE_API_KEYS=keys)
    r = cli("serve", "--no-worker", "--data-dir", str(tmp_path / "data"), "--port", "1", env=env, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: AUTOPRUNE_API_KEYS") and why in lines[0], r.stderr
    assert "k1" not in lines[0] and "change-me" not in lines[0]  # the key itself is never echoed
    # the commands that need no key are not blocked by it (the shipped compose file shares one environment)
    up = cli("db", "upgrade", "--data-dir", str(tmp_path / "data"), env=env)
    assert up.returncode == 0 and "database at revision" in up.stdout, up.stderr


def test_a_malformed_settings_value_is_one_line_naming_the_variable(tmp_path: Path, cli: Any, cli_env: Any) -> None:
    for args in (["db", "upgrade"], ["worker", "--max-jobs", "0"]):
        env = cli_env(AUTOPRUNE_LEASE_SECONDS="soon", AUTOPRUNE_DATA_DIR=str(tmp_path))
        r = cli(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().startswith("error: AUTOPRUNE_LEASE_SECONDS") and "Traceback" not in r.stderr


def test_serving_beyond_loopback_warns(tmp_path: Path, start_serve: Callable[..., Serve]) -> None:
    s = start_serve(tmp_path, "--no-worker", "--host", "0.0.0.0", AUTOPRUNE_API_KEYS=LONG_A)
    try:
        out = s.output()
        assert "API on http://0.0.0.0:" in out and "127.0.0.1" not in out.split("docs:")[0]
        assert "warning: listening on 0.0.0.0, reachable from other machines" in out
    finally:
        assert s.stop(60) == 0
    (tmp_path / "local").mkdir()
    local = start_serve(tmp_path / "local", "--no-worker", AUTOPRUNE_API_KEYS=LONG_A)
    try:
        assert "warning" not in local.output()
    finally:
        assert local.stop(60) == 0
