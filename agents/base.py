"""One strategy protocol and one loop that runs it against an :class:`~autoprune.objective.Objective`.

Black-box strategies implement ``ask() -> {group: ratio}`` and ``tell(ratios, evaluation)``; :func:`run_search`
turns ask/tell into a search with a budget (evaluations and/or seconds), a :class:`SearchCallback` and a seed, the
way Optuna builds ``optimize`` on ask/tell. RL strategies implement ``run(session)`` themselves (they
drive the gymnasium env, whose objective is the session's recording objective), so every strategy's evaluations
go through the same :class:`SearchSession` and look the same.

A candidate that cannot be pruned (a :class:`~autoprune.errors.PruningError`: a combination of cuts the model's
forward rejects) does not end the search: the session records it in ``failures`` with the reason, counts it
against the budget, and tells the strategy (``tell_failed``; the gymnasium env ends the episode with the reward of
a model that lost all quality for no speed-up). After :data:`MAX_CONSECUTIVE_FAILURES` failures in a row the
search stops with ``stop_reason == "failing"``.

The session also *replays*: given evaluations recorded earlier for the same job (``history``), a plan that was
already evaluated is answered from the record instead of being pruned and measured again. A seeded strategy
asks the same plans in the same order, so a resumed job redoes none of its completed evaluations, and a
recorded run can be replayed exactly, latency noise included.

Whoever runs a search watches and steers it through one :class:`SearchCallback` object, as stable-baselines3's
callbacks do a training run: ``on_start(session)``, ``on_step() -> bool`` before each candidate (False stops the
search: a cancel, a lost lease, Ctrl-C), ``on_evaluation(progress) -> bool`` after each (False stops it too),
``on_end(result)``, and ``number(local)`` for the index an evaluation gets (workers sharing a job number theirs from
one allocator). :class:`CallbackList` combines several; :func:`as_callback` turns the conveniences a user passes
(a ``threading.Event`` or ``() -> bool`` stop signal, plain ``fn(progress)`` functions) into one.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agents.result import Failure, SearchResult
from autoprune.errors import InvalidConfigError, PruningError
from autoprune.names import MAX_RATIO
from autoprune.pareto import pareto_front

if TYPE_CHECKING:
    from autoprune.objective import Evaluation, Objective
    from autoprune.plan import Plan
    from autoprune.recovery import FinetuneReport, RecoveryConfig

Ratios = dict[str, float]
StopSignal = threading.Event | Callable[[], bool] | None


@dataclass(frozen=True)
class Budget:
    """When a search stops: after ``evaluations`` candidates and/or ``seconds`` of wall time (first reached).

    The wall-clock limit is checked between evaluations; an evaluation in progress always completes.
    """

    evaluations: int | None = None
    """Number of candidate evaluations (the unpruned baseline is not counted)."""
    seconds: float | None = None
    """Wall-clock limit in seconds."""

    def __post_init__(self) -> None:
        if self.evaluations is None and self.seconds is None:
            raise InvalidConfigError("a budget needs a number of evaluations and/or a time limit in seconds")
        if self.evaluations is not None and (
            isinstance(self.evaluations, bool) or not isinstance(self.evaluations, int) or self.evaluations < 1
        ):
            raise InvalidConfigError(f"budget evaluations must be an integer >= 1, got {self.evaluations!r}")
        if self.seconds is not None and (
            isinstance(self.seconds, bool)
            or not isinstance(self.seconds, int | float)
            or not math.isfinite(self.seconds)
            or self.seconds <= 0
        ):
            raise InvalidConfigError(f"budget seconds must be a positive number, got {self.seconds!r}")


@dataclass(frozen=True)
class SearchSpace:
    """What a strategy chooses: one ratio in ``[0, max_ratio]`` per prunable group, in forward order."""

    groups: tuple[str, ...]
    max_ratio: float = 0.8
    macs: tuple[int, ...] = ()
    """MACs of each group in the unpruned model (same order), for strategies that use layer features."""

    def __post_init__(self) -> None:
        if not self.groups:
            raise InvalidConfigError("the model has no prunable groups to search over")
        if not 0.0 < self.max_ratio <= MAX_RATIO:
            raise InvalidConfigError(f"max_ratio must be in (0, {MAX_RATIO}], got {self.max_ratio}")

    @classmethod
    def from_objective(cls, objective: Objective, max_ratio: float = 0.8) -> SearchSpace:
        groups = objective.structure.groups
        if not groups:
            raise InvalidConfigError(objective.structure.no_groups_message())
        return cls(tuple(g.name for g in groups), max_ratio, tuple(int(g.macs) for g in groups))

    def clip(self, ratios: Mapping[str, float]) -> Ratios:
        """Ratios for every group, clipped to ``[0, max_ratio]`` and rounded to 1e-6 (stable plans, stable JSON)."""
        return {g: round(min(max(float(ratios.get(g, 0.0)), 0.0), self.max_ratio), 6) for g in self.groups}


@dataclass(frozen=True)
class Progress:
    """Sent to progress callbacks after every evaluation."""

    done: int
    total: int | None
    evaluation: Evaluation
    best: Evaluation
    """Highest reward so far."""
    front_size: int
    elapsed: float
    replayed: bool
    """True when the evaluation came from the recorded history instead of being run again."""

    def __repr__(self) -> str:
        """One compact line (``callbacks=[print]`` prints it), not the nested Evaluations' reprs."""
        return f"Progress({self.line()})"

    def line(self) -> str:
        """``done/total: quality, speed-up, reward | best reward | front | elapsed`` (what the facade prints)."""
        e, total = self.evaluation, "?" if self.total is None else self.total
        return (
            f"{self.done}/{total}: {e.metric} {e.quality:.4f}, {e.speedup:.2f}x, reward {e.reward:.4f}"
            f"{' (replayed)' if self.replayed else ''} | best reward {self.best.reward:.4f} | front "
            f"{self.front_size} | {self.elapsed:.1f} s"
        )


