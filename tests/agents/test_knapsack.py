"""The latency-guided ``knapsack`` strategy and the per-group sensitivity table it plans from."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agents import Budget, make_strategy, run_search
from autoprune.errors import InvalidConfigError
from autoprune.objective import Objective
from autoprune.sensitivity import (
    Probe,
    SensitivityTable,
    WidthTiming,
    isotonic,
    kept_width,
    profile_groups,
    width_ratio,
)

if TYPE_CHECKING:
    from autoprune.objective import Evaluation
    from autoprune.plan import Plan


@pytest.fixture(scope="module")
def objective() -> Objective:
    from autoprune.latency import DeterministicMeter
    from autoprune.workloads import load_workload

    wl = load_workload("cnn1d-mnist1d")
    return Objective(wl.model, wl.example_inputs, wl.dataset.subset(256, 128), latency=DeterministicMeter())


def _table(*probes: Probe, widths: tuple[int, ...] = (16, 16)) -> SensitivityTable:
    return SensitivityTable(("a", "b"), widths, probes, 0.0, "torch", 1, 1)


def test_the_knapsack_spends_the_latency_where_quality_costs_least() -> None:
    table = _table(
        Probe("a", 0.5, 8, 0.7, 0.10, 0),  # saves 30% for a 10% drop
        Probe("b", 0.5, 8, 0.7, 0.01, 0),  # saves 30% for a 1% drop
        Probe("b", 0.75, 4, 0.6, 0.20, 0),
    )
    assert table.solve(0.75) == {"a": 0.0, "b": 0.5}  # the cheap cut alone is enough
    assert table.solve(0.45) == {"a": 0.5, "b": 0.5}  # 0.4 needed: both 30% cuts (drop 0.11), not a+b75 (0.30)
    assert table.solve(0.05) is None  # nothing in the table is that fast
    assert table.solve(0.99) in ({"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.5})
    assert table.predict({"a": 0.5, "b": 0.6}) == pytest.approx((0.4, 0.11))  # 0.6 takes the level below it
    assert table.predict({"a": 0.5, "b": 0.5}, latency_scale=0.5, quality_scale=2.0) == pytest.approx((0.7, 0.22))
    assert table.fastest() == pytest.approx(0.3)  # a at 0.5 (saves 0.3) and b at 0.75 (saves 0.4)
    # a calibrated table plans more cautiously when cuts saved less than predicted
    assert table.solve(0.75, latency_scale=0.5) == {"a": 0.5, "b": 0.5}


def test_the_dual_knapsack_gives_the_fastest_plan_within_a_quality_budget() -> None:
    table = _table(
        Probe("a", 0.5, 8, 0.7, 0.10, 0),
        Probe("b", 0.5, 8, 0.8, 0.00, 0),  # saves 20% for free
        Probe("b", 0.75, 4, 0.6, 0.02, 0),  # saves 40% for a 2% drop
    )
    assert table.solve_drop(0.0) == {"a": 0.0, "b": 0.5}
    assert table.solve_drop(0.01) == {"a": 0.0, "b": 0.5}
    assert table.solve_drop(0.05) == {"a": 0.0, "b": 0.75}
    assert table.solve_drop(0.05, quality_scale=3.0) == {"a": 0.0, "b": 0.5}  # calibrated: b75 costs 6%
    assert table.solve_drop(0.2) == {"a": 0.5, "b": 0.75}
    with pytest.raises(InvalidConfigError, match="max_drop"):
        table.solve_drop(-0.1)


def test_calibration_is_the_clipped_median_of_measured_over_predicted() -> None:
    assert SensitivityTable.calibration([]) == 1.0
    assert SensitivityTable.calibration([(0.2, 0.1), (0.4, 0.2), (0.1, 0.3)]) == pytest.approx(0.5)
    assert SensitivityTable.calibration([(0.1, 5.0)]) == 4.0
    assert SensitivityTable.calibration([(0.0, 0.3)]) == 1.0  # no prediction to compare with


def test_profile_measures_each_group_alone_once_per_width(objective: Objective) -> None:
    seen: list[Probe] = []
    table = profile_groups(objective, (0.25, 0.5), on_probe=seen.append)
    assert table.groups == objective.group_names and len(table.probes) == 2 * len(table.groups) == len(seen)
    for group, units in zip(table.groups, table.widths, strict=True):
        levels = table.levels(group)
        assert levels[0].ratio == 0 and levels[0].width == units
        assert all(p.width is not None and p.width < units for p in levels[1:])
        assert all(0 < p.latency_ratio <= 1.0 + 1e-9 and 0 <= p.quality_drop <= 1 for p in levels[1:])
    json.dumps(table.to_json())
    assert SensitivityTable(**{**table.to_json(), "probes": table.probes}).levels(table.groups[0]) == table.levels(
        table.groups[0]
    )
    with pytest.raises(InvalidConfigError, match="probe ratios"):
        profile_groups(objective, (0.0, 1.2))
    with pytest.raises(InvalidConfigError, match="unknown group"):
        profile_groups(objective, (0.5,), groups=("no.such.group",))


def test_knapsack_search_plans_real_candidates_and_records_its_predictions(
    objective: Objective, tmp_path: Path
) -> None:
    result = run_search(objective, "knapsack", 5, max_ratio=0.75)
    assert result.strategy == "knapsack" and result.stop_reason == "budget" and len(result.evaluations) == 5
    assert [e.index for e in result.evaluations] == [1, 2, 3, 4, 5]  # probes are not candidates
    plans = {e.plan for e in result.evaluations}
    assert len(plans) == 5  # no plan is asked twice
    for e in result.evaluations:
        extra = dict(e.plan.extra)
        assert e.stage == "search" and 0 < extra["predicted_latency_ratio"] < 1.0
        assert extra["predicted_quality_drop"] >= 0
    errors = result.latency_prediction_errors()  # the benchmark's and the report's prediction error
    assert errors == sorted(
        abs(dict(e.plan.extra)["predicted_latency_ratio"] - e.latency_ratio) / e.latency_ratio
        for e in result.evaluations
    )
    assert len(errors) == 5 and run_search(objective, "uniform", 2).latency_prediction_errors() == []
    info = result.info
    assert len(info["sensitivity"]["probes"]) == 4 * len(objective.group_names)  # 0.125, 0.25, 0.5, 0.75
    assert set(info["calibration"]) == {"latency_scale", "quality_scale"}
    # the sweep covers the trade-off: from light cuts to the fastest plans the table allows
    ratios = sorted(e.latency_ratio for e in result.evaluations)
    table = SensitivityTable.from_json(info["sensitivity"])
    assert not table.timings and table.round_to is None  # the default: no staircase, the objective's round_to
    assert all(e.plan.round_to == objective.round_to for e in result.evaluations)
    fastest = table.fastest(latency_scale=info["calibration"]["latency_scale"])
    assert ratios[0] < (1 + fastest) / 2 and ratios[-1] > 0.9  # past the middle of what the table can reach

    from agents.report import write_search_outputs

    paths = write_search_outputs(result, tmp_path, example_inputs=objective.example_inputs, export_formats=("onnx",))
    assert json.loads(paths["sensitivity"].read_text())["sensitivity"]["groups"] == list(objective.group_names)
    assert paths["sensitivity_plot"].read_bytes().startswith(b"\x89PNG")
    report = paths["report"].read_text()
    assert "## Latency table" in report and "Predicted vs measured latency" in report


def test_the_knapsack_asks_the_same_plans_whatever_the_seed(objective: Objective) -> None:
    """Deterministic, as ``autoprune strategies`` says: with the same measurements (a deterministic meter) two
    seeds ask the same plans in the same order; a seeded random search does not."""
    plans = [[e.plan for e in run_search(objective, "knapsack", 3, seed=s).evaluations] for s in (0, 7)]
    assert plans[0] == plans[1] and len(set(plans[0])) == 3
    randoms = [[e.plan for e in run_search(objective, "random", 3, seed=s).evaluations] for s in (0, 7)]
    assert randoms[0] != randoms[1]


def test_staircase_plans_keep_admissible_widths_exactly(objective: Objective) -> None:
    strategy = make_strategy("knapsack", staircase_step=None)  # None: half the objective's round_to (8 -> 4)
    result = run_search(objective, strategy, 4, max_ratio=0.75)
    table = SensitivityTable.from_json(result.info["sensitivity"])
    assert table.timings and table.round_to == 1
    assert {t.width for t in table.timings if t.group == table.groups[0]} == set(
        range(table.widths[0] - 4, table.widths[0] // 4 - 1, -4)
    )
    for e in result.evaluations:  # every group keeps an admissible width of its staircase, exactly
        assert e.plan.round_to == 1
        for group in table.groups:
            assert kept_width(objective, group, e.plan.ratio(group), 1) in table.admissible(group), group


def test_a_time_budget_covers_the_probes(objective: Objective) -> None:
    result = run_search(objective, "knapsack", Budget(seconds=1e-6))
    assert result.evaluations == [] and result.stop_reason == "time"


def test_bad_knapsack_options_are_refused() -> None:
    with pytest.raises(InvalidConfigError, match="probe_ratios"):
        make_strategy("knapsack", probe_ratios=[1.5])
    with pytest.raises(InvalidConfigError, match="min_target"):
        make_strategy("knapsack", min_target=0)
    with pytest.raises(InvalidConfigError, match="focus_drop"):
        make_strategy("knapsack", focus_drop=1.5)
    with pytest.raises(InvalidConfigError, match="no option"):
        make_strategy("knapsack", levels=3)


@pytest.mark.parametrize("name", ["optuna-tpe", "optuna-nsga2"])
def test_optuna_starts_from_the_knapsack_plans(objective: Objective, name: str) -> None:
    result = run_search(objective, make_strategy(name, warm_start=3), 5, max_ratio=0.75, seed=1)
    warm = result.info["warm_start"]
    assert len(warm) == 3 and len({json.dumps(w, sort_keys=True) for w in warm}) == 3
    asked = [e.plan.as_dict() for e in result.evaluations]
    assert asked[:3] == warm  # the study's first trials are the enqueued plans, evaluated for real
    assert len(result.evaluations) == 5 and result.info["sensitivity"]["probes"]
    cold = run_search(objective, name, 5, max_ratio=0.75, seed=1)
    assert cold.info == {} and [e.plan.as_dict() for e in cold.evaluations][:3] != warm
    with pytest.raises(InvalidConfigError, match="warm_start"):
        make_strategy(name, warm_start=-1)


def test_a_probe_that_rounds_to_the_full_width_or_a_probed_width_is_not_evaluated(objective: Objective) -> None:
    asked: list[object] = []

    def evaluate(plan: object) -> Evaluation:
        asked.append(plan)
        return objective.evaluate(plan, stage="probe", test=False)  # type: ignore[arg-type]

    ratios = (0.125, 0.5, 0.55)
    table = profile_groups(objective, ratios, evaluate=evaluate)
    assert len(table.probes) == len(ratios) * len(table.groups)
    measured: set[tuple[str, int]] = set()
    for p, units in ((p, table.widths[table.groups.index(p.group)]) for p in table.probes):
        width = kept_width(objective, p.group, p.ratio)
        assert p.width == width
        if width == units:
            assert p.skipped and (p.latency_ratio, p.quality_drop) == (1.0, 0.0)
        else:
            assert not p.skipped
            measured.add((p.group, width))
    assert any(p.skipped for p in table.probes)  # the 32-wide group keeps 28 -> rounds to 32 at 0.125
    assert len(asked) == len(measured) < len(table.probes)  # one evaluation per cut width, none for the uncut
    for group in table.groups:  # a choice per width: the skipped level and repeated widths are not choices
        widths = [p.width for p in table.levels(group)]
        assert len(widths) == len(set(widths)) and not any(p.skipped for p in table.levels(group))


def test_a_table_round_trips_through_json_and_bad_records_are_refused() -> None:
    table = _table(
        Probe("a", 0.125, 16, 1.0, 0.0, 10, skipped=True),
        Probe("a", 0.5, 8, 0.7, 0.1, 5),
        Probe("b", 0.5, None, 1.0, 1.0, 0, failed="forward failed"),
    )
    data = json.loads(json.dumps(table.to_json()))
    assert SensitivityTable.from_json(data) == table
    assert table.levels("a") == [table.levels("a")[0], table.probes[1]]  # skipped: the uncut level already
    old = {**data, "probes": [{k: v for k, v in p.items() if k != "skipped"} for p in data["probes"]]}
    assert not any(p.skipped for p in SensitivityTable.from_json(old).probes)  # written before the field existed
    with pytest.raises(InvalidConfigError, match="not a sensitivity table"):
        SensitivityTable.from_json({"groups": ["a"]})
    with pytest.raises(InvalidConfigError, match="not a sensitivity table"):
        SensitivityTable.from_json({**data, "probes": [{**data["probes"][0], "group": "zzz"}]})
    with pytest.raises(InvalidConfigError, match="not a probe"):
        SensitivityTable.from_json({**data, "probes": [{"group": "a"}]})


def test_restored_probes_resume_the_search_exactly_without_probing(objective: Objective) -> None:
    from agents.base import SearchSession, SearchSpace
    from agents.knapsack import KnapsackSearch, knapsack_plans, probe_table

    first_strategy = make_strategy("knapsack", probe_ratios=[0.25, 0.5], staircase_step=4)
    assert isinstance(first_strategy, KnapsackSearch) and first_strategy.probe_record() is None
    first = run_search(objective, first_strategy, 4, max_ratio=0.75)
    record = first_strategy.probe_record()
    assert record is not None and record == first.info["sensitivity"]

    resumed = make_strategy("knapsack", probe_ratios=[0.25, 0.5], staircase_step=4)
    resumed.restore_probes(json.loads(json.dumps(record)))  # type: ignore[attr-defined]
    again = run_search(objective, resumed, 4, max_ratio=0.75, history=first.evaluations[:2])
    assert again.replayed == 2
    assert again.info["sensitivity"] == record  # the stored table (its probes' wall time too): nothing re-probed
    assert [e.plan for e in again.evaluations] == [e.plan for e in first.evaluations]

    # a stored table that does not fit the run (other probe ratios) is measured again
    other = make_strategy("knapsack", probe_ratios=[0.5])
    other.restore_probes(record)  # type: ignore[attr-defined]
    reprobed = run_search(objective, other, 1, max_ratio=0.75)
    assert {p["ratio"] for p in reprobed.info["sensitivity"]["probes"]} == {0.5}

    # the warm-start helper and the public probe function take a table too, and use it as it is
    session = SearchSession(objective, SearchSpace.from_objective(objective, 0.75), Budget(evaluations=3))
    table = SensitivityTable.from_json(record)
    assert probe_table(session, (0.25, 0.5), table=table, staircase_step=4) is table
    flat = probe_table(session, (0.25, 0.5), staircase_step=0)  # the warm starts': ratios, the objective's rounding
    given, plans = knapsack_plans(session, 3, (0.25, 0.5), table=flat)
    assert given is flat and 1 <= len(plans) <= 3 and session.evaluations == []


def test_the_staircase_fit_pools_noise_and_admits_the_widest_width_of_each_step() -> None:
    fit = isotonic([(4, 0.5), (6, 0.6), (8, 0.55), (10, 0.8), (12, 1.0)])
    assert fit == pytest.approx({4: 0.5, 6: 0.575, 8: 0.575, 10: 0.8, 12: 1.0})  # 6 and 8 pooled: never faster wider
    assert all(fit[a] <= fit[b] for a, b in zip(sorted(fit), sorted(fit)[1:], strict=False))
    timings = [(14, 1.02), (12, 0.995), (10, 0.8), (8, 0.81), (6, 0.5), (4, 0.52), (2, 0.45)]
    table = SensitivityTable(
        ("a", "b"),
        (16, 16),
        (),
        0.0,
        "torch",
        1,
        1,
        timings=tuple(WidthTiming("a", w, y) for w, y in timings),
    )
    # 14 and 12 are no faster than the full width (0.995 is within the 1% tolerance); 10/8 and 6/4 are plateaus;
    # 2 is a step of its own (0.45 < 0.51 - 0.01)
    assert table.admissible("a") == [16, 10, 6, 2]
    assert table.staircase("a")[16] == 1.0 and max(table.staircase("a").values()) == 1.0  # the 1.02 is capped
    assert table.admissible("b") == [] and table.staircase("b") == {}  # not timed: the objective's rounding
    assert table.round_to == 1 and dataclasses.replace(table, timings=()).round_to is None
    assert width_ratio(16, 10) == 0.375 and width_ratio(3, 2) == pytest.approx(1 / 3, abs=1e-6)
    assert kept_width_exact(3, width_ratio(3, 2)) == 2 and kept_width_exact(24, width_ratio(24, 23)) == 23
    with pytest.raises(InvalidConfigError, match="width"):
        width_ratio(16, 0)


def kept_width_exact(units: int, ratio: float) -> int:
    from autoprune.pruning.structured import kept_units

    return kept_units(units, round(ratio, 6), 1)


def test_probes_sit_on_the_admissible_widths_of_a_measured_staircase(objective: Objective) -> None:
    """A fake latency meter with a step every 12 units (the point of the test): the probes keep the widest width of
    the plateau their ratio falls on, with exact-width plans, and the table's savings are the staircase's."""
    timed: list[tuple[str, int]] = []
    asked: list[Plan] = []

    def measure(plan: Plan) -> float:
        assert plan.round_to == 1 and len(plan.ratios) == 1
        (group, ratio), units = plan.ratios[0], objective.structure.group(plan.ratios[0][0]).units
        width = kept_width_exact(units, ratio)
        timed.append((group, width))
        return math.ceil(width / 12) * 12 / units

    def evaluate(plan: Plan) -> Evaluation:
        asked.append(plan)
        return objective.evaluate(plan, stage="probe", test=False)

    table = profile_groups(
        objective, (0.125, 0.5, 0.75), staircase_step=4, max_ratio=0.8, measure=measure, evaluate=evaluate
    )
    assert {t.width for t in table.timings if t.group == table.groups[0]} == set(range(table.widths[0] - 4, 0, -4)) & {
        w for w in range(1, table.widths[0]) if w >= table.widths[0] - math.floor(0.8 * table.widths[0])
    }
    assert len(timed) == len(table.timings) == len(set(timed))
    for group, units in zip(table.groups, table.widths, strict=True):
        admissible = table.admissible(group)
        assert admissible[0] == units
        assert all(w % 12 == 0 or w == units for w in admissible)  # where the fake latency steps
        for p in table.levels(group)[1:]:
            assert p.width in admissible and table.saving(p) == pytest.approx(1 - math.ceil(p.width / 12) * 12 / units)
    assert all(p.round_to == 1 for p in asked)
    units = table.widths[0]
    if units == 32:  # the first group: ratio 0.5 asks for 16 -> 24 (as fast), 0.75 asks for 8 -> 12
        assert [p.width for p in table.probes if p.group == table.groups[0]] == [32, 24, 12]
    restored = SensitivityTable.from_json(json.loads(json.dumps(table.to_json())))
    assert restored == table and restored.admissible(table.groups[0]) == table.admissible(table.groups[0])
    with pytest.raises(InvalidConfigError, match="staircase_step"):
        profile_groups(objective, (0.5,), staircase_step=-1)


def test_a_stored_table_fits_a_resumed_run_only_with_the_same_staircase(objective: Objective) -> None:
    from agents.base import SearchSession, SearchSpace
    from agents.knapsack import probe_table

    session = SearchSession(objective, SearchSpace.from_objective(objective, 0.75), Budget(evaluations=3))
    stepped = probe_table(session, (0.25, 0.5), staircase_step=4)
    assert stepped.timings and probe_table(session, (0.25, 0.5), table=stepped, staircase_step=4) is stepped
    flat = probe_table(session, (0.25, 0.5), table=stepped, staircase_step=0)  # measured again, without timings
    assert flat is not stepped and not flat.timings and flat.round_to is None
    assert probe_table(session, (0.25, 0.5), table=flat, staircase_step=4).timings
    with pytest.raises(InvalidConfigError, match="staircase_step"):
        make_strategy("knapsack", staircase_step=-2)


def test_every_other_knapsack_candidate_is_the_dual_plan_at_the_focus_drop(objective: Objective) -> None:
    from agents.knapsack import KnapsackSearch

    strategy = make_strategy("knapsack", staircase_step=0, focus_drop=0.02)
    result = run_search(objective, strategy, 6, max_ratio=0.75)
    assert isinstance(strategy, KnapsackSearch) and strategy.table is not None
    first = result.evaluations[0].plan
    assert first.as_dict() == strategy.table.solve_drop(0.02)  # uncalibrated: the first plan is the dual's
    assert dict(first.extra)["predicted_quality_drop"] <= 0.02
    sweep_only = run_search(objective, make_strategy("knapsack", staircase_step=0, focus_drop=0), 6, max_ratio=0.75)
    assert [e.plan for e in sweep_only.evaluations] != [e.plan for e in result.evaluations]
    assert sweep_only.evaluations[0].plan.as_dict() != first.as_dict()
