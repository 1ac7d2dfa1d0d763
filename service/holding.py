"""What a worker needs to hold a job, for one job and for a shared one alike: the lease with its heartbeat
(:class:`Lease`), the control-flow exception that leaves a job (:class:`JobStop`), and the search callback that
records evaluations and fine-tuned points (:class:`JobHooks`)."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agents.base import SearchCallback
from service.db.repository import LeaseLost, NotFound, Repository

if TYPE_CHECKING:
    from agents.base import Progress
    from agents.result import SearchResult
    from autoprune.objective import Evaluation
    from autoprune.recovery import FinetuneReport, RecoveryConfig
    from service.worker import Worker

log = logging.getLogger("autoprune.worker")


class JobStop(Exception):  # control flow inside the worker
    """Leave the job now: ``outcome`` is ``cancelled``, ``released`` or ``lost``."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class Lease:
    """Holds a job's lease: renewed by a heartbeat thread and after every evaluation; reads cancel back."""

    def __init__(self, repo: Repository, job_id: str, worker_id: str, lease_s: float, every_s: float) -> None:
        self.repo, self.job_id, self.worker_id = repo, job_id, worker_id
        self.lease_s, self.every_s = lease_s, every_s
        self.cancel_requested = False
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=max(self.every_s, 1.0) + 30)

    def renew(self) -> None:
        if self.lost:
            return
        try:
            row = self.repo.renew_lease(self.job_id, self.worker_id, self.lease_s)
        except (LeaseLost, NotFound):
            self.lost = True
            log.warning("job %s: lease lost", self.job_id)
            return
        self.cancel_requested = self.cancel_requested or bool(row.cancel_requested)

    def _loop(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                self.renew()
            except Exception:  # a database hiccup: try again at the next beat (the lease outlives a few)
                log.exception("job %s: heartbeat failed", self.job_id)
            if self.lost:
                return


_ABSOLUTE_PATH = re.compile(r"""(?:/[^/\s'"():,]+)+/([^/\s'"():,]+)""")


def first_line(exc: BaseException) -> str:
    """The error a job shows its caller: one line, server paths reduced to file names (the server's layout is
    the operator's business; the full traceback stays in the worker's log and the database)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return _ABSOLUTE_PATH.sub(r"\1", line)[:2000]


def finite(value: Any) -> Any:
    """JSON for every database: non-finite floats become None (PostgreSQL's json rejects NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def evaluation_key(e: Evaluation) -> tuple[str, int]:
    return (e.stage, e.index)


class JobHooks(SearchCallback):
    """The search callback of a job's holder: records every evaluation and fine-tuned point (with the trained
    weights, which exports load instead of training again), writes fine-tune progress events, and stops the
    search or the fine-tuning stage on a cancel, a lost lease or a shutdown.

    It is also where the holder makes waiting users' export requests of other jobs
    (:meth:`Worker._serve_between`), on the job's own thread and so never while a candidate is timed: at
    ``on_step`` (before each candidate, each probe of a strategy that probes and each point of the fine-tuning
    stage) and at each ``on_finetune`` report (a fine-tune's validation checks, about once an epoch), so a request
    waits for neither a probe phase nor a long fine-tune."""

    def __init__(
        self,
        worker: Worker,
        job_id: str,
        lease: Lease,
        record: Callable[..., None],
        best_of: Callable[..., dict[str, Any]],
        baseline: Evaluation,
    ) -> None:
        self.worker, self.job_id, self.lease, self.record, self.best_of = worker, job_id, lease, record, best_of
        self.baseline = baseline
        self.evaluations: list[Evaluation] = []

    def on_step(self) -> bool:
        self.worker._serve_between(self.lease)
        return not (self.lease.lost or self.lease.cancel_requested or self.worker.stop_event.is_set())

    def on_evaluation(self, progress: Progress) -> bool:
        from autoprune.pareto import pareto_front

        self.evaluations.append(progress.evaluation)
        front = pareto_front([self.baseline, *self.evaluations])
        self.record(progress.evaluation, progress.done, self.best_of(list(self.evaluations)), front)
        return True

    def on_finetune_start(self, point: Evaluation, recovery: RecoveryConfig) -> None:
        message = f"fine-tuning point {point.index} ({recovery.describe()})"
        self.worker.repo.add_event(self.job_id, "log", message=message)

    def on_finetune(self, point: Evaluation, report: FinetuneReport) -> None:
        self.worker._finetune_event(self.job_id, point, report)
        self.worker._serve_between(self.lease)

    def on_finetuned(self, tuned: Evaluation, result: SearchResult, *, trained: bool) -> None:
        weights = self.worker._store_weights(result.materialize(tuned)) if trained else None
        best = self.best_of(result.evaluations, result.finetuned)
        self.record(tuned, len(result.evaluations), best, result.front(), weights)
