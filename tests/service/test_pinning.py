"""Worker pinning (``--cpus``) and the host-wide measurement lock as the service configures it: parsing and its
one-line errors, a real worker process pinned to a core, the settings, and a real job whose every latency figure
(search and the re-timed export) records that it held the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.db.engine import ensure_schema, make_engine
from service.db.repository import Repository
from service.pinning import CpuSpecError, format_cpus, parse_cpus
from service.settings import Settings, load_settings
from service.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
AVAILABLE = {0, 1, 2, 3, 6}


@pytest.mark.parametrize(
    ("spec", "cpus"),
    [("0", (0,)), ("0-1", (0, 1)), ("0,2", (0, 2)), (" 2,0-1 ", (0, 1, 2)), ("1,1", (1,)), ("0-3,6", (0, 1, 2, 3, 6))],
)
def test_parse_cpus(spec: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpus(spec, AVAILABLE) == cpus


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "give core numbers"),
        ("a", "'a' is not a core number"),
        ("0,,1", "'' is not a core number"),
        ("-1", "'-1' is not a core number"),
        ("1-", "'1-' is not a core number"),
        ("0-1-2", "'0-1-2' is not a core number"),
        ("3-1", "the range 3-1 runs backwards"),
        ("4", "core(s) 4 not available to this process (available: 0-3,6)"),
        ("0-9", "core(s) 4,5,7,8,9 not available"),
        ("0-99999999", "larger than any machine"),
    ],
)
def test_bad_cpu_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(CpuSpecError) as info:
        parse_cpus(spec, AVAILABLE)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_format_cpus() -> None:
    assert format_cpus({6, 0, 1, 2, 3}) == "0-3,6" and format_cpus([4]) == "4" and format_cpus([]) == "none"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPRUNE_")}
    return {**env, "PYTHONPATH": str(ROOT), "AUTOPRUNE_DATA_DIR": str(tmp_path / "data"), **extra}


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "service.worker", "--cpus", "x"],
        ["-m", "service.cli", "worker", "--cpus", "0-"],
        ["-m", "service.cli", "worker", "--cpus", "4096"],
        ["-m", "service.cli", "serve", "--worker-cpus", "4096"],
    ],
)
def test_cli_bad_cpus_exit_2_with_one_line(tmp_path: Path, argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=120, env=_env(tmp_path), cwd=ROOT
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cpus"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_an_unusable_lock_dir_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = _env(tmp_path, AUTOPRUNE_MEASURE_LOCK_DIR=str(blocker / "locks"))
    proc = subprocess.run(
        [sys.executable, "-m", "service.worker", "--max-jobs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: AUTOPRUNE_MEASURE_LOCK_DIR"), proc.stderr


def test_a_worker_started_with_cpus_runs_on_that_core(tmp_path: Path, wait_for: Callable[..., None]) -> None:
    core = max(os.sched_getaffinity(0))
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--cpus", str(core)],
            env=_env(tmp_path, AUTOPRUNE_POLL_SECONDS="0.2"),
            cwd=ROOT,
            stdout=fh,
            stderr=fh,
        )
    try:
        wait_for(lambda: "(pinned)" in log.read_text() or proc.poll() is not None, 120, "the worker to start")
        assert proc.poll() is None, log.read_text()
        assert os.sched_getaffinity(proc.pid) == {core}
        assert f"cpus {core} (pinned)" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(60)


def test_lock_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    default = Settings()
    assert default.measure_lock and default.measure_lock_dir == Path(tempfile.gettempdir()) / "autoprune-measure"
    assert default.latency_host == {"lock_dir": str(default.measure_lock_dir), "lock_timeout_s": 30.0}
    monkeypatch.setenv("AUTOPRUNE_MEASURE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("AUTOPRUNE_MEASURE_LOCK_TIMEOUT_S", "2.5")
    assert load_settings().latency_host == {"lock_dir": str(tmp_path / "locks"), "lock_timeout_s": 2.5}
    monkeypatch.setenv("AUTOPRUNE_MEASURE_LOCK", "false")
    assert load_settings().latency_host == {}
    monkeypatch.setenv("AUTOPRUNE_MEASURE_LOCK_TIMEOUT_S", "-1")
    with pytest.raises(Exception, match="AUTOPRUNE_MEASURE_LOCK_TIMEOUT_S"):
        load_settings()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("locked", [True, False])
def test_a_job_records_the_lock_in_every_latency_protocol(tmp_path: Path, locked: bool) -> None:
    locks = tmp_path / "locks"
    settings = Settings(data_dir=tmp_path / "data", measure_lock=locked, measure_lock_dir=locks, poll_seconds=0.2)
    ensure_schema(settings)
    engine = make_engine(settings.db_url)
    repo = Repository(engine)
    try:
        model = repo.create_model(
            name="r", kind="architecture", architecture="resnet20", kwargs={}, artefact_sha256=None
        )
        data = repo.create_dataset(name="d", kind="builtin", builtin="digits", artefact_sha256=None, info={})
        spec = {"strategy": "random", "budget": 1, "val_samples": 50, "bn_batches": 1, "export_formats": ["onnx"]}
        job, _ = repo.create_job(model_id=model.id, dataset_id=data.id, spec=spec, progress_total=1)
        worker = Worker(settings, "w-lock")
        try:
            assert worker.run_once()
        finally:
            worker.close()
        assert repo.get_job(job.id).state == "succeeded", repo.get_job(job.id).error
        protocols = [e.record["latency"]["protocol"] for e in repo.evaluations(job.id).items]
        protocols += [x.meta["export"]["latency"]["protocol"] for x in repo.exports(job.id) if x.meta["best"]]
    finally:
        engine.dispose()
    assert len(protocols) == 3  # the unpruned model, one candidate, the re-timed best export
    cpus = sorted(os.sched_getaffinity(0))
    for p in protocols:
        assert p["cpus"] == cpus
        assert p["exclusive"] == ("locked" if locked else "off")
    if locked:
        assert sorted(f.name for f in locks.iterdir()) == sorted(f"cpu{c}.lock" for c in cpus)
    else:
        assert not locks.exists()