ProgressCallback = Callable[[Progress], None]


class SearchCallback:
    """Hooks of one search (see the module docstring); subclass and override what you need."""

    reason: str = "stopped"
    """The ``stop_reason`` a search stopped by this callback ends with."""

    def on_start(self, session: SearchSession) -> None:
        """Before the strategy runs."""

    def on_step(self) -> bool:
        """Before each candidate (and each probe of a strategy that probes); False stops the search."""
        return True

    def on_evaluation(self, progress: Progress) -> bool:
        """After each evaluation (replayed ones too); False stops the search."""
        return True

    def on_end(self, result: SearchResult) -> None:
        """After the search, with what it found (before any fine-tuning stage)."""

    def number(self, local: int) -> int:
        """The index the ``local``-th evaluation of this session gets (default: ``local``)."""
        return local

    # the fine-tuning stage after the search (SearchResult.finetune_front); on_step is asked before each point
    def on_finetune_start(self, point: Evaluation, recovery: RecoveryConfig) -> None:
        """Before ``point`` (a search evaluation) is fine-tuned with ``recovery``."""

    def on_finetune(self, point: Evaluation, report: FinetuneReport) -> None:
        """``point``'s fine-tune as it trains."""

    def on_finetuned(self, tuned: Evaluation, result: SearchResult, *, trained: bool) -> None:
        """A fine-tuned point joined ``result`` (``trained`` False: taken as recorded by an earlier attempt)."""


