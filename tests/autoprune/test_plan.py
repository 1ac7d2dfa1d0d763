"""Pruning plans: validation, canonical form, JSON round trip and checks against a model's groups."""

from __future__ import annotations

import json
import math

import pytest

from autoprune.errors import AutopruneError, InvalidPlanError
from autoprune.plan import CRITERIA, MAX_RATIO, METHODS, Plan

GROUPS = ("stem.0", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "classifier_in")


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("ratio", [-0.01, -1.0, MAX_RATIO + 1e-6, 1.0, 2.0])
def test_ratio_out_of_range_is_refused(ratio: float) -> None:
    with pytest.raises(InvalidPlanError, match=r"\[0, 0.95\]"):
        Plan({"a": ratio})


@pytest.mark.parametrize("ratio", [math.nan, math.inf, -math.inf])
def test_non_finite_ratio_is_refused(ratio: float) -> None:
    with pytest.raises(InvalidPlanError, match="'a'"):
        Plan({"a": ratio})


@pytest.mark.parametrize("ratio", [0.0, 0.5, MAX_RATIO])
def test_ratio_bounds_are_inclusive(ratio: float) -> None:
    assert Plan({"a": ratio}).ratio("a") == ratio


@pytest.mark.parametrize("entry", [("a",), ("a", 0.1, 0.2), ("a", None), ("a", "half"), 5])
def test_malformed_entries_are_refused(entry: object) -> None:
    with pytest.raises(InvalidPlanError, match="not a \\(group, ratio\\) pair"):
        Plan(ratios=(entry,))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", 3, None])
def test_group_names_must_be_non_empty_strings(name: object) -> None:
    with pytest.raises(InvalidPlanError, match="non-empty strings"):
        Plan(ratios=((name, 0.1),))  # type: ignore[arg-type]


def test_duplicate_group_is_refused() -> None:
    with pytest.raises(InvalidPlanError, match="twice"):
        Plan(ratios=(("a", 0.1), ("b", 0.2), ("a", 0.1)))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "magnitude"}, "unknown method"),
        ({"method": "Structured"}, "unknown method"),
        ({"criterion": "l3"}, "unknown criterion"),
        ({"criterion": "L1"}, "unknown criterion"),
        ({"round_to": 0}, "round_to"),
        ({"round_to": -8}, "round_to"),
        ({"round_to": 8.0}, "round_to"),
        ({"round_to": "8"}, "round_to"),
        ({"seed": "0"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": None}, "seed"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidPlanError, match=message):
        Plan({"a": 0.1}, **settings)  # type: ignore[arg-type]


def test_every_documented_method_and_criterion_is_accepted() -> None:
    for method in METHODS:
        for criterion in CRITERIA:
            plan = Plan({"a": 0.3}, method=method, criterion=criterion, round_to=4, seed=7)  # type: ignore[arg-type]
            assert (plan.method, plan.criterion, plan.round_to, plan.seed) == (method, criterion, 4, 7)


def test_plan_errors_are_autoprune_errors() -> None:
    with pytest.raises(AutopruneError):
        Plan({"a": 3.0})


# ------------------------------------------------------------------------------------------ canonical form


def test_order_does_not_matter_for_equality_or_hash() -> None:
    a = Plan({"b": 0.2, "a": 0.1, "c": 0.3}, round_to=8)
    b = Plan(ratios=(("c", 0.3), ("a", 0.1), ("b", 0.2)), round_to=8)
    assert a == b
    assert hash(a) == hash(b)
    assert a.ratios == (("a", 0.1), ("b", 0.2), ("c", 0.3))
    assert len({a, b}) == 1


def test_settings_take_part_in_equality() -> None:
    base = Plan({"a": 0.1})
    assert base != Plan({"a": 0.1}, criterion="l2")
    assert base != Plan({"a": 0.1}, round_to=8)
    assert base != Plan({"a": 0.1}, seed=1)
    assert base != Plan({"a": 0.1}, method="unstructured")
    assert base != Plan({"a": 0.2})


def test_extra_is_an_annotation_outside_equality() -> None:
    a = Plan({"a": 0.1}, extra={"strategy": "uniform"})  # type: ignore[arg-type]
    b = Plan({"a": 0.1}, extra={"strategy": "sb3-ddpg", "step": 3})  # type: ignore[arg-type]
    assert a == b
    assert hash(a) == hash(b)
    assert dict(b.extra) == {"strategy": "sb3-ddpg", "step": 3}


def test_ratios_are_stored_as_floats_and_read_back() -> None:
    plan = Plan({"a": 0, "b": 0.25})
    assert plan.as_dict() == {"a": 0.0, "b": 0.25}
    assert all(isinstance(r, float) for _, r in plan.ratios)
    assert plan.ratio("b") == 0.25
    assert plan.ratio("not-named") == 0.0


def test_identity() -> None:
    assert Plan().is_identity
    assert Plan({"a": 0.0, "b": 0.0}).is_identity
    assert not Plan({"a": 0.0, "b": 0.01}).is_identity


def test_uniform_and_with_ratios_keep_settings() -> None:
    plan = Plan.uniform(GROUPS, 0.4, criterion="l2", round_to=8, seed=3, extra={"by": "test"})
    assert plan.as_dict() == dict.fromkeys(GROUPS, 0.4)
    assert (plan.criterion, plan.round_to, plan.seed) == ("l2", 8, 3)
    other = plan.with_ratios({"stem.0": 0.1})
    assert other.as_dict() == {"stem.0": 0.1}
    assert (other.method, other.criterion, other.round_to, other.seed) == ("structured", "l2", 8, 3)
    assert dict(other.extra) == {"by": "test"}
    with pytest.raises(InvalidPlanError):
        plan.with_ratios({"stem.0": 0.99})


def test_plan_is_frozen() -> None:
    plan = Plan({"a": 0.1})
    with pytest.raises(AttributeError):
        plan.round_to = 4  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------- JSON


def test_json_round_trip_through_text() -> None:
    plan = Plan(
        {"layer1.0.conv1": 0.25, "stem.0": 0.5},
        method="structured",
        criterion="random",
        round_to=8,
        seed=11,
        extra={"strategy": "optuna-nsga2", "trial": 4},  # type: ignore[arg-type]
    )
    data = plan.to_json()
    assert data == {
        "ratios": {"layer1.0.conv1": 0.25, "stem.0": 0.5},
        "method": "structured",
        "criterion": "random",
        "round_to": 8,
        "seed": 11,
        "extra": {"strategy": "optuna-nsga2", "trial": 4},
    }
    text = json.dumps(data)
    for source in (json.loads(text), text):
        back = Plan.from_json(source)
        assert back == plan
        assert hash(back) == hash(plan)
        assert dict(back.extra) == dict(plan.extra)
        assert back.to_json() == data


def test_from_json_defaults() -> None:
    plan = Plan.from_json({"ratios": {"a": 0.5}})
    assert plan == Plan({"a": 0.5}, method="structured", criterion="l1", round_to=1, seed=0)
    assert Plan.from_json({}) == Plan()


def test_from_json_unknown_keys_are_named() -> None:
    with pytest.raises(InvalidPlanError, match="unknown plan keys: ratio, sparsity"):
        Plan.from_json({"ratio": {"a": 0.5}, "sparsity": 0.5})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ([("a", 0.5)], "JSON object"),
        ({"ratios": [["a", 0.5]]}, "'ratios' must be an object"),
        ({"ratios": {"a": 1.5}}, "must be in"),
        ({"ratios": {"a": None}}, "pair"),
        ({"ratios": {"a": 0.5}, "criterion": "taylor2"}, "unknown criterion"),
        ({"ratios": {"a": 0.5}, "round_to": "8"}, "round_to"),
        ({"ratios": {"a": 0.5}, "seed": "x"}, "seed"),
        ({"ratios": {"a": 0.5}, "extra": "strategy"}, "'extra' must be an object"),
        ({"ratios": {"a": 0.5}, "extra": [1, 2]}, "'extra' must be an object"),
    ],
)
def test_from_json_rejects_malformed_data(data: object, message: str) -> None:
    with pytest.raises(InvalidPlanError, match=message):
        Plan.from_json(data)  # type: ignore[arg-type]


