"""The worker: claim a job, run its search, record every evaluation as it happens, export the results.

``python -m service.worker`` (and ``autoprune worker``) runs :func:`main`: a loop that claims the oldest queued
job (or one whose worker died: its lease expired), holds the job's lease with a heartbeat thread, and runs
:func:`autoprune.job.run_job` with a progress callback that stores each evaluation
(:meth:`Repository.record_evaluation`) and renews the lease, reading ``cancel_requested`` back.

* **Resume.** The job's stored evaluations are the search's ``history``: a seeded strategy asks the same plans
  again and they are answered from the records (``replayed``), so a job reclaimed after a crash (kill -9) or a
  release (SIGTERM) redoes no completed evaluation; stored rows are never rewritten (recording is idempotent).
  A strategy that probes the groups first (``knapsack``, warm starts) has its probe table stored as a ``probes``
  event once probing ends and handed back on resume (``restore_probes``): a resumed job does not probe again.
* **Stop.** The stop signal between evaluations is: a cancel was requested (-> ``cancelled``), the worker is
  shutting down (first SIGTERM/SIGINT, or the ``stop_event`` of :meth:`Worker.run_forever`; the current
  evaluation finishes, then the job is released -> ``queued``), or the lease was lost (another worker owns the
  job now: this one just stops). A second signal terminates at once (the lease then expires and another worker
  resumes the job).
* **Fine-tuning** (``finetune_top``) runs point by point after the search; points already fine-tuned in an
  earlier attempt are taken from the records.
* **Exports.** The job's worker exports the best point under the job's ``select`` rule in each of the job's
  ``export_formats``, *then* the job succeeds, so the file a user waits for is ready with the job. The rest of
  the front (the unpruned baseline too when on the front) goes through the ``export_requests`` queue:
  ``AUTOPRUNE_EXPORT_FRONT=eager`` (default) queues it in the background before the job succeeds, ``lazy``
  leaves it to requests (``POST /v1/jobs/{id}/exports``, which also serves cancelled and failed jobs' points).
  Each request is one point in one format, rebuilt from the job's objective and the point's plan (a fine-tuned
  point from its stored weights: it is trained once, see ``weights_sha256``), held under a lease, retried on
  transient errors. Formats: ``onnx`` (verified in ONNX Runtime; the best one re-timed against the exported
  unpruned model), ``safetensors`` (a zip of ``model.safetensors``, ``model.plan.json`` and
  ``evaluation.json``) and ``pt2``. Files go to the artefact store, rows to ``exports`` (``meta``: the export
  report, the evaluation summary and plan, ``best``); ``jobs.best`` names the best point. Each export writes an
  ``export`` event (point, format, done/total of the job's exports, seconds, ok, phase). A point that fails to
  export in one format leaves a failed request with the error's first line (the best point's: origin ``job``,
  and a ``log`` event) and no row; the job still succeeds.

  *What the worker takes next* (:meth:`Worker.run_once`): a user's export request, then the background exports
  of the job it has just finished, then a new job, then any background export. *The model and data are built
  once*: the job's own objective (its loaded model, data and traced pruning structure) is kept after the job and
  exports the rest of its front; a request for another job builds that job's objective once and keeps
  it for the requests of the same job that follow (:meth:`Worker._objective_for`; one job's at a time).
  *Requests never wait behind a running job*: between two steps of the job it runs (before each candidate, each
  probe of a strategy that probes, each point to fine-tune, and at each progress report of a fine-tune, about
  once an epoch: :class:`service.holding.JobHooks`), the worker makes at most one waiting user's request (of a
  finished job, or of a running one: a point of the job it runs is exported with that job's own objective, and
  ``best`` only names the exported file once the job has finished), then goes on with the job; while none waits
  it looks at most once per ``poll_seconds``. The export runs on the job's own thread, between two steps, so it
  never overlaps the timing of this worker's candidates; other workers of the host are kept out of the timed
  runs by the measurement lock (:mod:`autoprune.measure_lock`), which the export's own re-timing takes too. It
  leaves the job's random streams as they were (a seeded job does the same with or without requests). The
  running job's lease is kept by its heartbeat meanwhile; its time budget includes the export. Done and failed requests older than
  ``AUTOPRUNE_EXPORT_REQUEST_RETENTION_S`` are deleted (at most once a minute, :meth:`Worker.purge_requests`).
* **Fine-tuned weights** are stored once, as a ``.safetensors`` artefact named on the evaluation row
  (``weights_sha256``), when the point is fine-tuned.
* **Failure.** Any exception: the job goes to ``failed`` with ``"<Type>: <first line>"`` (traceback in the
  event). A job is never left running without a live lease: if even that write fails, the lease expires.

* **Shared jobs** (``workers`` = N > 1; ``optuna-tpe`` / ``optuna-nsga2``; :mod:`service.shared`, the lease and the
  recording callback they share with single jobs in :mod:`service.holding`): up to N workers hold the job at
  once (one ``job_slots`` row each, see the repository) and share one Optuna study in RDB storage
  (:func:`shared_study_storage`: the operator's ``AUTOPRUNE_STUDY_STORAGE``, else the service's PostgreSQL
  database in schema ``optuna``; the study is ``autoprune-<job id>``; a job may name neither). Each worker builds its own objective,
  seeds its sampler by slot, and asks/tells its own trials; before each ask it reserves the next evaluation
  index from the database (:meth:`Repository.reserve_index`), so the workers together stop at exactly
  ``budget`` evaluations with indices 1..budget, and each evaluation row and event names its worker. Resume is
  the study itself: there is no replay (the sampler already conditions on the stored COMPLETE trials), trials a
  dead worker left ``RUNNING`` are failed when a worker starts and when the job finishes, and a dead worker's
  reservation goes back to the pool when its slot lease expires. When the budget is spent, workers leave their
  slots; the holder of slot 0 (a leaving worker takes slot 0 over if its holder is dead) waits until it is
  alone, searches again if a dead worker's evaluation is missing, then fine-tunes, exports and succeeds. A
  cancel, a failure or a lost job stops every holder; SIGTERM gives up one slot (the job goes back to
  ``queued`` only when no holder is left).

A job that keeps killing its worker is retried until :data:`MAX_ATTEMPTS`.

No API imports; torch is imported when a job runs (and pinned to one thread by :func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoprune.names import MEDIA_TYPES, SUFFIXES
from service.artefacts import ArtefactStore
from service.db.engine import (
    check_no_storage_options,
    ensure_schema,
    is_sqlite,
    make_engine,
)
from service.db.models import TERMINAL_STATES, ExportRequest, JobRow, JobState
from service.db.repository import Conflict, LeaseLost, NotFound, Repository, RepositoryError, evaluation_summary
from service.holding import JobHooks as _JobHooks
from service.holding import JobStop as _Stop
from service.holding import Lease as _Lease
from service.holding import evaluation_key as _key
from service.holding import finite as _finite
from service.holding import first_line as _first_line
from service.settings import InvalidSettings, Settings, load_settings

if TYPE_CHECKING:
    from torch import nn

    from agents.knapsack import KeepProbes
    from agents.result import SearchResult
    from autoprune.job import JobSpec
    from autoprune.objective import Evaluation, Objective
    from autoprune.recovery import FinetuneReport

log = logging.getLogger("autoprune.worker")

MAX_ATTEMPTS = 10
"""A job claimed this many times without finishing (its worker keeps dying) is failed instead of retried."""
_SPEC_INPUT_KEYS = ("model", "data", "weights", "kwargs")


class NotRebuildable(Exception):
    """A point whose model cannot be rebuilt without training again (a fine-tuned point with no stored weights)."""


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Run the block without changing the caller's random streams: torch's (CPU and CUDA), NumPy's and
    ``random``'s (building another job's objective seeds torch; an export must not reseed a running search or
    fine-tune)."""
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class _RequestLease:
    """Renews an export request's lease from a thread while the export runs (a pt2 export can outlast a lease)."""

    def __init__(self, repo: Repository, request_id: str, worker_id: str, lease_s: float, every_s: float) -> None:
        self.lost = False
        self._done = threading.Event()

        def loop() -> None:
            while not self._done.wait(every_s):
                try:
                    repo.renew_export_lease(request_id, worker_id, lease_s)
                except (LeaseLost, NotFound):
                    self.lost = True
                    return
                except Exception:  # a database hiccup: the lease outlives a few beats
                    log.exception("export request %s: heartbeat failed", request_id)

        self._thread = threading.Thread(target=loop, name=f"export-heartbeat-{request_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=30)


class Worker:
    """Claims and runs jobs. ``run_once`` processes at most one job; ``run_forever`` loops until stopped."""

    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.engine = make_engine(settings.db_url)
        self.repo = Repository(self.engine)
        self.store = ArtefactStore(settings.artefacts)
        self.stop_event = threading.Event()
        """Set to stop after the current evaluation and release the job (SIGTERM, the embedding app's shutdown)."""
        self._export_objective: tuple[str, JobSpec, Objective] | None = None
        """The last job whose points were exported: its spec and objective (the job's own after a search, else
        built once for the requests of that job)."""
        self._running: tuple[str, JobSpec, Objective] | None = None
        """The job this worker is running, with its spec and objective: a request of one of its own points made
        between two of its steps exports with them (the model and data are not loaded a second time)."""
        self.export_objective_builds = 0
        """How many objectives this worker built to export points (not counting the jobs' own searches)."""
        self._purged_at: float | None = None
        self._looked_at: float | None = None
        """When :meth:`_serve_between` last found no waiting request (None: look at the next step)."""

    def close(self) -> None:
        self.engine.dispose()

    # -- loop ---------------------------------------------------------------------------------------------
    def run_forever(self, stop_event: threading.Event | None = None, *, max_jobs: int | None = None) -> int:
        """Claim and run jobs and export requests until ``stop_event`` is set (or ``max_jobs`` jobs were
        processed: export requests do not count); returns how many jobs.

        Setting ``stop_event`` while a job runs finishes the current evaluation and releases the job."""
        if stop_event is not None:
            self.stop_event = stop_event
        processed = 0
        while not self.stop_event.is_set() and (max_jobs is None or processed < max_jobs):
            try:
                worked = self._run_one()
            except Exception:  # the database is unreachable, ...: keep the worker alive and try again
                log.exception("worker %s: claiming a job failed", self.worker_id)
                worked = None
            if worked == "job":
                processed += 1
            elif worked is None:
                self.stop_event.wait(self.settings.poll_seconds)
        return processed

    def run_once(self) -> bool:
        """Claim one piece of work and do it: a user's export request, else a job, else a background export
        request; False when there was nothing to claim."""
        return self._run_one() is not None

    def _run_one(self) -> str | None:
        """:meth:`run_once`; what it did: ``job``, ``export`` or None."""
        from service.db.models import EXPORT_PRIORITY

        self.purge_requests()
        lease = self.settings.lease_seconds
        request = self.repo.claim_export(self.worker_id, lease, max_priority=EXPORT_PRIORITY["user"])
        if request is None and self._export_objective is not None:  # the front of the job this worker just ran
            request = self.repo.claim_export(self.worker_id, lease, job_id=self._export_objective[0])
        if request is not None:
            self.process_export(request)
            return "export"
        job = self.repo.claim_job(self.worker_id, lease)
        if job is not None:
            log.info("worker %s: claimed job %s (attempt %d)", self.worker_id, job.id, job.attempts)
            self.process(job)
            return "job"
        request = self.repo.claim_export(self.worker_id, lease)
        if request is not None:
            self.process_export(request)
            return "export"
        return None

    def purge_requests(self, *, every_s: float = 60.0) -> int:
        """Delete the finished export requests older than the retention (at most once per ``every_s``); how
        many."""
        now = time.monotonic()
        if self._purged_at is not None and now - self._purged_at < every_s:
            return 0
        self._purged_at = now
        try:
            purged = self.repo.purge_export_requests(self.settings.export_request_retention_s)
        except Exception:  # a database hiccup: the next purge gets them
            log.exception("worker %s: purging old export requests failed", self.worker_id)
            return 0
        if purged:
            log.info("worker %s: deleted %d finished export request(s) past the retention", self.worker_id, purged)
        return purged

    def _serve_between(self, lease: _Lease) -> None:
        """Between two units of the running job's work (candidates, probes, fine-tuned points, a fine-tune's
        progress reports: see :class:`service.holding.JobHooks`): make at most one waiting user's export request
        (of a finished job, or of a running one: this job's own points too; see the module docstring). The queue
        is looked at again at once after a request was made, else at most once per ``poll_seconds``, as an idle
        worker polls. The export does not touch the job's random streams (torch, NumPy, ``random``): a seeded job
        asks the same plans and trains the same weights whether or not requests came in (a resumed job replays
        its evaluations)."""
        from service.db.models import EXPORT_PRIORITY

        if lease.lost or lease.cancel_requested or self.stop_event.is_set():
            return
        now = time.monotonic()
        if self._looked_at is not None and now - self._looked_at < self.settings.poll_seconds:
            return
        self._looked_at = now
        try:
            request = self.repo.claim_export(
                self.worker_id, self.settings.lease_seconds, max_priority=EXPORT_PRIORITY["user"]
            )
            if request is not None:
                log.info("worker %s: making export request %s between the steps of job %s",
                         self.worker_id, request.id, lease.job_id)  # fmt: skip
                with _random_state_kept():
                    self.process_export(request)
                self._looked_at = None  # another may be waiting: look again at the next step
        except Exception:  # the running job goes on; the request's lease expires and it is claimed again
            log.exception("worker %s: an export request between the steps of a job failed", self.worker_id)

    # -- one job ------------------------------------------------------------------------------------------
    def process(self, job: JobRow) -> str:
        """Run a claimed job to its next state; returns the outcome (succeeded, failed, cancelled, released,
        lost)."""
        self._export_objective = None  # an earlier export's model and data are not needed while a job runs
        lease = _Lease(self.repo, job.id, self.worker_id, self.settings.lease_seconds, self.settings.heartbeat_seconds)
        lease.start()
        outcome = "interrupted"
        try:
            try:
                outcome = self._run(job, lease)
            except _Stop as stop:
                outcome = stop.outcome
            except LeaseLost:
                outcome = "lost"
            finally:
                self._running = None
            if outcome == "cancelled":
                try:
                    self.repo.transition(
                        job.id, JobState.cancelled, worker_id=self.worker_id, reason="cancel requested"
                    )
                except Conflict:
                    if (job.workers or 1) <= 1:
                        raise  # a shared job: another holder cancelled it first
            elif outcome == "released":
                self.repo.release_job(job.id, self.worker_id)
            return outcome
        except LeaseLost:
            outcome = "lost"
            return outcome
        except (KeyboardInterrupt, SystemExit):
            outcome = "released"
            self._leave(job.id, "released")
            raise
        except BaseException as exc:
            log.exception("job %s failed", job.id)
            if lease.lost:
                outcome = "lost"
                return outcome
            outcome = "failed"
            self._leave(job.id, "failed", exc)
            if not isinstance(exc, Exception):
                raise
            return outcome
        finally:
            lease.stop()
            log.info("worker %s: job %s %s", self.worker_id, job.id, outcome)  # released is not "done"

    def _leave(self, job_id: str, outcome: str, exc: BaseException | None = None) -> None:
        """Best effort: fail or release the job; if even that cannot be written, its lease expires."""
        try:
            if outcome == "released":
                self.repo.release_job(job_id, self.worker_id)
            else:
                assert exc is not None
                tb = "".join(traceback.format_exception(exc))[-4000:]
                self.repo.transition(
                    job_id, JobState.failed, worker_id=self.worker_id, error=_first_line(exc), traceback=tb
                )
        except (LeaseLost, Conflict):
            pass
        except Exception:
            log.exception("job %s: could not record %s", job_id, outcome)

    def _check(self, lease: _Lease) -> None:
        if lease.lost:
            raise _Stop("lost")
        if lease.cancel_requested:
            raise _Stop("cancelled")
        if self.stop_event.is_set():
            raise _Stop("released")

    def build_spec(self, job: JobRow) -> JobSpec:
        """The job's :class:`JobSpec`: inputs from its model and dataset rows, the rest from ``job.spec``."""
        from autoprune.errors import InvalidConfigError
        from autoprune.job import JobSpec

        model = self.repo.get_model(job.model_id)
        dataset = self.repo.get_dataset(job.dataset_id)
        values: dict[str, Any] = {k: v for k, v in job.spec.items() if k not in _SPEC_INPUT_KEYS}
        check_no_storage_options(values.get("strategy_options") or {})  # a row written before the API refused them
        if model.kind == "pt2":
            if model.artefact_sha256 is None:
                raise InvalidConfigError(f"model {model.id} is a .pt2 model without a file")
            path = self._artefact_path(model.artefact_sha256)
            if path.suffix != ".pt2":
                raise InvalidConfigError(f"model {model.id}'s file is not a .pt2 program")
            values["model"] = str(path)
        else:
            if not model.architecture:
                raise InvalidConfigError(f"model {model.id} has no architecture")
            values["model"] = model.architecture
            values["kwargs"] = dict(model.kwargs or {})
            if model.artefact_sha256 is not None:
                values["weights"] = str(self._artefact_path(model.artefact_sha256))
        if dataset.kind == "builtin":
            values["data"] = dataset.builtin
        else:
            if dataset.artefact_sha256 is None:
                raise InvalidConfigError(f"dataset {dataset.id} has no file")
            values["data"] = str(self._artefact_path(dataset.artefact_sha256))
        return JobSpec.from_mapping(values)

    def _artefact_path(self, sha256: str) -> Path:
        row = self.repo.get_artefact(sha256)
        path = self.store.path_for(sha256, row.suffix)
        if not path.is_file():
            raise FileNotFoundError(f"artefact {sha256}{row.suffix} is missing from {self.store.root}")
        return path

    def _run(self, job: JobRow, lease: _Lease) -> str:
        from agents import make_strategy
        from agents.result import SearchResult
        from autoprune.job import run_job
        from autoprune.objective import Evaluation

        if job.cancel_requested:
            raise _Stop("cancelled")
        if job.attempts > MAX_ATTEMPTS:
            raise RuntimeError(f"gave up after {job.attempts - 1} attempts: the job's worker kept stopping")
        spec = self.build_spec(job)
        if (job.workers or 1) > 1:
            from service.shared import run_shared

            return run_shared(self, job, spec, lease)
        history = [Evaluation.from_json(r) for r in self.repo.all_records(job.id)]
        self._check(lease)
        objective = spec.build_objective(
            log=lambda note: self._log(job.id, note), latency=spec.latency_config(**self.settings.latency_host)
        )
        baseline = objective.baseline
        self._running = (job.id, spec, objective)

        def best_of(search: list[Evaluation], finetuned: Sequence[Evaluation] = ()) -> dict[str, Any]:
            snapshot = SearchResult(
                strategy=spec.strategy,
                seed=spec.seed,
                baseline=baseline,
                evaluations=search,
                stop_reason="running",
                wall_s=0.0,
                finetuned=list(finetuned),
            )
            return self._best_summary(snapshot, spec)

        record = self._recorder(job.id, lease)

        record(baseline, 0, best_of([]), [baseline])
        self._check(lease)

        strategy = make_strategy(spec.strategy, **dict(spec.strategy_options))
        # probing (if any) ended before the first evaluation: its table is stored before that is recorded
        probes = self._probe_keeper(job.id, strategy)
        result = run_job(
            spec,
            objective=objective,
            callback=[probes, _JobHooks(self, job.id, lease, record, best_of, baseline)],
            history=history,
            strategy=strategy,
        )
        self._check(lease)
        self._log_failures(job.id, result)
        if result.info.get("sensitivity"):  # the knapsack's measured latency table, kept with the job
            self.repo.add_event(job.id, "sensitivity", **_finite(result.info))
        if result.stop_reason == "interrupted":  # Ctrl-C reached the search: stop like SIGTERM
            raise _Stop("released")
        self._export(job, spec, result, objective, lease)
        if lease.cancel_requested:  # a shutdown now would only waste the finished exports: succeed instead
            raise _Stop("cancelled")
        best = self._best_summary(result, spec)
        self.repo.transition(
            job.id,
            JobState.succeeded,
            worker_id=self.worker_id,
            best=best,
            stop_reason=result.stop_reason,
            evaluations=len(result.evaluations),
            replayed=result.replayed,
        )
        return "succeeded"

    def _probe_keeper(self, job_id: str, strategy: Any) -> KeepProbes:
        """Resume without probing again (:class:`agents.knapsack.KeepProbes`): the table of the job's ``probes``
        event, if an earlier attempt stored one, goes back to the strategy; a newly probed table is stored as
        that event once probing has ended."""
        from agents.knapsack import KeepProbes  # with autoprune.sensitivity: only when a job runs

        stored = self.repo.last_event(job_id, "probes")
        return KeepProbes(
            strategy,
            None if stored is None else stored.data,
            lambda table: self.repo.add_event(job_id, "probes", **_finite(table)),
            lambda why: self._log(job_id, f"the stored probes are not usable, probing again: {why}"),
        )

    def _log_failures(self, job_id: str, result: SearchResult) -> None:
        note = result.failures_note()
        if note is not None:
            self._log(job_id, note)

    def _log(self, job_id: str, message: str) -> None:
        log.info("job %s: %s", job_id, message)
        with contextlib.suppress(RepositoryError):
            self.repo.add_event(job_id, "log", message=message)

    def _recorder(self, job_id: str, lease: Any) -> Callable[..., None]:
        """``record(evaluation, done, best, front, weights=None)``: store one evaluation of this job with its
        progress, best summary and front (and a fine-tuned point's stored weights), then renew the lease."""

        def record(
            e: Evaluation, done: int, best: dict[str, Any], front: list[Evaluation], weights: str | None = None
        ) -> None:
            self.repo.record_evaluation(
                job_id,
                self.worker_id,
                _finite(e.to_json()),
                done=done,
                best=best,
                front=[_key(p) for p in front],
                weights_sha256=weights,
            )
            lease.renew()  # after every evaluation: keeps the lease fresh and reads a cancel request back

        return record

    @staticmethod
    def _best_summary(result: SearchResult, spec: JobSpec) -> dict[str, Any]:
        best = result.best(spec.selection())  # the rule the CLI and the facade apply
        return _finite({**evaluation_summary(best), "select": spec.select})

    def _store_weights(self, model: nn.Module) -> str:
        """A fine-tuned model's weights as a ``.safetensors`` artefact; its hash."""
        from autoprune.models.weights import weights_to_bytes

        sha, size = self.store.put_bytes(weights_to_bytes(model), ".safetensors")
        self.repo.add_artefact(sha, size, "application/octet-stream", ".safetensors")
        return sha

    def _finetune_event(self, job_id: str, point: Evaluation, report: FinetuneReport) -> None:
        """A ``finetune`` event: which point, steps done of total, the best validation loss so far, and how it
        stopped (``running`` until the end)."""
        val_loss = report.best_val_loss
        self.repo.add_event(
            job_id,
            "finetune",
            index=point.index,
            step=report.steps,
            total=report.total_steps,
            best_val_loss=None if val_loss is None or not math.isfinite(val_loss) else val_loss,
            stopped=report.stopped,
        )

    # -- exports ------------------------------------------------------------------------------------------
    def _export(self, job: JobRow, spec: JobSpec, result: SearchResult, objective: Objective, lease: _Lease) -> None:
        """The best point in every format (before the job succeeds), then the rest of the front queued in the
        background (``export_front = eager``) or left to requests (``lazy``)."""
        from autoprune.errors import ExportError

        best = result.best(
            spec.select, max_quality_drop=spec.max_quality_drop, max_latency_ratio=spec.max_latency_ratio
        )
        weights = self._weights_of(job.id, best)
        model = None
        with tempfile.TemporaryDirectory(prefix=f"autoprune-{job.id}-") as tmp:
            for fmt in spec.export_formats:
                lease.renew()  # first: a cancel asked during the last format stops the job before the next one
                self._check(lease)
                started = time.monotonic()
                try:
                    if model is None:
                        model = self._rebuild(objective, best, weights, result)
                    sha, meta = self._export_point(job.id, model, best, fmt, Path(tmp), objective, spec, True)
                except ExportError as exc:
                    error = _first_line(exc)
                    self._log(job.id, f"export of {best.stage} point {best.index} as {fmt} failed: {error}")
                    self.repo.fail_export(
                        job_id=job.id, index=best.index, stage=best.stage, format=fmt, error=error,
                        worker_id=self.worker_id, phase="job", seconds=time.monotonic() - started,
                    )  # fmt: skip
                    continue
                self.repo.add_export(
                    job_id=job.id,
                    index=best.index,
                    stage=best.stage,
                    format=fmt,
                    artefact_sha256=sha,
                    meta=meta,
                    worker_id=self.worker_id,
                    phase="job",
                    seconds=time.monotonic() - started,
                )
        if self.settings.export_front == "eager":
            rest = [_key(p) for p in result.front() if _key(p) != _key(best)]
            queued = self.repo.enqueue_exports(job.id, rest, spec.export_formats, origin="background")
            if queued:
                self._log(job.id, f"queued {queued} background export(s) of the other front points")
        self._export_objective = (job.id, spec, objective)  # the rest of the front: no second build of the job

    def _weights_of(self, job_id: str, point: Evaluation) -> str | None:
        """The stored weights of a fine-tuned point (None for search points)."""
        if point.stage != "finetuned":
            return None
        try:
            return self.repo.evaluation(job_id, stage=point.stage, index=point.index).weights_sha256
        except NotFound:
            return None

    def _rebuild(
        self, objective: Objective, point: Evaluation, weights: str | None, result: SearchResult | None = None
    ) -> nn.Module:
        """The model of ``point``: the unpruned model, a fine-tuned point's pruned shape with its stored weights,
        or a search point rebuilt from its plan (with the search's recovery). Without stored weights a
        fine-tuned point is rebuilt only inside its job (``result`` hands over the model it kept), else
        :class:`NotRebuildable`."""
        import copy

        from agents.result import recovery_from_extra
        from autoprune.models.weights import load_weights

        if point.index == 0 and point.stage == "search":
            return copy.deepcopy(objective.base).eval()
        if weights is not None:
            return load_weights(objective.prune(point.plan), self._artefact_path(weights)).eval()
        if point.stage == "finetuned":
            if result is None:
                raise NotRebuildable(
                    f"fine-tuned point {point.index} has no stored weights (fine-tuned before they were kept): "
                    "it cannot be rebuilt without training it again"
                )
            return result.materialize(point)
        return objective.materialize(point.plan, recovery=recovery_from_extra(point.extra))

    def _export_point(
        self,
        job_id: str,
        model: nn.Module,
        point: Evaluation,
        fmt: str,
        tmp: Path,
        objective: Objective,
        spec: JobSpec,
        is_best: bool,
    ) -> tuple[str, dict[str, Any]]:
        """Export ``model`` in ``fmt`` into the artefact store: (sha256, the export row's meta)."""
        out = tmp / f"{point.stage}-{point.index}-{fmt}"
        path, report = self._export_one(model, point, fmt, out, objective, spec, is_best, self.settings.latency_host)
        sha, size = self.store.put_file(path, SUFFIXES[fmt])
        self.repo.add_artefact(sha, size, MEDIA_TYPES[fmt], SUFFIXES[fmt])
        meta = {
            "point": {"stage": point.stage, "index": point.index},
            "best": is_best,
            "select": spec.select,
            "filename": f"{job_id}-{point.stage}-{point.index}{SUFFIXES[fmt]}",
            "evaluation": evaluation_summary(point),
            "plan": point.plan.to_json(),
            "export": report,
        }
        return sha, _finite(meta)

    def process_export(self, request: ExportRequest) -> str:
        """Make one claimed export request: rebuild the point, export it, store it; returns the request's state
        (``done``, ``failed``, ``queued`` for a retry, or ``lost``)."""
        from autoprune.errors import AutopruneError
        from autoprune.objective import Evaluation

        log.info(
            "worker %s: exporting %s point %d of job %s as %s (%s, attempt %d)",
            self.worker_id, request.stage, request.index, request.job_id, request.format, request.origin,
            request.attempts,
        )  # fmt: skip
        lease = _RequestLease(
            self.repo, request.id, self.worker_id, self.settings.lease_seconds, self.settings.heartbeat_seconds
        )
        started = time.monotonic()
        fields: dict[str, Any]
        try:
            job = self.repo.get_job(request.job_id)
            row = self.repo.evaluation(request.job_id, stage=request.stage, index=request.index)
            point = Evaluation.from_json(row.record)
            spec, objective = self._objective_for(job)
            model = self._rebuild(objective, point, row.weights_sha256)
            best = job.best or {}  # a running job's is the best so far: not the point ``best`` names at the end
            finished = job.state in TERMINAL_STATES
            is_best = finished and (best.get("stage"), best.get("index")) == (request.stage, request.index)
            with tempfile.TemporaryDirectory(prefix=f"autoprune-{job.id}-") as tmp:
                sha, meta = self._export_point(
                    job.id, model, point, request.format, Path(tmp), objective, spec, is_best
                )
            fields = {"artefact_sha256": sha, "meta": meta}
        except (AutopruneError, NotRebuildable, NotFound) as exc:  # the same every time: no retry
            fields = {"error": _first_line(exc)}
        except Exception as exc:  # a transient failure (disk, database, memory): try again later
            log.exception("export request %s failed", request.id)
            fields = {"error": _first_line(exc), "retry": True}
        finally:
            lease.stop()
        try:
            done = self.repo.finish_export(request.id, self.worker_id, seconds=time.monotonic() - started, **fields)
        except LeaseLost:
            log.warning("export request %s: lease lost", request.id)
            return "lost"
        log.info("worker %s: export request %s %s", self.worker_id, request.id, done.state)
        return done.state

    def _objective_for(self, job: JobRow) -> tuple[JobSpec, Objective]:
        """The job's spec and objective for exporting its points: the running job's own for its points, else kept
        for the next request of the same job."""
        if self._running is not None and self._running[0] == job.id:
            return self._running[1], self._running[2]
        cached = self._export_objective
        if cached is not None and cached[0] == job.id:
            return cached[1], cached[2]
        self._export_objective = None  # the previous job's model and data can go
        spec = self.build_spec(job)
        objective = spec.build_objective(latency=spec.latency_config(**self.settings.latency_host))
        self.export_objective_builds += 1
        self._export_objective = (job.id, spec, objective)
        return spec, objective

    @staticmethod
    def _export_one(
        model: Any,
        point: Evaluation,
        fmt: str,
        out: Path,
        objective: Objective,
        spec: JobSpec,
        is_best: bool,
        host: dict[str, Any],
    ) -> tuple[Path, dict[str, Any]]:
        from autoprune.export import export_model

        report = export_model(
            model,
            objective.example_inputs,
            out,
            plan=point.plan,
            base=objective.base if (fmt == "onnx" and is_best) else None,  # re-time the best one only
            formats=(fmt,),
            latency=spec.latency_config(**host),
        )
        data = report.to_json()
        data["files"] = {name: Path(p).name for name, p in report.files.items()}
        if fmt != "safetensors":
            return Path(report.files[fmt]), data
        archive = out / "model.zip"
        members = {
            "model.safetensors": Path(report.files["safetensors"]).read_bytes(),
            "model.plan.json": Path(report.files["plan"]).read_bytes(),
            "evaluation.json": json.dumps(point.to_json(), indent=2, sort_keys=True).encode(),
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, payload in members.items():  # fixed timestamps: the same model zips to the same hash
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), payload, zipfile.ZIP_DEFLATED)
        archive.write_bytes(buf.getvalue())
        data["files"] = {"safetensors": "model.zip", "members": list(members)}
        return archive, data


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.worker``: run a worker until SIGTERM/SIGINT (the first finishes the current
    evaluation and releases the job; a second one stops at once)."""
    parser = argparse.ArgumentParser(prog="autoprune worker", description=main.__doc__)
    parser.add_argument("--worker-id", default=None, help="name in the job's events (default host:pid:random)")
    parser.add_argument("--database-url", default=None, help="overrides AUTOPRUNE_DATABASE_URL")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after processing this many jobs")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--cpus",
        default=None,
        help="pin the worker to these cores, e.g. 0, 0-1 or 0,2 (default: every core, taking turns with the other "
        "workers of this host to time latency)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(args.log_level.upper())  # the exporters' INFO chatter stays out

    try:
        settings = load_settings() if args.database_url is None else load_settings(database_url=args.database_url)
    except InvalidSettings as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from service.pinning import CpuSpecError, available_cpus, format_cpus, pin

    try:
        cpus = pin(args.cpus) if args.cpus is not None else None  # before torch starts its threads
    except CpuSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.measure_lock:
        try:
            settings.measure_lock_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"error: AUTOPRUNE_MEASURE_LOCK_DIR: cannot create {settings.measure_lock_dir}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
    if is_sqlite(settings.db_url):
        ensure_schema(settings)  # the embedded default upgrades itself; PostgreSQL has its migrate step

    import torch

    torch.set_num_threads(1)  # stable latency figures: one intra-op thread per worker process

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current evaluation, then releasing the job", signum)
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second signal stops at once
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker = Worker(settings, args.worker_id)
    log.info("worker %s: polling %s", worker.worker_id, settings.db_url.split("@")[-1])
    log.info(
        "worker %s: cpus %s%s; measurement lock %s",
        worker.worker_id,
        format_cpus(cpus or available_cpus()),
        " (pinned)" if cpus else "",
        settings.measure_lock_dir if settings.measure_lock else "off",
    )
    try:
        worker.run_forever(stop, max_jobs=args.max_jobs)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