class CallbackList(SearchCallback):
    """Several callbacks as one: every hook goes to each in order; the first one that stops the search names the
    reason; the first one that numbers evaluations differently numbers them."""

    def __init__(self, callbacks: Iterable[SearchCallback]) -> None:
        self.callbacks = list(callbacks)

    def _stopped_by(self, callback: SearchCallback) -> bool:
        self.reason = callback.reason
        return False

    def on_start(self, session: SearchSession) -> None:
        for c in self.callbacks:
            c.on_start(session)

    def on_step(self) -> bool:
        return all(c.on_step() or self._stopped_by(c) for c in self.callbacks)

    def on_evaluation(self, progress: Progress) -> bool:
        keep = True
        for c in self.callbacks:  # every callback sees every evaluation, even after one said stop
            if not c.on_evaluation(progress) and keep:
                keep = self._stopped_by(c)
        return keep

    def on_end(self, result: SearchResult) -> None:
        for c in self.callbacks:
            c.on_end(result)

    def on_finetune_start(self, point: Evaluation, recovery: RecoveryConfig) -> None:
        for c in self.callbacks:
            c.on_finetune_start(point, recovery)

    def on_finetune(self, point: Evaluation, report: FinetuneReport) -> None:
        for c in self.callbacks:
            c.on_finetune(point, report)

    def on_finetuned(self, tuned: Evaluation, result: SearchResult, *, trained: bool) -> None:
        for c in self.callbacks:
            c.on_finetuned(tuned, result, trained=trained)

    def number(self, local: int) -> int:
        for c in self.callbacks:
            if type(c).number is not SearchCallback.number:
                return c.number(local)
        return local


class StopOn(SearchCallback):
    """Stops the search once ``signal`` is set (a ``threading.Event``) or returns True (``() -> bool``); its
    ``reason`` attribute, if any, names the stop (the CLI's Ctrl-C flag says "interrupted")."""

    def __init__(self, signal: threading.Event | Callable[[], bool]) -> None:
        self.signal = signal

    @property
    def reason(self) -> str:  # type: ignore[override]
        return str(getattr(self.signal, "reason", None) or "stopped")

    def on_step(self) -> bool:
        if isinstance(self.signal, threading.Event):
            return not self.signal.is_set()
        return not self.signal()


class EachEvaluation(SearchCallback):
    """Calls ``fn(progress)`` after every evaluation (a plain progress function; its return value is ignored)."""

    def __init__(self, fn: ProgressCallback) -> None:
        self.fn = fn

    def on_evaluation(self, progress: Progress) -> bool:
        self.fn(progress)
        return True


def as_callback(
    callback: SearchCallback | Sequence[SearchCallback] | None = None,
    *,
    stop: StopSignal = None,
    callbacks: Sequence[ProgressCallback | SearchCallback] = (),
) -> SearchCallback:
    """One callback from what a caller passes: callback object(s), a stop signal and progress functions."""
    found: list[SearchCallback] = []
    if isinstance(callback, SearchCallback):
        found.append(callback)
    elif callback is not None:
        found.extend(callback)
    if stop is not None:
        found.append(StopOn(stop))
    found.extend(c if isinstance(c, SearchCallback) else EachEvaluation(c) for c in callbacks)
    return found[0] if len(found) == 1 else CallbackList(found)


class SearchStopped(Exception):
    """Raised inside a strategy's run when the budget is spent or a stop was requested."""


MAX_CONSECUTIVE_FAILURES = 10
"""A search whose last this-many candidates all failed to prune stops (``stop_reason == "failing"``)."""


class CandidateFailed(PruningError):
    """Raised by :meth:`SearchSession.evaluate` for a candidate that could not be pruned (already recorded)."""