def test_from_json_null_extra_is_empty() -> None:
    assert Plan.from_json({"ratios": {"a": 0.5}, "extra": None}).extra == ()


# ------------------------------------------------------------------------------------------ against a model


def test_validate_against_accepts_known_groups() -> None:
    Plan({"stem.0": 0.5, "layer1.1.conv1": 0.2}).validate_against(GROUPS)
    Plan().validate_against(GROUPS)


def test_validate_against_suggests_close_names() -> None:
    plan = Plan({"layer1.0.cnv1": 0.5, "stem.0": 0.5})
    with pytest.raises(InvalidPlanError) as info:
        plan.validate_against(GROUPS)
    message = str(info.value)
    assert "1 group(s)" in message
    assert "'layer1.0.cnv1' (did you mean 'layer1.0.conv1'?)" in message
    assert "known groups:" in message and "stem.0" in message


def test_validate_against_without_close_match_lists_known_groups() -> None:
    with pytest.raises(InvalidPlanError) as info:
        Plan({"zzzzzz": 0.5}).validate_against(GROUPS)
    message = str(info.value)
    assert "'zzzzzz'" in message
    assert "did you mean" not in message
    for name in GROUPS:
        assert name in message


def test_validate_against_counts_every_unknown_group() -> None:
    with pytest.raises(InvalidPlanError, match="4 group\\(s\\)"):
        Plan({"x1": 0.1, "x2": 0.1, "x3": 0.1, "x4": 0.1}).validate_against(GROUPS)


def test_validate_against_truncates_long_group_lists() -> None:
    many = [f"features.{i}" for i in range(30)]
    with pytest.raises(InvalidPlanError, match=r" \.\.\.$"):
        Plan({"nope": 0.1}).validate_against(many)


@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5]])
def test_ratios_must_be_numbers(bad: object) -> None:
    with pytest.raises(InvalidPlanError, match="must be a number"):
        Plan(ratios=(("conv1", bad),))  # type: ignore[arg-type]


def test_round_to_true_is_not_one() -> None:
    with pytest.raises(InvalidPlanError, match="round_to"):
        Plan(round_to=True)
