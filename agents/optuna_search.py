"""Optuna samplers as ask/tell strategies: TPE on the scalar reward, NSGA-II on (quality, measured latency).

Each search owns one Optuna study: in memory by default, or in a database (``storage="sqlite:///study.db"``,
``"postgresql://..."``) so the trials can be inspected with Optuna's own tools. One trial per candidate, one
float parameter per prunable group in ``[0, max_ratio]``. The shared loop is strictly ask → evaluate → tell, so
each ``tell`` answers the trial asked just before it; trials asked but never told (the search stopped between
the two) are closed as failed so a persistent study keeps no trial ``RUNNING`` forever.

Same seed, same objective → same plans: the samplers are seeded and are the only source of randomness.
Resuming a job relies on the session's history replay (same seed, same plans), so a study loaded from a
storage that already holds trials would condition the sampler on them and ask different plans; give each
job its own ``study_name``.

**Sharing one study.** Several processes may run the same strategy against one ``storage``/``study_name``
(the service does this for a job with ``workers > 1``): each asks and tells its own trials, and the sampler
sees every process's COMPLETE trials. Give each process its own seed (identical seeds ask identical random
start-up plans). ``trial_user_attrs`` are written on every asked trial (the service writes the worker id), so
that :func:`fail_running_trials` can close the trials a dead process left ``RUNNING``. Optuna's heartbeat is
for ``study.optimize`` only (``ask`` warns about it), so the owner of a trial is tracked this way instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler, NSGAIISampler, TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState

from agents.base import AskTellStrategy, Budget, Ratios, SearchSession, SearchSpace
from agents.knapsack import StoredProbes
from autoprune.errors import InvalidConfigError

if TYPE_CHECKING:
    from autoprune.objective import Evaluation

__all__ = ["OptunaNSGA2", "OptunaTPE", "fail_running_trials"]

T = TypeVar("T")


def _quiet_optuna() -> None:
    """Drop Optuna's per-trial INFO lines (its own logger only; a stricter level set by the user is kept)."""
    if optuna.logging.get_verbosity() < optuna.logging.WARNING:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _check_positive_int(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _OptunaStrategy(StoredProbes, AskTellStrategy):
    """One Optuna study driven through ask/tell; subclasses choose the sampler, directions and told values."""

    directions: tuple[str, ...] = ("maximize",)

    def __init__(self, storage: str | None = None, study_name: str | None = None, warm_start: int = 0) -> None:
        _check_positive_int("warm_start", warm_start, 0)
        if storage is not None and (not isinstance(storage, str) or "://" not in storage):
            raise InvalidConfigError(
                f"storage must be a database URL such as 'sqlite:///study.db' or 'postgresql://...', got {storage!r}"
            )
        if study_name is not None and (not isinstance(study_name, str) or not study_name.strip()):
            raise InvalidConfigError(f"study_name must be a non-empty string, got {study_name!r}")
        self.storage = storage
        self.study_name = study_name
        self._study: optuna.Study | None = None
        self._space: SearchSpace | None = None
        self._pending: list[tuple[Ratios, Trial]] = []
        self.trial_user_attrs: dict[str, Any] = {}
        """Set on every asked trial (e.g. who asked it, when several processes share the study)."""
        self.warm_start = warm_start
        """Knapsack plans (:mod:`agents.knapsack`: measured latency table, least predicted loss per latency target)
        enqueued as the study's first trials; 0: none."""
        self._warm: list[Ratios] = []
        self._info: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        """The latency table of the warm start, if there was one."""
        return dict(self._info)

    # -- what subclasses choose ---------------------------------------------------------------------------
    def _sampler(self, budget: Budget, seed: int) -> BaseSampler:
        raise NotImplementedError

    def _values(self, evaluation: Evaluation) -> list[float]:
        raise NotImplementedError

    def told_values(self, evaluation: Evaluation) -> list[float]:
        """What ``tell`` reports to the study for ``evaluation``."""
        return self._values(evaluation)

    # -- the study ----------------------------------------------------------------------------------------
    @property
    def study(self) -> optuna.Study:
        """The live Optuna study (after the search has started)."""
        if self._study is None:
            raise RuntimeError("the Optuna study exists once the search has started")
        return self._study

    def setup(self, space: SearchSpace, budget: Budget, seed: int) -> None:
        _quiet_optuna()
        self._space = space
        self._pending = []
        wanted = [StudyDirection[d.upper()] for d in self.directions]
        sampler = self._sampler(budget, seed)
        self._study = _retry_shared(
            self.storage,
            lambda: optuna.create_study(
                storage=self.storage,
                study_name=self.study_name,
                sampler=sampler,
                directions=wanted,
                load_if_exists=True,
            ),
        )
        if self._warm and not self._study.trials:  # a shared study is warm-started once, by its first process
            for ratios in self._warm:
                self._study.enqueue_trial(ratios, user_attrs={"warm_start": "knapsack"})
        if list(self._study.directions) != wanted:
            found = ", ".join(d.name.lower() for d in self._study.directions)
            raise InvalidConfigError(
                f"study {self._study.study_name!r} in {self.storage} optimizes ({found}), "
                f"not ({', '.join(self.directions)}); choose another study_name"
            )

    def ask(self) -> Ratios:
        assert self._space is not None, "setup() must run before ask()"
        trial = self.study.ask()
        for key, value in self.trial_user_attrs.items():
            trial.set_user_attr(key, value)
        ratios = {g: trial.suggest_float(g, 0.0, self._space.max_ratio) for g in self._space.groups}
        # the loop tells the clipped ratios (rounded to 1e-6); remember the trial under those
        self._pending.append((self._space.clip(ratios), trial))
        return ratios

    def _asked_trial(self, ratios: Ratios) -> Trial:
        """The pending trial asked with ``ratios`` (the oldest if none matches), taken off the pending list."""
        if not self._pending:
            raise RuntimeError("tell() without a matching ask()")
        index = next((i for i, (asked, _) in enumerate(self._pending) if asked == ratios), 0)
        return self._pending.pop(index)[1]

    def tell(self, ratios: Ratios, evaluation: Evaluation) -> None:
        trial = self._asked_trial(ratios)
        try:
            trial.set_user_attr("evaluation_index", evaluation.index)
        except UpdateFinishedTrialError:  # a shared study: another process failed it as stale meanwhile
            return
        self.study.tell(trial, self._values(evaluation), skip_if_finished=True)

    def tell_failed(self, ratios: Ratios, reason: str) -> None:
        trial = self._asked_trial(ratios)
        try:
            trial.set_user_attr("failure", reason[:500])
        except UpdateFinishedTrialError:  # a shared study: another process failed it as stale meanwhile
            return
        self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def run(self, session: SearchSession) -> None:
        if self.warm_start:
            from agents.knapsack import knapsack_plans

            table, self._warm = knapsack_plans(session, self.warm_start, table=self._restored)
            self.table = table
            self._info = {"sensitivity": table.to_json(), "warm_start": [dict(p) for p in self._warm]}
        try:
            super().run(session)
        finally:
            # asked but never evaluated (stop between ask and evaluate): close them in the storage
            for _, trial in self._pending:
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self._pending = []


def fail_running_trials(
    storage: str,
    study_name: str,
    keep: Callable[[FrozenTrial], bool] | None = None,
    recorded: Callable[[FrozenTrial], Sequence[float] | None] | None = None,
) -> list[int]:
    """Close the study's ``RUNNING`` trials (except those ``keep`` accepts); their numbers. A trial whose
    evaluation its dead process did record (``recorded`` returns the values to tell: it died between recording
    and telling) is completed with them, any other one is marked ``FAIL``. A study that does not exist yet has
    none."""
    _quiet_optuna()
    try:
        study = _retry_shared(storage, lambda: optuna.load_study(study_name=study_name, storage=storage))
    except KeyError:
        return []
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if keep is None or not keep(trial):
            values = None if recorded is None else recorded(trial)
            if values is None:
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            else:
                study.tell(trial.number, list(values), skip_if_finished=True)
            failed.append(trial.number)
    return failed


def _retry_shared(storage: str | None, make: Callable[[], T]) -> T:
    """``make()``, tried again twice for a database storage: processes sharing a study create Optuna's tables
    and the study at the same moment, and one of them may lose the race (duplicate table or study)."""
    for attempt in range(2):
        try:
            return make()
        except KeyError:
            raise  # no such study: not a race
        except Exception:
            if storage is None:
                raise
            time.sleep(0.2 * (attempt + 1))
    return make()


class OptunaTPE(_OptunaStrategy):
    """Optuna's TPE sampler maximizing the scalar reward of each evaluation.

    ``n_startup_trials`` random trials come first (default: a third of an evaluation budget, between 3 and 10;
    10 for a time-only budget).
    """

    name = "optuna-tpe"
    directions = ("maximize",)

    def __init__(
        self,
        storage: str | None = None,
        study_name: str | None = None,
        n_startup_trials: int | None = None,
        warm_start: int = 0,
    ) -> None:
        _check_positive_int("n_startup_trials", n_startup_trials, 0)
        super().__init__(storage, study_name, warm_start)
        self.n_startup_trials = n_startup_trials

    def startup_trials(self, budget: Budget) -> int:
        if self.n_startup_trials is not None:
            return self.n_startup_trials
        if budget.evaluations is None:
            return 10
        return min(10, max(3, budget.evaluations // 3))

    def _sampler(self, budget: Budget, seed: int) -> BaseSampler:
        return TPESampler(seed=seed, n_startup_trials=self.startup_trials(budget))

    def _values(self, evaluation: Evaluation) -> list[float]:
        return [float(evaluation.reward)]


class OptunaNSGA2(_OptunaStrategy):
    """Optuna's NSGA-II on two objectives: maximize quality, minimize measured latency (ratio to the base).

    ``population_size`` defaults to a third of an evaluation budget, between 4 and 50 (50 for a time-only
    budget), so a small budget still sees a few generations.
    """

    name = "optuna-nsga2"
    directions = ("maximize", "minimize")

    def __init__(
        self,
        storage: str | None = None,
        study_name: str | None = None,
        population_size: int | None = None,
        warm_start: int = 0,
    ) -> None:
        _check_positive_int("population_size", population_size, 2)
        super().__init__(storage, study_name, warm_start)
        self.population_size = population_size

    def population(self, budget: Budget) -> int:
        if self.population_size is not None:
            return self.population_size
        if budget.evaluations is None:
            return 50
        return min(50, max(4, budget.evaluations // 3))

    def _sampler(self, budget: Budget, seed: int) -> BaseSampler:
        return NSGAIISampler(seed=seed, population_size=self.population(budget))

    def _values(self, evaluation: Evaluation) -> list[float]:
        return [float(evaluation.quality), float(evaluation.latency_ratio)]

    def pareto_trials(self) -> Sequence[FrozenTrial]:
        """The study's non-dominated trials on (quality, latency ratio)."""
        return self.study.best_trials
