"""The full ``autoprune`` command line: the library's commands (:mod:`autoprune.cli`) plus the service's.

Service commands: ``serve`` (API + one embedded worker; ``--demo`` runs the whole tour), ``worker``,
``db upgrade``, and the client commands ``submit``, ``jobs``, ``watch``, ``cancel``, ``download``. The client
commands take the server from ``--url`` / ``AUTOPRUNE_URL`` (default http://127.0.0.1:8000) and the key from
``--key`` / ``AUTOPRUNE_API_KEY`` (default: the key ``serve`` wrote into ``<data_dir>/api-key``). Every error is
one line ``error: ...`` with exit status 2.

The ``serve`` process itself never imports torch: the embedded worker is a child process.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from autoprune.cli import _fail, _opt, _parse_kwargs, app, console, err_console, spec_flags
from autoprune.names import SUFFIXES

__all__ = ["app", "main"]

db_app = typer.Typer(help="The service's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Server URL (env AUTOPRUNE_URL; default http://127.0.0.1:8000).")
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", help="API key (env AUTOPRUNE_API_KEY; default: <data_dir>/api-key written by serve)."),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (env AUTOPRUNE_DATA_DIR; default ./autoprune-data).")
]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Client errors (API problems, an unreachable server, files) become ``error: ...`` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import httpx

        from autoprune.errors import AutopruneError
        from service.client import ApiError
        from service.pinning import CpuSpecError
        from service.settings import InvalidSettings

        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            _fail(str(exc).splitlines()[0])
        except httpx.ConnectError:
            url = kwargs.get("url") or os.environ.get("AUTOPRUNE_URL") or "http://127.0.0.1:8000"
            _fail(f"cannot reach the autoprune server at {url} (start it with `autoprune serve`)")
        except httpx.HTTPError as exc:
            _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'HTTP error'}")
        except (CliError, AutopruneError, InvalidSettings, CpuSpecError) as exc:
            _fail(str(exc).splitlines()[0])
        except FileNotFoundError as exc:
            _fail(f"no such file: {exc.filename}")
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _client(url: str | None, key: str | None) -> Any:
    from service.client import Client

    client = Client(url, key)
    if not client.key:
        client.close()
        raise CliError(
            "no API key: pass --key, set AUTOPRUNE_API_KEY, or run `autoprune serve` (it writes <data_dir>/api-key)"
        )
    return client


def _settings(data_dir: Path | None) -> Any:
    from service.settings import load_settings

    return load_settings(data_dir=data_dir) if data_dir is not None else load_settings()


# --- live progress -------------------------------------------------------------------------------------------------


def _best_text(best: dict[str, Any] | None, front: int | None) -> str:
    if not best:
        return ""
    speed = best.get("speedup")
    speed_s = f", {speed:.2f}x" if isinstance(speed, int | float) else ""
    metric = best.get("metric") or "quality"
    return (
        f"best: #{best.get('index')} reward {best.get('reward', 0.0):.3f} "
        f"({metric} {best.get('quality', 0.0):.3f}{speed_s}) | front {front or 0}"
    )


def watch_job(client: Any, job_id: str) -> dict[str, Any]:
    """Follow a job's live events with a progress bar; the final job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[best]}"),
        console=console,
        transient=False,
    )
    task: Any = None
    with progress:
        for ev in client.events(job_id):
            data = ev.data if isinstance(ev.data, dict) else {}
            if ev.event == "snapshot":
                p = data.get("progress") or {}
                if task is None:
                    task = progress.add_task(
                        str(data.get("state", "")),
                        total=p.get("total"),
                        completed=p.get("done", 0),
                        best=_best_text(data.get("best"), data.get("front_size")),
                    )
                continue
            if task is None:
                continue
            inner = data.get("data") or {}
            if ev.event == "evaluation":
                progress.update(
                    task,
                    completed=inner.get("done", 0),
                    total=inner.get("total"),
                    best=_best_text(inner.get("best"), inner.get("front_size")),
                )
            elif ev.event == "state":
                to = data.get("to_state")
                progress.update(task, description=str(to))
                note = inner.get("error") or inner.get("reason") or ""
                if data.get("from_state") is not None:
                    progress.console.print(
                        f"{data.get('from_state')} -> {to}" + (f": {note}" if note else ""), highlight=False
                    )
            elif ev.event == "finetune":
                loss = inner.get("best_val_loss")
                progress.update(
                    task,
                    description=f"fine-tuning point {inner.get('index')}: step {inner.get('step')}/{inner.get('total')}"
                    + (f", val loss {loss:.4f}" if isinstance(loss, int | float) else ""),
                )
            elif ev.event == "log" and inner.get("message"):
                progress.console.print(f"[dim]{inner['message']}[/]", highlight=False)
    job: dict[str, Any] = client.job(job_id)
    best = job.get("best")
    if job["state"] == "succeeded" and best:
        console.print(
            f"job {job['id']} succeeded: {job['progress']['done']} evaluations, front of {job['front_size']}; "
            + _best_text(best, job.get("front_size")).split(" | ")[0],
            highlight=False,
        )
    elif job["state"] == "failed":
        err_console.print(f"job {job['id']} failed: {job.get('error')}", highlight=False)
    else:
        console.print(f"job {job['id']} {job['state']}", highlight=False)
    return job


