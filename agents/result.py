"""The result of a search: every evaluation, the Pareto front, the best point, and the final fine-tuning stage."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidConfigError
from autoprune.names import SELECTIONS
from autoprune.pareto import hypervolume, pareto_front

if TYPE_CHECKING:
    from torch import nn

    from agents.base import SearchCallback
    from autoprune.objective import Evaluation, Objective
    from autoprune.plan import Plan
    from autoprune.recovery import FinetuneReport, RecoveryConfig


@dataclass(frozen=True)
class Failure:
    """A candidate that could not be pruned: its plan and why (it has no quality or latency)."""

    plan: Plan
    reason: str


@dataclass(frozen=True)
class Selection:
    """Which point of a search is "best": the one rule the CLI (``--select``), a job spec and the service
    (``select``, what the worker exports first) and the facade (``autoprune.search(select=...)``) all apply,
    through :meth:`choose` (``SearchResult.best``), so the same evaluations give the same chosen point
    whichever front-end ran them.

    * ``reward``: highest reward (fine-tuned points win ties).
    * ``latency``: lowest measured latency with relative quality loss <= ``max_quality_drop``.
    * ``quality``: highest quality with latency <= ``max_latency_ratio`` x the unpruned model's.

    The baseline (the unpruned model) is chosen when no point qualifies.
    """

    key: str = "reward"
    max_quality_drop: float = 0.01
    """Relative quality loss allowed by ``latency``."""
    max_latency_ratio: float = 0.5
    """Latency ratio allowed by ``quality``."""

    def __post_init__(self) -> None:
        if self.key not in SELECTIONS:
            raise InvalidConfigError(f"unknown selection {self.key!r}; choose one of {', '.join(SELECTIONS)}")
        for name, lo, hi in (("max_quality_drop", "[0", 1.0), ("max_latency_ratio", "(0", 10.0)):
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, int | float)
            if not number or not (value >= 0 if lo == "[0" else value > 0) or not value <= hi:
                raise InvalidConfigError(f"{name} must be a number in {lo}, {hi:g}], got {value!r}")

    def choose(self, pool: Sequence[Evaluation], baseline: Evaluation) -> Evaluation:
        """The best of ``pool`` (which holds ``baseline``) under this rule; ``baseline`` when nothing qualifies."""
        if self.key == "reward":
            return max(pool, key=lambda e: (e.reward, e.stage == "finetuned"))
        if self.key == "latency":
            ok = [e for e in pool if e.quality_drop <= self.max_quality_drop]
            return min(ok, key=lambda e: (e.latency_ratio, -e.quality)) if ok else baseline
        ok = [e for e in pool if e.latency_ratio <= self.max_latency_ratio]
        return max(ok, key=lambda e: (e.quality, -e.latency_ratio)) if ok else baseline

    def rank(self, e: Evaluation) -> Any:
        """Sort key of the points to fine-tune first under this rule (``finetune_top``)."""
        if self.key == "reward":
            return -e.reward
        if self.key == "latency":
            return (e.latency_ratio, -e.quality)
        return (-e.quality, e.latency_ratio)

    def describe(self) -> str:
        """The rule in words (the report, the plot)."""
        if self.key == "reward":
            return "highest reward (fine-tuned points win ties)"
        if self.key == "latency":
            return f"lowest latency with a relative quality drop of at most {self.max_quality_drop:.2%}"
        return f"highest quality with latency at most {self.max_latency_ratio:.2f}x the unpruned model's"

    def to_json(self) -> dict[str, Any]:
        return {
            "select": self.key,
            "max_quality_drop": self.max_quality_drop,
            "max_latency_ratio": self.max_latency_ratio,
        }


@dataclass
class SearchResult:
    """What a search produced. ``objective`` is the live handle used to rebuild any point as a model."""

    strategy: str
    seed: int
    baseline: Evaluation
    evaluations: list[Evaluation]
    stop_reason: str
    """``budget``, ``time``, ``stopped`` (stop signal), ``interrupted`` (Ctrl-C), ``exhausted``, ``failing`` (too
    many candidates in a row could not be pruned) or ``finished``."""
    wall_s: float
    replayed: int = 0
    """How many evaluations were answered from a recorded history instead of being run again."""
    failures: list[Failure] = field(default_factory=list)
    """Candidates that could not be pruned, with the reason (they count against the budget)."""
    finetuned: list[Evaluation] = field(default_factory=list)
    """Front points after the final fine-tuning stage (``stage == "finetuned"``), re-evaluated and re-measured."""
    objective: Objective | None = field(default=None, repr=False, compare=False)
    info: dict[str, Any] = field(default_factory=dict)
    """What the strategy learnt besides its candidates (``knapsack``: the measured ``sensitivity`` table and its
    calibration), JSON-ready."""
    selection: Selection = field(default_factory=Selection)
    """The job's rule for its best point (``select``): what :meth:`best` applies when given no rule, and the
    order in which :meth:`finetune_front` picks points by default."""

    def failures_note(self) -> str | None:
        """One line on the candidates that could not be pruned (for the CLI, the report and the job log)."""
        if not self.failures:
            return None
        stopped = " (the search stopped: too many in a row)" if self.stop_reason == "failing" else ""
        return (
            f"{len(self.failures)} candidate(s) could not be pruned and were skipped{stopped}; "
            f"first: {self.failures[0].reason}"
        )

    # -- the front ----------------------------------------------------------------------------------------
    @property
    def all_evaluations(self) -> list[Evaluation]:
        """Baseline, search evaluations and fine-tuned evaluations."""
        return [self.baseline, *self.evaluations, *self.finetuned]

    def front(self, *, stage: str | None = None, with_size: bool = True) -> list[Evaluation]:
        """Non-dominated points (max quality, min measured latency, min size), baseline included.

        ``stage="search"`` restricts to the search's own figures; by default fine-tuned points take part and
        carry ``stage == "finetuned"``.
        """
        return pareto_front(self._pool(stage), with_size=with_size)

    def _pool(self, stage: str | None) -> list[Evaluation]:
        if stage is None:
            return self.all_evaluations
        if stage == "search":
            return [self.baseline, *self.evaluations]
        if stage == "finetuned":
            return [self.baseline, *self.finetuned]
        raise InvalidConfigError(f"unknown stage {stage!r}; choose search or finetuned (or None for all)")

    def hypervolume(self, *, stage: str | None = "search") -> float:
        """Hypervolume of (quality, latency ratio) over the baseline and the ``stage`` points (None: all)."""
        return hypervolume(self._pool(stage))

    def best(
        self,
        key: str | Selection | None = None,
        *,
        max_quality_drop: float | None = None,
        max_latency_ratio: float | None = None,
    ) -> Evaluation:
        """The best point (the baseline when nothing qualifies) under :attr:`selection`, the job's rule, or under
        ``key`` (a :class:`Selection`, or ``reward`` / ``latency`` / ``quality``) and the thresholds given.

        * ``reward``: highest reward.
        * ``latency``: lowest measured latency with relative quality loss <= ``max_quality_drop``.
        * ``quality``: highest quality with latency <= ``max_latency_ratio`` x the unpruned model's.
        """
        return self.rule(key, max_quality_drop=max_quality_drop, max_latency_ratio=max_latency_ratio).choose(
            self.all_evaluations, self.baseline
        )

    def rule(
        self,
        key: str | Selection | None = None,
        *,
        max_quality_drop: float | None = None,
        max_latency_ratio: float | None = None,
    ) -> Selection:
        """:attr:`selection` with what is given replaced (a :class:`Selection` is taken as it is)."""
        if isinstance(key, Selection):
            return key
        changes: dict[str, Any] = {
            "key": key,
            "max_quality_drop": max_quality_drop,
            "max_latency_ratio": max_latency_ratio,
        }
        return dataclasses.replace(self.selection, **{k: v for k, v in changes.items() if v is not None})

    def point(self, index: int, *, stage: str = "search") -> Evaluation:
        """The evaluation with this index and stage (fine-tuned points keep their search point's index)."""
        for e in self.all_evaluations:
            if e.index == index and (e.stage == stage or (index == 0 and stage == "search")):
                return e
        raise InvalidConfigError(f"no {stage} evaluation with index {index}")

    # -- rebuilding models --------------------------------------------------------------------------------
    def _objective(self) -> Objective:
        if self.objective is None:
            raise InvalidConfigError("this result was loaded without its objective; it cannot rebuild models")
        return self.objective

    def materialize(self, point: Evaluation | int) -> nn.Module:
        """The pruned (and recovered, or fine-tuned for fine-tuned points) model of a point, rebuilt from its plan."""
        evaluation = self.point(point) if isinstance(point, int) else point
        if evaluation.index == 0 and evaluation.stage == "search":
            import copy

            return copy.deepcopy(self._objective().base).eval()  # the unpruned model exactly as measured
        recovery = recovery_from_extra(evaluation.extra)
        return self._objective().materialize(evaluation.plan, recovery=recovery)

    # -- the final stage ----------------------------------------------------------------------------------
    def finetune_front(
        self,
        k: int,
        recovery: RecoveryConfig,
        *,
        key: str | Selection | None = None,
        progress: Callable[[int, int, Evaluation], None] | None = None,
        on_finetune: Callable[[Evaluation, FinetuneReport], None] | None = None,
        callback: SearchCallback | None = None,
        stored: Mapping[int, Evaluation] | None = None,
    ) -> list[Evaluation]:
        """Fine-tune the top ``k`` front points (ranked by ``key``, by default the result's :attr:`selection`), re-evaluate and re-measure them (not from the cache).

        ``progress(done, total, tuned)`` follows the points; ``on_finetune(point, report)`` each point's
        fine-tune as it trains (the search evaluation being fine-tuned, and its progress report). ``callback``
        (the search's :class:`~agents.base.SearchCallback`) is asked ``on_step`` before each point (False stops
        the stage; the points done so far are kept), told ``on_finetune_start``, each ``on_finetune`` report and
        ``on_finetuned``. ``stored``: fine-tuned evaluations recorded earlier for this job, by search index; such
        a point is taken as recorded instead of being trained again (a resumed job).

        The new evaluations have ``stage == "finetuned"`` and their recovery recipe in ``extra["recovery"]``;
        they join the front next to the search figures. Returns them.
        """
        if k < 0:
            raise InvalidConfigError(f"the number of points to fine-tune must be >= 0, got {k}")
        rule = self.rule(key)
        objective = self._objective()
        candidates = [e for e in self.front(stage="search") if e.index != 0]
        chosen = sorted(candidates, key=rule.rank)[:k]
        out = []
        for i, e in enumerate(chosen):
            if callback is not None and not callback.on_step():
                break
            tuned = (stored or {}).get(e.index)
            trained = tuned is None
            if tuned is None:
                if callback is not None:
                    callback.on_finetune_start(e, recovery)

                def report(point: Evaluation, r: FinetuneReport) -> None:
                    if on_finetune is not None:
                        on_finetune(point, r)
                    if callback is not None:
                        callback.on_finetune(point, r)

                tuned = objective.evaluate(
                    e.plan,
                    recovery=recovery,
                    stage="finetuned",
                    remeasure=True,
                    keep_model=True,  # materialize / export hand this model over: a point is fine-tuned once
                    on_finetune=functools.partial(report, e),
                )
                tuned = dataclasses.replace(
                    tuned,
                    index=e.index,
                    extra={**tuned.extra, "recovery": dataclasses.asdict(recovery), "search_quality": e.quality},
                )
            out.append(tuned)
            self.finetuned.append(tuned)
            if callback is not None:
                callback.on_finetuned(tuned, self, trained=trained)
            if progress is not None:
                progress(i + 1, len(chosen), tuned)
        return out

    def latency_prediction_errors(self) -> list[float]:
        """Relative error ``|predicted - measured| / measured`` of the latency ratio, sorted, for each search
        evaluation whose plan carries a prediction (``plan.extra["predicted_latency_ratio"]``: the ``knapsack``
        plans); empty for strategies that predict nothing."""
        errors = []
        for e in self.evaluations:
            predicted = dict(e.plan.extra).get("predicted_latency_ratio")
            if predicted is not None and e.latency_ratio > 0:
                errors.append(abs(float(predicted) - e.latency_ratio) / e.latency_ratio)
        return sorted(errors)

    # -- JSON ---------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        best = self.best()
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "evaluations": len(self.evaluations),
            "finetuned": len(self.finetuned),
            "replayed": self.replayed,
            "stop_reason": self.stop_reason,
            "wall_s": self.wall_s,
            "front_size": len(self.front()),
            "hypervolume": self.hypervolume(),
            "best": {"index": best.index, "stage": best.stage, "reward": best.reward, **self.selection.to_json()},
        }


def recovery_from_extra(extra: dict[str, Any]) -> RecoveryConfig | None:
    """The recovery recipe recorded in an evaluation's ``extra`` (fine-tuned points), if any."""
    data = extra.get("recovery")
    if not data:
        return None
    from autoprune.recovery import RecoveryConfig

    names = {f.name for f in dataclasses.fields(RecoveryConfig)}
    return RecoveryConfig(**{k: v for k, v in data.items() if k in names})
