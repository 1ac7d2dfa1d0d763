"""Optuna strategies (real Optuna): TPE on the reward, NSGA-II on (quality, latency), storage, stop, replay."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState

from agents import Budget, make_strategy, run_search
from agents.base import Progress, SearchSpace
from agents.optuna_search import OptunaNSGA2, OptunaTPE
from autoprune.errors import InvalidConfigError
from autoprune.objective import Objective

STRATEGIES = ("optuna-tpe", "optuna-nsga2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # and `objective`: tests/agents/conftest.py


def _plans(result) -> list:  # type: ignore[no-untyped-def]
    return [e.plan for e in result.evaluations]


@pytest.mark.parametrize("name", STRATEGIES)
def test_budget_ratios_groups_and_seeds(
    objective: Objective, name: str, check_budget_ratios_groups_and_seeds: Callable[..., object]
) -> None:
    check_budget_ratios_groups_and_seeds(objective, name, 8, 0.6)


def test_tpe_tells_the_reward(objective: Objective) -> None:
    strategy = make_strategy("optuna-tpe")
    assert isinstance(strategy, OptunaTPE)
    result = run_search(objective, strategy, 7, seed=3)
    study = strategy.study
    assert study.direction == StudyDirection.MAXIMIZE
    trials = study.trials
    assert len(trials) == 7
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert study.best_value == pytest.approx(max(e.reward for e in result.evaluations))
    for trial, e in zip(trials, result.evaluations, strict=True):
        assert trial.value == pytest.approx(e.reward)
        assert trial.user_attrs["evaluation_index"] == e.index
        # the trial's parameters are the plan's ratios before the session's 1e-6 rounding
        assert trial.params == pytest.approx(e.plan.as_dict(), abs=1e-6)


def test_tpe_startup_trials_default_and_option() -> None:
    tpe = OptunaTPE()
    assert tpe.startup_trials(Budget(evaluations=6)) == 3
    assert tpe.startup_trials(Budget(evaluations=15)) == 5
    assert tpe.startup_trials(Budget(evaluations=300)) == 10
    assert tpe.startup_trials(Budget(seconds=60)) == 10
    assert OptunaTPE(n_startup_trials=2).startup_trials(Budget(evaluations=300)) == 2
    nsga = OptunaNSGA2()
    assert nsga.population(Budget(evaluations=6)) == 4
    assert nsga.population(Budget(evaluations=30)) == 10
    assert nsga.population(Budget(evaluations=1000)) == 50
    assert nsga.population(Budget(seconds=60)) == 50


def test_nsga2_directions_values_and_pareto_set(objective: Objective) -> None:
    strategy = make_strategy("optuna-nsga2", population_size=4)
    assert isinstance(strategy, OptunaNSGA2)
    result = run_search(objective, strategy, 10, seed=0)
    study = strategy.study
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    trials = study.trials
    assert len(trials) == 10
    for trial, e in zip(trials, result.evaluations, strict=True):
        assert trial.values == pytest.approx([e.quality, e.latency_ratio])

    def dominates(a: list[float], b: list[float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    pareto = strategy.pareto_trials()
    assert pareto
    pareto_numbers = {t.number for t in pareto}
    for p in pareto:
        assert not any(dominates(t.values, p.values) for t in trials)
    for t in trials:
        if t.number not in pareto_numbers:
            assert any(dominates(p.values, t.values) or p.values == t.values for p in pareto)


def test_rdb_storage_keeps_the_trials(objective: Objective, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_search(objective, "optuna-tpe", 4, options={"storage": url, "study_name": "job-1"})
    study = optuna.load_study(study_name="job-1", storage=url)
    assert len(study.trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # the same name loads the existing study and adds to it
    run_search(objective, "optuna-tpe", 2, options={"storage": url, "study_name": "job-1"})
    assert len(optuna.load_study(study_name="job-1", storage=url).trials) == 6
    # a study of that name that optimizes something else is refused, not silently reused
    with pytest.raises(InvalidConfigError, match="choose another study_name"):
        run_search(objective, "optuna-nsga2", 2, options={"storage": url, "study_name": "job-1"})


def test_invalid_options() -> None:
    with pytest.raises(InvalidConfigError, match="database URL"):
        make_strategy("optuna-tpe", storage="study.db")
    with pytest.raises(InvalidConfigError, match="n_startup_trials"):
        make_strategy("optuna-tpe", n_startup_trials=-1)
    with pytest.raises(InvalidConfigError, match="population_size"):
        make_strategy("optuna-nsga2", population_size=1)
    with pytest.raises(InvalidConfigError, match="study_name"):
        make_strategy("optuna-nsga2", study_name="")
    with pytest.raises(InvalidConfigError, match="has no option"):
        make_strategy("optuna-tpe", population_size=4)
    with pytest.raises(InvalidConfigError, match="has no option"):
        make_strategy("optuna-nsga2", n_startup_trials=4)


def test_stop_signal_after_two_evaluations(objective: Objective) -> None:
    stop = threading.Event()

    def after_two(p: Progress) -> None:
        if p.done == 2:
            stop.set()

    strategy = make_strategy("optuna-nsga2")
    result = run_search(objective, strategy, 10, stop=stop, callbacks=[after_two])
    assert len(result.evaluations) == 2
    assert result.stop_reason == "stopped"
    assert [t.state for t in strategy.study.trials] == [TrialState.COMPLETE] * 2  # type: ignore[attr-defined]


def test_every_asked_trial_is_told_when_a_stop_arrives(objective: Objective) -> None:
    calls = 0

    def stop_on_second_check() -> bool:  # the loop checks once per candidate, before asking
        nonlocal calls
        calls += 1
        return calls >= 2

    strategy = make_strategy("optuna-tpe")
    result = run_search(objective, strategy, 5, stop=stop_on_second_check)
    assert len(result.evaluations) == 1
    assert result.stop_reason == "stopped"
    assert [t.state for t in strategy.study.trials] == [TrialState.COMPLETE]  # type: ignore[attr-defined]


def test_trial_whose_evaluation_fails_is_closed(objective: Objective, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    strategy = make_strategy("optuna-tpe")
    monkeypatch.setattr(type(objective), "evaluate", broken)
    result = run_search(objective, strategy, 5)
    assert result.evaluations == [] and result.stop_reason == "interrupted"
    assert [t.state for t in strategy.study.trials] == [TrialState.FAIL]  # type: ignore[attr-defined]


def test_tell_finds_the_trial_by_clipped_ratios(objective: Objective) -> None:
    space = SearchSpace.from_objective(objective, 0.7)
    strategy = OptunaTPE()
    strategy.setup(space, Budget(evaluations=4), seed=0)
    first, second = strategy.ask(), strategy.ask()
    e2 = objective.evaluate(space.clip(second))
    e1 = objective.evaluate(space.clip(first))
    strategy.tell(space.clip(second), e2)  # out of order: matched by the (rounded) ratios
    strategy.tell(space.clip(first), e1)
    values = {t.number: t.value for t in strategy.study.trials}
    assert values == {0: pytest.approx(e1.reward), 1: pytest.approx(e2.reward)}


@pytest.mark.parametrize("name", STRATEGIES)
def test_history_replay(objective: Objective, name: str) -> None:
    first = run_search(objective, name, 6, seed=5)
    again = run_search(objective, name, 6, seed=5, history=first.evaluations)
    assert again.replayed == 6
    assert _plans(again) == _plans(first)
    assert [e.reward for e in again.evaluations] == [e.reward for e in first.evaluations]


def test_optuna_info_logging_silenced_only(objective: Objective) -> None:
    root = logging.getLogger().level
    optuna.logging.set_verbosity(optuna.logging.INFO)
    run_search(objective, "optuna-tpe", 1)
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a stricter level chosen by the user is kept
    run_search(objective, "optuna-tpe", 1)
    assert optuna.logging.get_verbosity() == optuna.logging.ERROR
    assert logging.getLogger().level == root
    optuna.logging.set_verbosity(optuna.logging.WARNING)