# --- client commands -----------------------------------------------------------------------------------------------


@app.command()
@_guard
@spec_flags
def submit(
    model: Annotated[str | None, _opt("Built-in architecture name or a .pt2 file.", "--model", "-m")] = None,
    data: Annotated[
        str | None, _opt("Built-in dataset (digits, mnist1d) or a .npz/.safetensors file.", "--data", "-d")
    ] = None,
    weights: Annotated[Path | None, _opt("Weights for the architecture (.safetensors).", "--weights", "-w")] = None,
    pt2: Annotated[Path | None, _opt("A torch.export program (.pt2) instead of an architecture.", "--pt2")] = None,
    kw: Annotated[list[str] | None, _opt("Architecture keyword argument KEY=VALUE (JSON value).", "--kw")] = None,
    option: Annotated[list[str] | None, _opt("Strategy option KEY=VALUE (JSON value).", "--option")] = None,
    spec: Annotated[Path | None, _opt("A JSON/YAML job spec (same keys); flags override it.", "--spec")] = None,
    idempotency_key: Annotated[str | None, _opt("Idempotency-Key of the job request.", "--idempotency-key")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job live until it finishes.")] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
    knobs: dict[str, Any] | None = None,
) -> None:
    """Upload a model and data to the server and create a search job; prints the job id."""
    base: dict[str, Any] = {}
    if spec is not None:
        from autoprune.job import read_spec_file

        base = read_spec_file(spec)  # InvalidConfigError: one line, exit 2 (see _guard)
    body = {k: v for k, v in base.items() if k not in ("model", "data", "weights", "kwargs")}
    body.update({k: list(v) if isinstance(v, tuple) else v for k, v in (knobs or {}).items()})
    if option:
        body["strategy_options"] = {**body.get("strategy_options", {}), **_parse_kwargs(option, "--option")}
    kwargs = {**(base.get("kwargs") or {}), **_parse_kwargs(kw, "--kw")}
    model = model or (str(base["model"]) if base.get("model") else None)
    data = data or (str(base["data"]) if base.get("data") else None)
    if pt2 is not None:
        model = model or pt2.name
    if model is None:
        raise CliError("give --model (an architecture name or a .pt2 file), --pt2, or a --spec file with 'model'")
    if data is None:
        raise CliError("give --data (digits, mnist1d or an .npz/.safetensors file) or a --spec file with 'data'")
    if weights is None and base.get("weights"):
        weights = Path(base["weights"])
    if pt2 is not None and weights is not None:
        raise CliError("give --weights (for an architecture) or --pt2, not both")

    with _client(url, key) as client:
        if pt2 is not None or model.lower().endswith(".pt2"):
            source = pt2 or Path(model)
            err_console.print(f"uploading {source} ...", highlight=False)
            m = client.upload_model(pt2=source, name=source.name)
        else:
            if weights is not None:
                err_console.print(f"uploading {weights} ...", highlight=False)
            m = client.upload_model(model, weights=weights, kwargs=kwargs or None)
        if Path(data).suffix.lower() in (".npz", ".safetensors"):
            err_console.print(f"uploading {data} ...", highlight=False)
            d = client.create_dataset(file=data, name=Path(data).stem)
        else:
            d = client.create_dataset(data)
        job = client.create_job(m["id"], d["id"], idempotency_key=idempotency_key, **body)
        console.print(job["id"], highlight=False)
        if watch:
            final = watch_job(client, job["id"])
            if final["state"] != "succeeded":
                raise typer.Exit(1)


@app.command()
@_guard
def jobs(
    state: Annotated[str | None, _opt("Only jobs in this state.", "--state")] = None,
    limit: Annotated[int, typer.Option("--limit", help="How many (newest first).")] = 20,
    offset: Annotated[int, typer.Option("--offset", help="Skip this many.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """List the server's jobs."""
    with _client(url, key) as client:
        page = client.jobs(state=state, offset=offset, limit=limit)
    if as_json:
        console.print_json(json.dumps(page))
        return
    table = Table(title=f"jobs {page['offset'] + 1}-{page['offset'] + len(page['items'])} of {page['total']}")
    for col in ("id", "state", "strategy", "progress", "best", "front", "created"):
        table.add_column(col)
    for j in page["items"]:
        p = j["progress"]
        best = j.get("best") or {}
        speed = best.get("speedup")
        table.add_row(
            j["id"],
            j["state"] + (" (cancelling)" if j.get("cancel_requested") and j["state"] == "running" else ""),
            str(j["spec"].get("strategy", "")),
            f"{p['done']}/{p['total'] if p['total'] is not None else '?'}",
            f"{best.get('quality', 0):.3f} @ {speed:.2f}x" if isinstance(speed, int | float) else "",
            str(j.get("front_size", 0)),
            str(j["created_at"])[:19].replace("T", " "),
        )
    console.print(table)


@app.command()
@_guard
def watch(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Follow a job live (progress bar from its event stream) until it finishes; exit 1 unless it succeeded."""
    with _client(url, key) as client:
        final = watch_job(client, job_id)
    if final["state"] != "succeeded":
        raise typer.Exit(1)


@app.command()
@_guard
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Cancel a job (a running one stops within one evaluation)."""
    with _client(url, key) as client:
        job = client.cancel(job_id)
    if job["state"] == "running":
        console.print(f"job {job['id']}: cancel requested (it stops after the current evaluation)", highlight=False)
    else:
        console.print(f"job {job['id']} {job['state']}", highlight=False)


@app.command()
@_guard
def download(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    point: Annotated[str, typer.Option("--point", help="'best' or a front point's evaluation index.")] = "best",
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, safetensors (zip with the plan) or pt2.")] = (
        "onnx"
    ),
    stage: Annotated[str | None, _opt("search or finetuned (default: finetuned if exported).", "--stage")] = None,
    output: Annotated[Path | None, _opt("Output file (default ./job-<id>-<point>.<ext>).", "--output", "-o")] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Do not wait for a point not exported yet: queue it, exit 3.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Seconds to wait for a queued export (then exit 3).")
    ] = 600.0,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Download an exported model of a job and print its recorded figures: a numbered point of a running job
    too, ``best`` once the job has finished (or was cancelled, or failed). A point not exported yet is requested
    and waited for (exit status 3 when it is not ready in time)."""
    from service.client import ExportFailed, ExportPending

    if format not in SUFFIXES:
        raise CliError(f"--format must be one of {', '.join(SUFFIXES)}, got {format!r}")
    with _client(url, key) as client:
        dest = output or Path(f"job-{job_id[:12]}-{point}{SUFFIXES[format]}")
        try:
            path = client.download(
                job_id, dest, point=point, format=format, stage=stage, wait=not no_wait, timeout=timeout
            )
        except ExportPending as exc:
            err_console.print(f"{exc}; run download again later", highlight=False)
            raise typer.Exit(3) from None
        except ExportFailed as exc:
            raise CliError(str(exc)) from None
        meta = client.model_meta(job_id, point, format=format, stage=stage)
    ev = (meta.get("meta") or {}).get("evaluation") or {}
    figures = ""
    if ev:
        speed = ev.get("speedup")
        figures = (
            f": {ev.get('metric') or 'quality'} {ev.get('quality', 0):.4f}, {ev.get('latency_ms', 0):.3f} ms"
            + (f" ({speed:.2f}x)" if isinstance(speed, int | float) else "")
            + f", {ev.get('params', 0):,} params"
        )
    console.print(
        f"wrote {path} ({path.stat().st_size:,} bytes), {meta['stage']} point {meta['index']}{figures}",
        highlight=False,
    )


# --- server side ---------------------------------------------------------------------------------------------------


@db_app.command("upgrade")
@_guard
def db_upgrade(data_dir: DataDirOpt = None) -> None:
    """Create or migrate the database schema to the latest revision (AUTOPRUNE_DATABASE_URL or the SQLite file)."""
    from service.db.engine import current_revision, upgrade

    settings = _settings(data_dir)
    upgrade(settings.db_url)
    console.print(f"database at revision {current_revision(settings.db_url)}", highlight=False)


@app.command()
def worker(
    worker_id: Annotated[str | None, _opt("Name in the job's events (default host:pid:random).", "--worker-id")] = None,
    database_url: Annotated[str | None, _opt("Overrides AUTOPRUNE_DATABASE_URL.", "--database-url")] = None,
    max_jobs: Annotated[int | None, _opt("Exit after processing this many jobs.", "--max-jobs")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="Logging level.")] = "INFO",
    cpus: Annotated[
        str | None,
        _opt(
            "Pin the worker to these cores, e.g. 0, 0-1 or 0,2 (default: every core, taking turns with the host's "
            "other workers to time latency; AUTOPRUNE_MEASURE_LOCK).",
            "--cpus",
        ),
    ] = None,
) -> None:
    """Run a worker: claim queued jobs and run them until SIGTERM (which finishes the current evaluation)."""
    from service.worker import main as worker_main

    argv = ["--log-level", log_level]
    if cpus is not None:
        argv += ["--cpus", cpus]
    if worker_id:
        argv += ["--worker-id", worker_id]
    if database_url:
        argv += ["--database-url", database_url]
    if max_jobs is not None:
        argv += ["--max-jobs", str(max_jobs)]
    raise typer.Exit(worker_main(argv))


def ensure_api_key(settings: Any) -> tuple[list[str], Path | None]:
    """The configured keys, else the key in ``<data_dir>/api-key``, else a new one written there (0600)."""
    from service.api.app import read_key_file

    if settings.api_keys:
        return list(settings.api_keys), None
    path: Path = settings.data_dir / "api-key"
    keys = read_key_file(settings.data_dir)
    if not keys:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
        keys = [key]
    return keys, path


def _start_worker(settings: Any, log_level: str, cpus: str | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AUTOPRUNE_DATA_DIR": str(settings.data_dir.resolve()),
        "AUTOPRUNE_DATABASE_URL": settings.db_url,
        "AUTOPRUNE_ARTEFACT_DIR": str(settings.artefacts),
    }
    # its own process group: a Ctrl-C in the terminal reaches serve only, which then stops the worker with one
    # SIGTERM (a second signal would stop the worker mid-evaluation)
    argv = [sys.executable, "-m", "service.worker", "--log-level", log_level]
    if cpus is not None:
        argv += ["--cpus", cpus]
    return subprocess.Popen(argv, env=env, process_group=0)


def _make_server(config: Any) -> Any:
    """uvicorn's Server, except that a SIGTERM/SIGINT is not re-raised after the graceful shutdown (uvicorn does
    that to exit with the signal's status): ``serve`` must stop its embedded worker first, then exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server(config)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost`` or a loopback address)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _serve_log(level: str) -> None:
    """serve's own log lines (the embedded worker's supervisor) on stderr, timestamped like the worker's."""
    import logging

    logger = logging.getLogger("autoprune.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


@app.command()
@_guard
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    data_dir: DataDirOpt = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Run the API only (workers run elsewhere).")] = False,
    upgrade_db: Annotated[
        bool | None,
        typer.Option("--upgrade/--no-upgrade", help="Migrate the schema on start (default: for SQLite only)."),
    ] = None,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Submit the bundled demo job, watch it, download the best ONNX model, exit."),
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where --demo writes the best model.")] = Path("out"),
    budget: Annotated[int, typer.Option("--budget", help="Evaluations of the --demo job.")] = 6,
    log_level: Annotated[str, typer.Option("--log-level", help="Server log level.")] = "info",
    worker_cpus: Annotated[
        str | None,
        typer.Option("--worker-cpus", help="Pin the embedded worker to these cores, e.g. 0, 0-1 or 0,2."),
    ] = None,
) -> None:
    """Serve the REST API (docs at /docs) with one embedded worker on the local SQLite database.

    Prints the API key (generated into <data_dir>/api-key unless AUTOPRUNE_API_KEYS is set).
    """
    import uvicorn

    from service.api.app import create_app
    from service.db.engine import is_sqlite, upgrade

    if worker_cpus is not None:
        from service.pinning import parse_cpus

        parse_cpus(worker_cpus)  # a bad value fails here, not in every restart of the embedded worker
    settings = _settings(data_dir)
    if upgrade_db if upgrade_db is not None else is_sqlite(settings.db_url):
        upgrade(settings.db_url)
    keys, key_file = ensure_api_key(settings)
    settings = settings.model_copy(update={"api_keys": keys})
    supervisor = None
    if not no_worker:
        from service.supervisor import WorkerSupervisor

        _serve_log("WARNING")
        worker_level = "WARNING" if demo else "INFO"
        supervisor = WorkerSupervisor(functools.partial(_start_worker, settings, worker_level, worker_cpus))
    api = create_app(settings, worker=supervisor)
    config = uvicorn.Config(
        api, host=host, port=port, log_level="warning" if demo else log_level, timeout_graceful_shutdown=5
    )
    server = _make_server(config)
    shown = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    console.print(f"[bold]autoprune[/] API on {shown} (docs: {shown}/docs)", highlight=False)
    if not _is_loopback(host):
        err_console.print(
            f"warning: listening on {host}, reachable from other machines: keep the API key secret and put TLS "
            "in front (a reverse proxy); --host 127.0.0.1 keeps it on this machine",
            highlight=False,
        )
    if key_file is not None:
        console.print(f"API key: {keys[0]}  (saved in {key_file})", highlight=False)
    try:
        if supervisor is not None:
            # supervised: reaped when it dies, the death logged, restarted with back-off, shown in /health
            console.print(f"embedded worker: pid {supervisor.start()}", highlight=False)
        if not demo:
            server.run()
            return
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise CliError(f"the server did not start on {host}:{port} (is the port in use?)")
            time.sleep(0.05)
        try:
            run_demo(shown, keys[0], out, budget=budget)
        finally:
            server.should_exit = True
            thread.join(timeout=15)
    finally:
        if supervisor is not None:
            supervisor.stop()  # SIGTERM: it finishes the current evaluation and releases its job


def run_demo(url: str, key: str, out: Path, *, budget: int = 6) -> Path:
    """Submit the bundled demo job (ResNet-20 with its shipped weights, the digits dataset, random search),
    watch it, download the best model as ONNX into ``out``; the downloaded file."""
    from service.client import Client

    with Client(url, key) as client:
        model = client.upload_model("resnet20", name="resnet20 (shipped digits weights)")
        data = client.create_dataset("digits")
        job = client.create_job(
            model["id"],
            data["id"],
            strategy="random",
            budget=budget,
            seed=0,
            max_ratio=0.5,
            select="latency",  # the fastest point within 2% of the unpruned accuracy
            max_quality_drop=0.02,
            finetune_top=2,
            finetune_steps=150,
            export_formats=["onnx"],
        )
        console.print(
            f"submitted job {job['id']}: resnet20 on digits, random search of {budget} plans, "
            "then the two fastest fine-tuned",
            highlight=False,
        )
        final = watch_job(client, job["id"])
        if final["state"] != "succeeded":
            raise CliError(f"the demo job {final['state']}: {final.get('error') or 'see the server log'}")
        dest = client.download(job["id"], out / "demo-best.onnx", point="best", format="onnx")
        meta = client.model_meta(job["id"], "best", format="onnx")
    ev = (meta.get("meta") or {}).get("evaluation") or {}
    export = (meta.get("meta") or {}).get("export") or {}
    speed, ort_speed = ev.get("speedup"), export.get("speedup")
    figures = [f"{ev.get('metric') or 'quality'} {ev.get('quality', 0):.4f}"]
    if isinstance(speed, int | float):
        figures.append(f"{speed:.2f}x faster in torch eager (measured in the search)")
    if isinstance(ort_speed, int | float):
        figures.append(f"{ort_speed:.2f}x in ONNX Runtime (the exported file re-timed against the unpruned one)")
    console.print(f"best model: {dest} ({dest.stat().st_size:,} bytes; {'; '.join(figures)})", highlight=False)
    return dest


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
