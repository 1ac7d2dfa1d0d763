"""The latency-guided ``knapsack`` strategy and the per-group sensitivity table it plans from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents import Budget, make_strategy, run_search
from autoprune.errors import InvalidConfigError
from autoprune.objective import Objective
from autoprune.sensitivity import Probe, SensitivityTable, profile_groups


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
    info = result.info
    assert len(info["sensitivity"]["probes"]) == 4 * len(objective.group_names)  # 0.125, 0.25, 0.5, 0.75
    assert set(info["calibration"]) == {"latency_scale", "quality_scale"}
    # the sweep covers the trade-off: from light cuts to the fastest plans the table allows
    ratios = sorted(e.latency_ratio for e in result.evaluations)
    table = SensitivityTable(
        **{**info["sensitivity"], "probes": tuple(Probe(**p) for p in info["sensitivity"]["probes"])}
    )
    fastest = table.fastest(latency_scale=info["calibration"]["latency_scale"])
    assert ratios[0] < (1 + fastest) / 2 and ratios[-1] > 0.9  # past the middle of what the table can reach

    from agents.report import write_search_outputs

    paths = write_search_outputs(result, tmp_path, example_inputs=objective.example_inputs, export_formats=("onnx",))
    assert json.loads(paths["sensitivity"].read_text())["sensitivity"]["groups"] == list(objective.group_names)
    assert paths["sensitivity_plot"].read_bytes().startswith(b"\x89PNG")
    report = paths["report"].read_text()
    assert "## Latency table" in report and "Predicted vs measured latency" in report


def test_a_time_budget_covers_the_probes(objective: Objective) -> None:
    result = run_search(objective, "knapsack", Budget(seconds=1e-6))
    assert result.evaluations == [] and result.stop_reason == "time"


def test_bad_knapsack_options_are_refused() -> None:
    with pytest.raises(InvalidConfigError, match="probe_ratios"):
        make_strategy("knapsack", probe_ratios=[1.5])
    with pytest.raises(InvalidConfigError, match="min_target"):
        make_strategy("knapsack", min_target=0)
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
