"""Shared jobs (``workers`` > 1): several workers hold one job and share one Optuna study (see the
:mod:`service.worker` module docstring, *Shared jobs*). :func:`run_shared` is a holder's whole run of such a job."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agents.base import SearchCallback
from service.db.engine import check_job_workers, shared_study_storage
from service.db.models import JobRow, JobState
from service.db.repository import LeaseLost
from service.holding import JobHooks, JobStop, Lease, evaluation_key, finite

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from agents.base import Progress
    from autoprune.job import JobSpec
    from autoprune.objective import Evaluation
    from service.worker import Worker

log = logging.getLogger("autoprune.worker")


def run_shared(worker: Worker, job: JobRow, spec: JobSpec, lease: Lease) -> str:
    """A job several workers hold at once (see the module docstring); returns ``succeeded`` (this worker
    finished it) or ``left`` (the search budget is spent and slot 0's holder finishes)."""
    from agents import make_strategy
    from agents.optuna_search import fail_running_trials
    from agents.result import SearchResult
    from autoprune.errors import InvalidConfigError
    from autoprune.job import run_job
    from autoprune.objective import Evaluation

    storage = shared_study_storage(worker.settings.db_url, worker.settings.study_storage)
    if storage is None:
        check_job_workers(job.workers, worker.settings.db_url, worker.settings.study_storage)
        raise InvalidConfigError("no storage for the shared study")  # unreachable: the check raised
    study_name = f"autoprune-{job.id}"
    objective = spec.build_objective(
        log=lambda note: worker._log(job.id, note), latency=spec.latency_config(**worker.settings.latency_host)
    )
    baseline = objective.baseline
    worker._check(lease)

    def snapshot(records: list[dict[str, Any]]) -> SearchResult:
        evaluations = [Evaluation.from_json(r) for r in records]
        base = next((e for e in evaluations if e.stage == "search" and e.index == 0), baseline)
        return SearchResult(
            strategy=spec.strategy,
            seed=spec.seed,
            baseline=base,
            evaluations=sorted((e for e in evaluations if e.stage == "search" and e.index > 0), key=lambda e: e.index),
            stop_reason="running",
            wall_s=0.0,
            finetuned=[e for e in evaluations if e.stage == "finetuned"],
            objective=objective,
        )

    def derive(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[tuple[str, int]]]:
        """Best and front over every holder's evaluations (run by the repository under the job's lock)."""
        result = snapshot(records)
        return worker._best_summary(result, spec), [evaluation_key(p) for p in result.front()]

    def record_shared(e: Evaluation) -> None:
        worker.repo.record_evaluation(
            job.id, worker.worker_id, finite(e.to_json()), done=0, best=None, front=(), derive=derive
        )
        lease.renew()

    def new_strategy() -> Any:
        strategy = make_strategy(
            spec.strategy, **{**spec.strategy_options, "storage": storage, "study_name": study_name}
        )
        strategy.trial_user_attrs = {"worker_id": worker.worker_id}  # type: ignore[attr-defined]
        return strategy

    def settle_stale(keep: Callable[[FrozenTrial], bool] | None) -> None:
        """Close the trials dead holders left RUNNING: completed with the stored evaluation when it was
        recorded (the holder died between recording and telling), failed otherwise."""
        stored = {r.index: r for r in worker.repo.evaluations(job.id, stage="search", limit=10**6).items}
        told = new_strategy().told_values

        def recorded(trial: FrozenTrial) -> list[float] | None:
            row = stored.get(trial.user_attrs.get("evaluation_index", -1))
            if row is None or row.worker_id != trial.user_attrs.get("worker_id"):
                return None  # never recorded, or its index went to another worker after this one died
            return told(Evaluation.from_json(row.record))

        closed = fail_running_trials(storage, study_name, keep=keep, recorded=recorded)
        if closed:
            worker._log(job.id, f"closed trial(s) {closed} that a stopped worker left running")

    record_shared(baseline)  # idempotent: the first holder's baseline is the job's
    live = set(worker.repo.live_workers(job.id))
    settle_stale(lambda t: _trial_alive(t, live, worker.settings.lease_seconds))

    started = time.monotonic()
    stop_reason = "budget"
    while True:
        slot = worker.repo.slot_of(job.id, worker.worker_id)
        if slot is None:
            raise JobStop("lost")
        left_s = None if spec.seconds is None else spec.seconds - (time.monotonic() - started)
        if left_s is not None and left_s <= 0:
            stop_reason = "time"
            break
        strategy = new_strategy()
        gate = _SharedBudget(worker, job.id, lease, spec.budget, strategy.trial_user_attrs, record_shared)
        # each holder its own sampler seed: identical seeds would ask identical random start-up plans
        seed = (spec.seed + 1_000_003 * (slot + 1) + 7919 * worker.repo.search_count(job.id)) % 2**31
        result = run_job(
            dataclasses.replace(spec, finetune_top=0, prune_steps=1, seed=seed, seconds=left_s),
            objective=objective,
            callback=[worker._probe_keeper(job.id, strategy), gate],  # a warm start's probes: stored, reused
            strategy=strategy,
        )
        worker._check(lease)
        worker._log_failures(job.id, result)
        if result.stop_reason == "interrupted":
            raise JobStop("released")
        stop_reason = "budget" if gate.exhausted else result.stop_reason
        if slot != 0:
            _await_slot_0(worker, job.id, lease)
        if not worker.repo.leave_slot(job.id, worker.worker_id):
            log.info("worker %s: job %s's search budget is spent; slot 0 finishes it", worker.worker_id, job.id)
            return "left"
        # this worker finishes the job: wait until the others have recorded their last evaluations and left
        # (or died: their leases expire), then search again if a dead worker's evaluation is missing
        while len(worker.repo.live_workers(job.id)) > 1:
            worker._check(lease)
            worker.stop_event.wait(worker.settings.poll_seconds)
        worker._check(lease)
        if not gate.exhausted or spec.budget is None or worker.repo.search_count(job.id) >= spec.budget:
            break

    settle_stale(None)  # every other holder has gone: nothing of theirs still runs
    history = [Evaluation.from_json(r) for r in worker.repo.all_records(job.id)]
    final = snapshot(worker.repo.all_records(job.id))
    final = dataclasses.replace(final, finetuned=[], stop_reason=stop_reason, wall_s=time.monotonic() - started)

    record = worker._recorder(job.id, lease)

    def best_of(search: list[Evaluation], finetuned: Sequence[Evaluation] = ()) -> dict[str, Any]:
        return worker._best_summary(dataclasses.replace(final, evaluations=search, finetuned=list(finetuned)), spec)

    if spec.finetune_top > 0:
        final.finetune_front(
            spec.finetune_top,
            spec.finetune_recovery(),
            key=spec.selection(),
            callback=JobHooks(worker, job.id, lease, record, best_of, objective.baseline),
            stored={e.index: e for e in history if e.stage == "finetuned"},
        )
        worker._check(lease)
    worker._export(job, spec, final, objective, lease)
    if lease.cancel_requested:
        raise JobStop("cancelled")
    workers = sorted({str(r.worker_id) for r in worker.repo.evaluations(job.id, limit=10**6).items if r.worker_id})
    worker.repo.transition(
        job.id,
        JobState.succeeded,
        worker_id=worker.worker_id,
        best=worker._best_summary(final, spec),
        stop_reason=stop_reason,
        evaluations=len(final.evaluations),
        replayed=0,
        workers=workers,
        study=study_name,
    )
    return "succeeded"


def _await_slot_0(worker: Worker, job_id: str, lease: Lease) -> None:
    """Before a holder leaves a shared job to slot 0's holder: wait until that one proves alive (its lease is
    renewed) or dead (its lease runs out: :meth:`Repository.leave_slot` then moves this worker to slot 0)."""
    seen = worker.repo.slot_lease(job_id, 0)
    while True:
        current = worker.repo.slot_lease(job_id, 0)
        if current is None or current < datetime.now(UTC) or current != seen:
            return
        worker._check(lease)
        worker.stop_event.wait(min(worker.settings.poll_seconds, worker.settings.heartbeat_seconds))


class _SharedBudget(SearchCallback):
    """The search callback of one holder of a shared job: besides stop/cancel/lost, it reserves the next
    evaluation index before every ask (``exhausted`` once the job's budget is taken), numbers the evaluation with
    it, and records each evaluation (``record``) before freeing the reservation."""

    def __init__(
        self,
        worker: Worker,
        job_id: str,
        lease: Lease,
        budget: int | None,
        trial_attrs: dict[str, Any],
        record: Callable[[Evaluation], None],
    ) -> None:
        self.worker, self.job_id, self.lease, self.budget = worker, job_id, lease, budget
        self.record = record
        self.trial_attrs = trial_attrs
        """The strategy's ``trial_user_attrs``: the next trial carries its reserved index from the ask on."""
        self.reserved: int | None = None
        self.exhausted = False

    def on_step(self) -> bool:
        if self.reserved is None:  # before the next ask (not holding an index others wait for)
            self.worker._serve_between(self.lease)
        if self.lease.lost or self.lease.cancel_requested or self.worker.stop_event.is_set():
            return False
        if self.reserved is None:
            try:
                self.reserved = self.worker.repo.reserve_index(self.job_id, self.worker.worker_id, self.budget)
            except LeaseLost:
                self.lease.lost = True
                return False
            if self.reserved is None:
                self.exhausted = True
                return False
            self.trial_attrs["evaluation_index"] = self.reserved
        return True

    def number(self, local: int) -> int:
        if self.reserved is None:
            raise RuntimeError("an evaluation without a reserved index")
        return self.reserved

    def on_evaluation(self, progress: Progress) -> bool:
        self.record(progress.evaluation)
        self.reserved = None
        return True


def _trial_alive(trial: FrozenTrial, live: set[str], grace_s: float) -> bool:
    """A RUNNING trial of a live holder, or one just asked (its owner not written yet)."""
    owner = trial.user_attrs.get("worker_id")
    if owner is not None:
        return owner in live
    start = trial.datetime_start
    return start is not None and (datetime.now() - start).total_seconds() < grace_s


# -- process main -------------------------------------------------------------------------------------------
