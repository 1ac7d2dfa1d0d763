"""The strategy protocol and the shared loop: budget, stop, progress, replay, results, registry, job specs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from agents import STRATEGIES, Budget, check_strategy, make_strategy, run_search
from agents.base import AskTellStrategy, SearchSpace
from autoprune.errors import InvalidConfigError

if TYPE_CHECKING:
    from autoprune.objective import Objective


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def objective() -> Objective:
    from autoprune.latency import DeterministicMeter
    from autoprune.objective import Objective
    from autoprune.workloads import load_workload

    wl = load_workload("resnet20-digits")
    return Objective(wl.model, wl.example_inputs, wl.dataset.subset(128, 96), latency=DeterministicMeter())


# -- budget, space, registry ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"evaluations": 0},
        {"evaluations": -3},
        {"evaluations": 2.5},
        {"evaluations": True},
        {"seconds": 0},
        {"seconds": float("nan")},
    ],
)
def test_bad_budgets_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError):
        Budget(**kwargs)


def test_space_clips_and_fills_every_group() -> None:
    space = SearchSpace(("a", "b", "c"), max_ratio=0.5)
    assert space.clip({"a": 0.9, "b": -1.0}) == {"a": 0.5, "b": 0.0, "c": 0.0}
    assert space.clip({"a": 0.1234567891})["a"] == 0.123457
    with pytest.raises(InvalidConfigError):
        SearchSpace(())
    with pytest.raises(InvalidConfigError):
        SearchSpace(("a",), max_ratio=1.0)


def test_registry_names_every_strategy_the_issue_asks_for() -> None:
    assert {"sb3-ddpg", "sb3-td3", "sb3-sac", "sb3-ppo", "optuna-tpe", "optuna-nsga2", "random", "uniform"} <= set(
        STRATEGIES
    )
    with pytest.raises(InvalidConfigError, match=r"unknown strategy 'nope'.*random"):
        check_strategy("nope")
    with pytest.raises(InvalidConfigError, match="no option"):
        make_strategy("random", temperature=3)


def test_validating_a_strategy_name_imports_no_torch_optuna_or_sb3() -> None:
    code = (
        "import sys, agents; agents.check_strategy('sb3-ddpg'); agents.check_strategy('optuna-tpe');\n"
        "bad = [m for m in ('torch', 'optuna', 'stable_baselines3') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- the loop ---------------------------------------------------------------------------------------------
def test_uniform_sweeps_one_ratio_per_candidate(objective: Objective) -> None:
    result = run_search(objective, "uniform", Budget(evaluations=4), max_ratio=0.8)
    ratios = [set(e.plan.as_dict().values()) for e in result.evaluations]
    assert ratios == [{0.2}, {0.4}, {0.6}, {0.8}]
    assert [e.index for e in result.evaluations] == [1, 2, 3, 4]
    assert result.stop_reason == "budget"
    assert all(set(e.plan.as_dict()) == set(objective.group_names) for e in result.evaluations)


def test_uniform_skips_ratios_that_round_to_widths_already_asked(objective: Objective) -> None:
    from autoprune.sensitivity import kept_width

    # ResNet-20 (16/32/64 wide, round_to 8): 0.05 rounds every group to its full width (the baseline), 0.3 to
    # the widths of 0.25 and 0.55 to those of 0.5
    result = run_search(objective, "uniform", 10, options={"ratios": [0.05, 0.25, 0.3, 0.5, 0.55, 0.75]})
    assert [next(iter(set(e.plan.as_dict().values()))) for e in result.evaluations] == [0.25, 0.5, 0.75]
    widths = [tuple(kept_width(objective, g, r) for g, r in e.plan.ratios) for e in result.evaluations]
    assert len(set(widths)) == 3 and result.stop_reason == "exhausted"


def test_uniform_with_explicit_ratios_stops_when_exhausted(objective: Objective) -> None:
    result = run_search(objective, "uniform", 10, options={"ratios": [0.25, 0.5]})
    assert len(result.evaluations) == 2
    assert result.stop_reason == "exhausted"


def test_random_is_seeded_and_respects_the_space(objective: Objective) -> None:
    a = run_search(objective, "random", 3, seed=7, max_ratio=0.6)
    b = run_search(objective, "random", 3, seed=7, max_ratio=0.6)
    c = run_search(objective, "random", 3, seed=8, max_ratio=0.6)
    assert [e.plan for e in a.evaluations] == [e.plan for e in b.evaluations]
    assert [e.plan for e in a.evaluations] != [e.plan for e in c.evaluations]
    assert all(0.0 <= r <= 0.6 for e in a.evaluations for r in e.plan.as_dict().values())


def test_progress_callbacks_see_every_evaluation_and_a_stop_event_ends_the_search(objective: Objective) -> None:
    stop = threading.Event()
    seen: list[tuple[int, int | None, int]] = []

    def on_progress(p: Any) -> None:
        seen.append((p.done, p.total, p.front_size))
        assert p.best.reward == max(e.reward for e in [p.evaluation, p.best])
        if p.done == 2:
            stop.set()

    lines: list[str] = []
    result = run_search(objective, "random", 10, stop=stop, callbacks=[on_progress, lambda p: lines.append(repr(p))])
    assert [s[:2] for s in seen] == [(1, 10), (2, 10)]
    # what `callbacks=[print]` shows: one compact line, not the nested Evaluations' reprs
    assert len(lines) == 2 and all("\n" not in line and len(line) < 200 for line in lines), lines
    assert lines[0].startswith("Progress(1/10: accuracy ") and "x, reward " in lines[0] and "| front " in lines[0]
    assert len(result.evaluations) == 2
    assert result.stop_reason == "stopped"


def test_a_search_callback_object_watches_steers_and_numbers_the_search(objective: Objective) -> None:
    from agents import CallbackList, SearchCallback

    class Watch(SearchCallback):
        reason = "enough"

        def __init__(self) -> None:
            self.calls: list[str] = []

        def on_start(self, session: Any) -> None:
            self.calls.append(f"start {session.budget.evaluations}")

        def on_step(self) -> bool:
            self.calls.append("step")
            return True

        def on_evaluation(self, progress: Any) -> bool:
            self.calls.append(f"eval {progress.evaluation.index}")
            return progress.done < 2  # the second evaluation is the last

        def on_end(self, result: Any) -> None:
            self.calls.append(f"end {result.stop_reason} {len(result.evaluations)}")

    class Hundreds(SearchCallback):
        def number(self, local: int) -> int:
            return 100 + local

    watch, plain = Watch(), []
    result = run_search(objective, "random", 10, callback=[watch, Hundreds()], callbacks=[plain.append])
    assert [e.index for e in result.evaluations] == [101, 102]
    assert watch.calls[0] == "start 10" and watch.calls[-1] == "end enough 2"
    assert [c for c in watch.calls if c.startswith("eval")] == ["eval 101", "eval 102"]
    assert len(plain) == 2  # plain progress functions still see every evaluation
    assert result.stop_reason == "enough"

    class Refuse(SearchCallback):
        reason = "cancelled"

        def on_step(self) -> bool:
            return False

    nothing = run_search(objective, "random", 10, callback=CallbackList([Watch(), Refuse()]))
    assert (nothing.evaluations, nothing.stop_reason) == ([], "cancelled")


def test_ctrl_c_keeps_what_was_evaluated(objective: Objective) -> None:
    def interrupt_after_three(p: Any) -> None:
        if p.done == 3:
            raise KeyboardInterrupt

    result = run_search(objective, "random", 10, callbacks=[interrupt_after_three])
    assert result.stop_reason == "interrupted"
    assert len(result.evaluations) == 3


def test_time_budget_stops_between_evaluations(objective: Objective) -> None:
    result = run_search(objective, "random", Budget(seconds=1e-9))
    # the deadline passes before the first evaluation starts: no candidate, but a clean result
    assert result.stop_reason == "time"
    assert result.evaluations == []
    assert result.best() is result.baseline


def test_history_replay_redoes_nothing(objective: Objective, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_search(objective, "random", 4, seed=3)
    calls: list[Any] = []
    original = type(objective).evaluate

    def counting(self: Any, plan: Any, **kw: Any) -> Any:
        calls.append(plan)
        return original(self, plan, **kw)

    monkeypatch.setattr(type(objective), "evaluate", counting)
    # resume with only the first 3 recorded: those are replayed, the 4th and 5th are evaluated
    again = run_search(objective, "random", 5, seed=3, history=first.evaluations[:3])
    assert again.replayed == 3
    assert len(calls) == 2
    assert [e.plan for e in again.evaluations[:4]] == [e.plan for e in first.evaluations]
    assert again.evaluations[0].quality == first.evaluations[0].quality
    assert [e.index for e in again.evaluations] == [1, 2, 3, 4, 5]


class _Fixed(AskTellStrategy):
    name = "fixed"

    def __init__(self, plans: list[dict[str, float]]) -> None:
        self.plans = list(plans)
        self.told: list[float] = []

    def ask(self) -> dict[str, float] | None:
        return self.plans.pop(0) if self.plans else None

    def tell(self, ratios: dict[str, float], evaluation: Any) -> None:
        self.told.append(evaluation.reward)


def test_a_custom_ask_tell_strategy_runs_in_the_shared_loop(objective: Objective) -> None:
    g = objective.group_names
    strategy = _Fixed([{g[0]: 0.5}, {g[1]: 0.5}])
    result = run_search(objective, strategy, 5)
    assert len(result.evaluations) == 2 and len(strategy.told) == 2
    assert result.evaluations[0].plan.as_dict()[g[0]] == 0.5
    assert result.evaluations[0].plan.as_dict()[g[1]] == 0.0


# -- results ----------------------------------------------------------------------------------------------
def test_best_selections_and_front(objective: Objective) -> None:
    result = run_search(objective, "uniform", 4)
    front = result.front()
    assert result.baseline in front
    assert result.best("reward").reward == max(e.reward for e in result.all_evaluations)
    fast = result.best("latency", max_quality_drop=1.0)
    assert fast.latency_ratio == min(e.latency_ratio for e in result.all_evaluations)
    assert result.best("latency", max_quality_drop=0.0).quality >= result.baseline.quality
    q = result.best("quality", max_latency_ratio=0.9)
    assert q.latency_ratio <= 0.9 or q is result.baseline
    with pytest.raises(InvalidConfigError):
        result.best("speed")
    summary = result.summary()
    assert summary["evaluations"] == 4 and summary["front_size"] == len(front)


def test_finetune_front_adds_labelled_points_that_materialize(objective: Objective) -> None:
    import torch

    from autoprune.recovery import RecoveryConfig

    result = run_search(objective, "uniform", 3, max_ratio=0.6)
    tuned = result.finetune_front(1, RecoveryConfig(finetune_steps=3, distill=True))
    assert len(tuned) == 1 and tuned[0].stage == "finetuned"
    assert tuned[0].extra["recovery"]["finetune_steps"] == 3
    assert tuned[0] in result.all_evaluations
    searched = next(e for e in result.evaluations if e.index == tuned[0].index)
    assert searched.plan == tuned[0].plan
    # rebuilding the fine-tuned point reproduces its weights (seeded fine-tune)
    a, b = result.materialize(tuned[0]), result.materialize(tuned[0])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(InvalidConfigError):
        result.finetune_front(-1, RecoveryConfig())


def test_a_finetuned_point_is_trained_once_and_reports_its_progress(
    objective: Objective, monkeypatch: pytest.MonkeyPatch
) -> None:
    import autoprune.objective as objective_module
    from autoprune.recovery import RecoveryConfig, recover

    result = run_search(objective, "uniform", 3, max_ratio=0.6)
    trained: list[int] = []

    def counting_recover(model: Any, dataset: Any, config: RecoveryConfig, **kwargs: Any) -> Any:
        trained.append(config.finetune_steps)
        return recover(model, dataset, config, **kwargs)

    monkeypatch.setattr(objective_module, "recover", counting_recover)
    reports: list[tuple[int, int, int, str]] = []
    recipe = RecoveryConfig(finetune_steps=4, eval_every=2, distill=True)
    tuned = result.finetune_front(
        1, recipe, on_finetune=lambda point, r: reports.append((point.index, r.steps, r.total_steps, r.stopped))
    )
    assert trained == [4]
    assert [r[1:] for r in reports] == [(2, 4, "running"), (4, 4, "running"), (4, 4, "done")]
    assert {r[0] for r in reports} == {tuned[0].index}
    result.materialize(tuned[0])  # the fine-tuned model is handed over, not trained again
    assert trained == [4]
    result.materialize(tuned[0])  # handed over once; later calls rebuild it
    assert trained == [4, 4]


# -- job specs and the facade -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"model": "resnet20", "strategy": "nope"}, "unknown strategy"),
        ({"model": "resnet20", "budget": 0}, "budget must be an integer >= 1"),
        ({"model": "resnet20", "colour": "red"}, "unknown job spec key"),
        ({"model": "resnet20", "metric": "bleu"}, "unknown quality metric"),
        ({"model": "resnet20", "objective": "speed"}, "unknown reward form"),
        ({"model": "resnet20", "strategy": "random", "strategy_options": {"x": 1}}, "no option"),
        ({"model": "resnet20", "budget": None}, "budget"),
        ({"model": "resnet20", "select": "fastest"}, "unknown selection"),
        ({"model": "resnet20", "method": "unstructured"}, "unstructured"),
        ({"data": "digits"}, "needs 'model'"),
    ],
)
def test_job_spec_errors_come_before_any_work(data: dict[str, Any], needle: str) -> None:
    from autoprune.job import JobSpec

    with pytest.raises(InvalidConfigError, match=needle):
        JobSpec.from_mapping(data)


def test_job_spec_settings_are_the_flags_and_the_api_fields() -> None:
    from typer.testing import CliRunner

    from autoprune.cli import app
    from autoprune.job import JobSpec

    knobs = {k.name: k for k in JobSpec.knobs()}
    assert {"finetune_epochs", "optimizer", "lr_schedule", "warmup_steps", "early_stopping"} <= set(knobs)
    assert not {"model", "data", "kwargs", "weights"} & set(knobs)
    spec = JobSpec.from_mapping(
        {"model": "resnet20", "finetune_epochs": 3, "optimizer": "sgd", "lr_schedule": "cosine", "early_stopping": 2}
    )
    recipe = spec.finetune_recovery()
    assert (recipe.finetune_epochs, recipe.finetune_steps, recipe.optimizer, recipe.lr_schedule) == (
        3,
        0,
        "sgd",
        "cosine",
    )
    assert recipe.early_stopping_patience == 2 and recipe.distill
    assert (recipe.prune_steps, recipe.prune_schedule) == (1, "linear")
    iterative = JobSpec.from_mapping(
        {"model": "resnet20", "finetune_top": 2, "finetune_steps": 90, "prune_steps": 3, "prune_schedule": "cubic"}
    ).finetune_recovery()
    assert (iterative.prune_steps, iterative.prune_schedule, iterative.per_increment().finetune_steps) == (
        3,
        "cubic",
        30,
    )
    for bad, needle in [
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"max_ratio": 0.99}, "max_ratio must be in"),
        ({"export_formats": ["tflite"]}, "export_formats"),
        ({"finetune_lr": 0}, "finetune_lr"),
        ({"budget": 2_000_000}, "budget must be an integer >= 1 and <= 1000000"),
        ({"finetune_top": 1, "prune_steps": 0}, "prune_steps must be an integer >= 1"),
        ({"finetune_top": 1, "prune_steps": 2, "prune_schedule": "exp"}, "unknown prune schedule 'exp'"),
        ({"prune_steps": 3}, "set finetune_top"),
    ]:
        with pytest.raises(InvalidConfigError, match=needle):
            JobSpec.from_mapping({"model": "resnet20", **bad})
    text = CliRunner().invoke(app, ["search", "--help"], env={"COLUMNS": "300"}).output
    for knob in knobs.values():
        if knob.flag != "":
            assert knob.cli_flag in text, knob.name


def test_job_spec_round_trips_through_json_and_yaml(tmp_path: Any) -> None:
    from autoprune.job import JobSpec

    spec = JobSpec.from_mapping({"model": "cnn1d", "data": "mnist1d", "strategy": "optuna-tpe", "budget": 5})
    (tmp_path / "job.json").write_text(json.dumps(spec.to_json()))
    assert JobSpec.from_file(tmp_path / "job.json") == spec
    (tmp_path / "job.yaml").write_text("model: cnn1d\ndata: mnist1d\nstrategy: optuna-tpe\nbudget: 5\n")
    assert JobSpec.from_file(tmp_path / "job.yaml") == spec
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(InvalidConfigError, match="not valid"):
        JobSpec.from_file(tmp_path / "bad.yaml")


def test_objective_the_data_cannot_support_is_refused_before_searching(tmp_path: Any) -> None:
    import numpy as np

    from autoprune.errors import DatasetError
    from autoprune.job import JobSpec, run_job

    # inputs without labels: accuracy cannot be computed; the label-free metrics can
    x = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "d.npz", x=x)
    spec = JobSpec.from_mapping({"model": "resnet20", "data": str(tmp_path / "d.npz"), "budget": 2})
    with pytest.raises(DatasetError, match=r"accuracy needs labels.*agreement"):
        run_job(spec)


def test_search_facade_loads_the_shipped_weights_like_the_cli() -> None:
    import autoprune
    from autoprune.latency import DeterministicMeter

    with pytest.warns(UserWarning, match="shipped resnet20-digits reference weights"):
        result = autoprune.search("resnet20", "digits", strategy="uniform", budget=1, latency=DeterministicMeter())
    assert result.baseline.quality > 0.95  # trained, not the 0.12 of a random initialisation
    with pytest.warns(UserWarning, match="randomly initialised"):
        autoprune.search("mlp", "digits", strategy="uniform", budget=1, latency=DeterministicMeter())


def test_search_facade_with_a_module_and_an_evaluate_function() -> None:
    import torch
    from torch import nn

    import autoprune
    from autoprune.latency import DeterministicMeter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(32, 16)
    reference = model(x).detach()

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(m(x), reference).mean())

    result = autoprune.search(
        model,
        evaluate=fidelity,
        example_inputs=torch.randn(1, 16),
        strategy="random",
        budget=3,
        latency=DeterministicMeter(),
        round_to=1,
    )
    assert len(result.evaluations) == 3
    assert result.baseline.quality == pytest.approx(1.0)
    point = result.front()[-1]
    pruned = result.materialize(point)
    assert pruned(torch.randn(2, 16)).shape == (2, 4)
    assert sum(p.numel() for p in pruned.parameters()) == point.params


def test_finetuned_points_are_timed_again_not_read_from_the_shape_cache(objective: Objective) -> None:
    from autoprune.latency import CachedMeter, DeterministicMeter
    from autoprune.objective import Objective as Obj
    from autoprune.recovery import RecoveryConfig

    cached = Obj(
        objective.base,
        objective.example_inputs,
        objective.dataset,
        latency=CachedMeter(DeterministicMeter()),
    )
    result = run_search(cached, "uniform", 2, max_ratio=0.5)
    again = cached.evaluate(result.evaluations[-1].plan)
    assert again.latency.cached  # same shape: the search's figure
    tuned = result.finetune_front(1, RecoveryConfig(finetune_steps=2))
    assert not tuned[0].latency.cached  # the final stage measures again


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_declared_options_match_the_constructors(name: str) -> None:
    from agents import strategy_options

    assert set(STRATEGIES[name].options) == set(strategy_options(name))