class SearchSession:
    """The live state of one search: budget, callback, history replay and every evaluation."""

    def __init__(
        self,
        objective: Objective,
        space: SearchSpace,
        budget: Budget,
        *,
        seed: int = 0,
        callback: SearchCallback | None = None,
        history: Iterable[Evaluation] = (),
    ) -> None:
        self.objective = objective
        self.space = space
        self.budget = budget
        self.seed = seed
        self.callback = callback or SearchCallback()
        self.evaluations: list[Evaluation] = []
        self.failures: list[Failure] = []
        self._failing = 0
        self._history: dict[Plan, list[Evaluation]] = {}
        for e in history:
            if e.stage == "search" and e.index > 0:
                self._history.setdefault(e.plan, []).append(e)
        self.replayed = 0
        self._front: list[Evaluation] = []
        self.started = time.perf_counter()
        self.stop_reason: str | None = None

    # -- budget and stop ----------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def spent(self) -> int:
        """Candidates tried: evaluations plus failures."""
        return len(self.evaluations) + len(self.failures)

    @property
    def remaining(self) -> int | None:
        if self.budget.evaluations is None:
            return None
        return max(self.budget.evaluations - self.spent, 0)

    def should_stop(self) -> bool:
        """True (and ``stop_reason`` set) once the budget is spent or a stop was requested."""
        if self.stop_reason is not None:
            return True
        if self.budget.evaluations is not None and self.spent >= self.budget.evaluations:
            self.stop_reason = "budget"
        elif self._failing >= MAX_CONSECUTIVE_FAILURES:
            self.stop_reason = "failing"
        elif self.budget.seconds is not None and self.elapsed >= self.budget.seconds:
            self.stop_reason = "time"
        elif not self.callback.on_step():
            self.stop_reason = self.callback.reason
        return self.stop_reason is not None

    def interrupt(self, reason: str = "interrupted") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    # -- evaluation ---------------------------------------------------------------------------------------
    def plan(self, ratios: Mapping[str, float]) -> Plan:
        return self.objective.plan(self.space.clip(ratios))

    def evaluate(self, ratios_or_plan: Mapping[str, float] | Plan, *, checked: bool = False) -> Evaluation:
        """Evaluate one candidate (or answer it from the history); raises :class:`SearchStopped` when done and
        :class:`CandidateFailed` (after recording it in ``failures``) when the plan cannot be pruned.

        ``checked=True`` skips the stop check (the caller has just made it, between its ask and this call).
        """
        if not checked and self.should_stop():
            raise SearchStopped(self.stop_reason)
        from autoprune.plan import Plan

        plan = ratios_or_plan if isinstance(ratios_or_plan, Plan) else self.plan(ratios_or_plan)
        recorded = self._history.get(plan)
        replayed = bool(recorded)
        if recorded:
            evaluation = recorded.pop(0)
            self.replayed += 1
        else:
            try:
                evaluation = self.objective.evaluate(plan)
            except PruningError as exc:
                self.failures.append(Failure(plan, str(exc)))
                self._failing += 1
                raise CandidateFailed(str(exc)) from exc
        self._failing = 0
        local = len(self.evaluations) + 1
        index = self.callback.number(local)
        evaluation = dataclasses.replace(evaluation, index=index)
        self.evaluations.append(evaluation)
        best = max(self.evaluations, key=lambda e: e.reward)
        # incremental: a point dominated once stays dominated, so the new front comes from the old one
        self._front = pareto_front([*(self._front or [self.objective.baseline]), evaluation])
        front = self._front
        progress = Progress(
            done=len(self.evaluations),
            total=self.budget.evaluations,
            evaluation=evaluation,
            best=best,
            front_size=len(front),
            elapsed=self.elapsed,
            replayed=replayed,
        )
        if not self.callback.on_evaluation(progress):
            self.interrupt(self.callback.reason)
        return evaluation

    def recording_objective(self) -> RecordingObjective:
        """An Objective stand-in for the env: same structure, plans and reward, evaluations through the session."""
        return RecordingObjective(self)


class RecordingObjective:
    """Looks like the session's :class:`Objective` to the gymnasium env; ``__call__`` goes through the session."""

    def __init__(self, session: SearchSession) -> None:
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session.objective, name)

    def plan(self, ratios: Mapping[str, float], **extra: Any) -> Plan:
        """Plans through the session's space: clipped to ``[0, max_ratio]`` and rounded like every strategy's."""
        return self._session.plan(ratios)

    def __call__(self, plan: Plan | Mapping[str, float]) -> Evaluation:
        return self._session.evaluate(plan)

    evaluate = __call__

    def __deepcopy__(self, memo: dict[int, Any]) -> RecordingObjective:
        return self


@runtime_checkable
class Strategy(Protocol):
    """What :func:`run_search` needs: a name and ``run(session)``.

    Black-box strategies subclass :class:`AskTellStrategy` and get ``run`` from the shared loop. Optional hooks
    (looked up with ``getattr``): ``info() -> dict`` (what the search learnt, ``SearchResult.info``), and for a
    strategy that probes the groups first, ``probe_record()`` / ``restore_probes(table)``
    (:class:`agents.knapsack.StoredProbes`: a resumed job hands its stored probe table back instead of probing).
    """

    name: str

    def run(self, session: SearchSession) -> None: ...


class AskTellStrategy(ABC):
    """Base for black-box strategies: implement :meth:`setup`, :meth:`ask` and :meth:`tell`."""

    name = "ask-tell"

    def setup(self, space: SearchSpace, budget: Budget, seed: int) -> None:  # noqa: B027 - optional hook
        """Called once before the first ``ask``."""

    @abstractmethod
    def ask(self) -> Ratios | None:
        """The next candidate: a ratio per group (missing groups are 0); ``None`` when nothing is left to try."""

    @abstractmethod
    def tell(self, ratios: Ratios, evaluation: Evaluation) -> None:
        """The result of the candidate last asked with ``ratios``."""

    def tell_failed(self, ratios: Ratios, reason: str) -> None:  # noqa: B027 - optional hook
        """The candidate asked with ``ratios`` could not be pruned (see :class:`Failure`)."""

    def run(self, session: SearchSession) -> None:
        self.setup(session.space, session.budget, session.seed)
        while not session.should_stop():
            asked = self.ask()
            if asked is None:
                session.interrupt("exhausted")
                break
            ratios = session.space.clip(asked)
            try:
                evaluation = session.evaluate(ratios, checked=True)  # every asked candidate is evaluated and told
            except CandidateFailed as exc:
                self.tell_failed(ratios, str(exc))
                continue
            self.tell(ratios, evaluation)


def run_search(
    objective: Objective,
    strategy: Strategy | str,
    budget: Budget | int,
    *,
    seed: int = 0,
    max_ratio: float = 0.8,
    callback: SearchCallback | Sequence[SearchCallback] | None = None,
    stop: StopSignal = None,
    callbacks: Sequence[ProgressCallback | SearchCallback] = (),
    history: Iterable[Evaluation] = (),
    options: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Run ``strategy`` against ``objective`` until the budget is spent or the callback stops it.

    ``strategy`` is a strategy object or a registered name (``options`` are passed to its constructor).
    Ctrl-C stops the search cleanly: what was evaluated is kept and returned (``result.stop_reason ==
    "interrupted"``). ``history`` holds evaluations recorded earlier for this job; plans found there are not
    evaluated again. ``callback`` (one :class:`SearchCallback` or several) watches and steers the search;
    ``stop`` (an Event or ``() -> bool``) and ``callbacks`` (``fn(progress)`` functions) are conveniences that
    become callbacks (:func:`as_callback`).
    """
    from agents import make_strategy

    if isinstance(budget, int):
        budget = Budget(evaluations=budget)
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, **(options or {}))
    elif options:
        raise InvalidConfigError("options are for strategies given by name")
    space = SearchSpace.from_objective(objective, max_ratio)
    hooks = as_callback(callback, stop=stop, callbacks=callbacks)
    session = SearchSession(objective, space, budget, seed=seed, callback=hooks, history=history)
    hooks.on_start(session)
    try:
        strategy.run(session)
    except SearchStopped:
        pass
    except KeyboardInterrupt:
        session.interrupt("interrupted")
    session.should_stop()
    result = SearchResult(
        strategy=strategy.name,
        seed=seed,
        baseline=objective.baseline,
        evaluations=list(session.evaluations),
        failures=list(session.failures),
        stop_reason=session.stop_reason or "finished",
        wall_s=session.elapsed,
        replayed=session.replayed,
        objective=objective,
        info=strategy.info() if callable(getattr(strategy, "info", None)) else {},  # type: ignore[attr-defined]
    )
    hooks.on_end(result)
    return result
