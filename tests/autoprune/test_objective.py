"""Objective(plan) -> Evaluation on the shipped ResNet-20 digits workload, rewards, and the Pareto archive."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from autoprune.cost import count_macs, serialize_weights, weights_size
from autoprune.data import Dataset, load_dataset
from autoprune.errors import DatasetError, InvalidConfigError, InvalidPlanError
from autoprune.latency import DeterministicMeter
from autoprune.models.registry import build_model, example_inputs
from autoprune.objective import Evaluation, Objective
from autoprune.pareto import ParetoArchive, hypervolume, pareto_front
from autoprune.recovery import RecoveryConfig
from autoprune.reward import FORMS, RewardConfig, compute_reward

STAGES = {"prune", "recover", "evaluate", "measure", "cost", "total"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _ms(macs: int, meter: DeterministicMeter) -> float:
    return meter.overhead_ms + meter.ms_per_mmac * macs / 1e6


@pytest.fixture(scope="module")
def half(digits_objective: Objective) -> Evaluation:
    """Every group of the digits ResNet-20 pruned by 0.5 (round_to=8)."""
    return digits_objective(digits_objective.plan(dict.fromkeys(digits_objective.group_names, 0.5)))


@pytest.fixture(scope="module")
def digits_small() -> Dataset:
    return load_dataset("digits").subset(128, 64)


def _mlp(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", image_size=8, num_classes=num_classes, hidden=(64, 32)).eval()


# --------------------------------------------------------------------------------------------- baseline


def test_baseline_is_the_unpruned_model(digits_objective: Objective) -> None:
    obj = digits_objective
    b = obj.baseline
    assert b.index == 0
    assert b.stage == "search"
    assert b.plan.is_identity and b.plan.ratios == ()
    assert b.quality == b.base_quality == obj.base_quality
    assert b.quality > 0.9  # the shipped weights are trained
    assert b.metric == "accuracy"
    assert b.latency.protocol.meter == "deterministic"
    assert b.latency_ratio == pytest.approx(1.0)
    assert b.speedup == pytest.approx(1.0)
    assert b.latency_ms == pytest.approx(b.base_latency_ms)
    assert b.quality_drop == 0.0
    assert (b.macs, b.params) == (b.base_macs, b.base_params)
    assert b.macs == obj.structure.total_macs
    assert (b.reward, b.reward_terms) == compute_reward(b.quality, 1.0, obj.reward_config)
    assert {"evaluate", "measure", "cost", "total"} <= set(b.timings)


def test_objective_does_not_touch_the_callers_model(digits_workload, digits_objective: Objective) -> None:  # type: ignore[no-untyped-def]
    assert digits_objective.base is not digits_workload.model
    assert _same_weights(digits_objective.base, digits_workload.model)
    assert not digits_objective.base.training


# ------------------------------------------------------------------------------------------- evaluation


def test_evaluating_a_plan(digits_objective: Objective, half: Evaluation) -> None:
    obj, e = digits_objective, half
    assert isinstance(e, Evaluation)
    assert e.index >= 1
    assert e.plan == obj.plan(dict.fromkeys(obj.group_names, 0.5))
    assert e.plan.round_to == 8 and e.plan.criterion == "l1"
    assert e.macs < e.base_macs and e.params < e.base_params
    assert e.nonzero_params <= e.params
    assert e.size_bytes > 0
    assert 0.0 <= e.quality <= 1.0
    assert e.base_quality == obj.base_quality
    assert set(e.timings) == STAGES
    assert all(v >= 0 for v in e.timings.values())
    assert e.timings["total"] >= sum(v for k, v in e.timings.items() if k != "total") - 1e-6
    # deterministic meter: latency proportional to MACs, interleaved ratio against the base
    meter = obj.meter
    assert isinstance(meter, DeterministicMeter)
    assert e.latency.ratio == pytest.approx(_ms(e.macs, meter) / _ms(e.base_macs, meter))
    assert e.latency_ratio < 1.0
    assert e.base_latency_ms == pytest.approx(obj.baseline.latency.median_ms)
    assert e.latency_ms == pytest.approx(e.base_latency_ms * e.latency_ratio)
    assert e.speedup == pytest.approx(1 / e.latency_ratio)
    assert e.storage_bytes == e.size_bytes
    assert e.quality_drop == pytest.approx((e.base_quality - e.quality) / e.base_quality)


def test_reward_matches_compute_reward(digits_objective: Objective, half: Evaluation) -> None:
    cfg = digits_objective.reward_config
    assert cfg.form == "mnasnet"
    reward, terms = compute_reward(half.quality, half.latency_ratio, cfg)
    assert half.reward == reward
    assert half.reward_terms == terms
    assert half.reward == pytest.approx(half.quality * (half.latency_ratio / cfg.target) ** cfg.exponent)


def test_mapping_and_plan_give_the_same_figures(digits_objective: Objective) -> None:
    obj = digits_objective
    ratios = {obj.group_names[0]: 0.25, obj.group_names[-1]: 0.5}
    a = obj(ratios)
    b = obj.evaluate(obj.plan(ratios))
    assert b.index == a.index + 1
    assert a.plan == b.plan
    assert (a.quality, a.macs, a.params, a.reward) == (b.quality, b.macs, b.params, b.reward)
    assert a.latency.ratio == b.latency.ratio


def test_unknown_group_is_refused(digits_objective: Objective) -> None:
    with pytest.raises(InvalidPlanError, match=r"'stem\.O' \(did you mean 'stem\.0'\?\)"):
        digits_objective({"stem.O": 0.5})


def test_evaluation_json_round_trip(half: Evaluation) -> None:
    data = json.loads(json.dumps(half.to_json()))
    assert data["derived"]["latency_ratio"] == pytest.approx(half.latency_ratio)
    assert data["derived"]["speedup"] == pytest.approx(half.speedup)
    assert data["derived"]["storage_bytes"] == half.storage_bytes
    assert data["plan"] == half.plan.to_json()
    back = Evaluation.from_json(data)
    assert back == half
    assert back.plan == half.plan
    for name in ("quality", "macs", "params", "nonzero_params", "size_bytes", "reward", "index", "stage"):
        assert getattr(back, name) == getattr(half, name), name
    assert back.latency == half.latency
    assert back.reward_terms == half.reward_terms
    assert back.timings == half.timings
    assert back.latency_ratio == half.latency_ratio


def test_materialize_is_deterministic_and_is_what_was_evaluated(digits_objective: Objective, half: Evaluation) -> None:
    obj = digits_objective
    a = obj.materialize(half.plan)
    b = obj.materialize(half.plan)
    assert a is not b
    assert _same_weights(a, b)
    assert not a.training
    assert sum(p.numel() for p in a.parameters()) == half.params
    quality = obj.metric(a, obj.dataset, reference=obj.base, batch_size=obj.eval_batch_size)
    assert quality == half.quality
    # recovery ran: BatchNorm statistics differ from the merely pruned model's
    assert not _same_weights(a, obj.prune(half.plan))


def test_evaluate_model_takes_an_already_pruned_model(digits_objective: Objective, half: Evaluation) -> None:
    obj = digits_objective
    e = obj.evaluate_model(obj.materialize(half.plan), half.plan, stage="finetuned")
    assert e.stage == "finetuned"
    assert e.index > half.index
    assert e.quality == half.quality and e.macs == half.macs


def test_kept_model_is_handed_to_materialize_once(digits_objective: Objective, half: Evaluation) -> None:
    obj = digits_objective
    tuned = RecoveryConfig(finetune_steps=2, distill=True)
    e = obj.evaluate(half.plan, recovery=tuned, stage="finetuned", keep_model=True)
    kept = obj.materialize(half.plan, recovery=tuned)
    rebuilt = obj.materialize(half.plan, recovery=tuned)  # handed over once: this one is rebuilt
    assert kept is not rebuilt
    assert _same_weights(kept, rebuilt)  # recovery is deterministic: the kept model is the rebuilt one
    assert not kept.training
    assert obj.metric(kept, obj.dataset, reference=obj.base, batch_size=obj.eval_batch_size) == e.quality
    assert not _same_weights(kept, obj.materialize(half.plan))  # other recovery: not the kept model


# ------------------------------------------------------------------------------------- static costs

COST_ARCHS: dict[str, dict[str, int]] = {
    "resnet20": {"image_size": 8, "in_channels": 1},
    "mobilenetv2": {"image_size": 8},
    "mlp": {},
    "cnn1d": {"in_channels": 1, "seq_len": 40},
    "transformer": {"in_channels": 1, "seq_len": 40},
    "lstm": {"in_channels": 1, "seq_len": 40},
}


@pytest.mark.parametrize("arch", COST_ARCHS)
def test_candidate_costs_are_those_counted_and_serialized(arch: str) -> None:
    """MACs without a forward (scaled per layer, or cached per shape) and the safetensors size without
    serializing give exactly the figures of FlopCounterMode and of the written file."""
    torch.manual_seed(0)
    model = build_model(arch, **COST_ARCHS[arch]).eval()
    x = example_inputs(model)
    obj = Objective(model, x, None, metric=lambda m: 1.0, latency=DeterministicMeter())
    # plain conv / linear models are scaled; attention and recurrent layers are counted
    assert (obj._mac_profile is not None) == (arch not in {"transformer", "lstm"})
    assert weights_size(obj.base) == len(serialize_weights(obj.base)) == obj.base_cost.size_bytes
    for ratios in (dict.fromkeys(obj.group_names, 0.25), dict.fromkeys(obj.group_names[::2], 0.6)):
        e = obj(ratios)
        pruned = obj.prune(e.plan)
        assert e.macs == count_macs(pruned, x)[0] < e.base_macs
        assert e.size_bytes == len(serialize_weights(pruned)) == e.compressed_bytes
        assert obj(ratios).macs == e.macs  # a shape seen before


def test_weights_size_matches_safetensors_for_mixed_dtypes_and_shared_tensors() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 3)
            self.b = self.a  # shared: written twice
            self.half = nn.Conv1d(2, 4, 3).to(torch.float16)
            self.register_buffer("steps", torch.tensor(7))
            self.register_buffer("flags", torch.ones(3, dtype=torch.bool))
            self.register_buffer("wide", torch.zeros(2, 2, dtype=torch.float64))
            self.register_buffer("empty", torch.zeros(0, 4))
            self.register_buffer("bf", torch.zeros(11, dtype=torch.bfloat16))

    for model in (Mixed(), nn.ReLU(), nn.BatchNorm2d(3)):
        assert weights_size(model) == len(serialize_weights(model))


# ----------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("form", FORMS)
def test_reward_forms_in_the_objective(form: str, digits_small: Dataset) -> None:
    cfg = RewardConfig(form=form, target=0.6, exponent=-0.1, penalty=2.0, weight=0.3)
    model = _mlp()
    obj = Objective(model, example_inputs(model), digits_small, reward=cfg, latency=DeterministicMeter())
    assert obj.baseline.reward == compute_reward(obj.base_quality, 1.0, cfg)[0]
    e = obj({"body.0": 0.5, "body.2": 0.25})
    q, r = e.quality, e.latency_ratio
    assert 0 < r < 1
    assert (e.reward, e.reward_terms) == compute_reward(q, r, cfg)
    assert e.reward_terms["quality"] == q and e.reward_terms["latency_ratio"] == r
    assert e.reward_terms["target"] == 0.6
    if form == "mnasnet":
        assert e.reward == pytest.approx(q * (r / 0.6) ** -0.1)
        assert e.reward_terms["latency_factor"] == pytest.approx((r / 0.6) ** -0.1)
    elif form == "budget":
        overshoot = max(0.0, r / 0.6 - 1.0)
        assert e.reward == pytest.approx(q - 2.0 * overshoot)
        assert e.reward_terms["overshoot"] == pytest.approx(overshoot)
        assert e.reward_terms["penalty"] == pytest.approx(2.0 * overshoot)
    else:
        assert e.reward == pytest.approx(q - 0.3 * r)
        assert e.reward_terms["latency_cost"] == pytest.approx(0.3 * r)


def test_compute_reward_arithmetic() -> None:
    value, terms = compute_reward(0.9, 0.25, RewardConfig(form="mnasnet", target=0.5, exponent=-0.07))
    assert value == pytest.approx(0.9 * 0.5**-0.07)
    assert value > 0.9  # faster than the target is rewarded
    value, terms = compute_reward(0.9, 1.0, RewardConfig(form="budget", target=0.5, penalty=1.0))
    assert value == pytest.approx(0.9 - 1.0) and terms["overshoot"] == pytest.approx(1.0)
    value, terms = compute_reward(0.9, 0.4, RewardConfig(form="budget", target=0.5))
    assert value == pytest.approx(0.9) and terms["overshoot"] == 0.0
    value, _ = compute_reward(0.8, 0.5, RewardConfig(form="weighted", weight=0.5))
    assert value == pytest.approx(0.55)
    value, _ = compute_reward(0.8, 0.0, RewardConfig(form="mnasnet"))  # a zero ratio stays finite
    assert math.isfinite(value)


@pytest.mark.parametrize(
    "kwargs",
    [{"form": "amc"}, {"target": 0.0}, {"target": 2.5}, {"exponent": 0.1}, {"penalty": -1.0}, {"weight": -0.1}],
)
def test_invalid_reward_configs(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        RewardConfig(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- data and metrics


def test_label_free_agreement(digits_small: Dataset) -> None:
    unlabelled = Dataset("digits-unlabelled", digits_small.x_train, None, digits_small.x_val, None)
    assert not unlabelled.has_labels
    model = _mlp()
    obj = Objective(model, example_inputs(model), unlabelled, metric="agreement", latency=DeterministicMeter())
    assert obj.baseline.metric == "agreement"
    assert obj.base_quality == 1.0  # the base agrees with itself
    mild = obj({"body.0": 0.125})
    harsh = obj({"body.0": 0.9, "body.2": 0.9})
    assert 0.0 <= harsh.quality <= mild.quality <= 1.0
    assert harsh.quality < 1.0
    with pytest.raises(DatasetError, match="labels"):
        Objective(model, example_inputs(model), unlabelled, metric="accuracy", latency=DeterministicMeter())


def test_more_classes_than_outputs_is_refused(digits_small: Dataset) -> None:
    model = _mlp(num_classes=5)
    with pytest.raises(DatasetError, match="10 classes"):
        Objective(model, example_inputs(model), digits_small, latency=DeterministicMeter())


def test_callable_metric_without_dataset() -> None:
    model = _mlp()

    def width_kept(m: nn.Module) -> float:
        return m.body[0].out_features / 64

    obj = Objective(model, example_inputs(model), None, metric=width_kept, latency=DeterministicMeter())
    assert obj.recovery.bn_recalibration_batches == 0 and obj.recovery.finetune_steps == 0
    assert obj.base_quality == 1.0
    e = obj({"body.0": 0.5})
    assert e.metric == "width_kept"
    assert e.quality == 0.5
    assert e.timings["recover"] >= 0
    assert _same_weights(obj.materialize(e.plan), obj.prune(e.plan))  # nothing to recover without data


def test_fine_tuning_without_data_is_refused_not_labelled() -> None:
    model = _mlp()
    with pytest.raises(InvalidConfigError, match="fine-tuning needs data"):
        Objective(model, example_inputs(model), None, metric=lambda m: 1.0, recovery=RecoveryConfig(finetune_steps=5))
    obj = Objective(model, example_inputs(model), None, metric=lambda m: 1.0, latency=DeterministicMeter())
    with pytest.raises(InvalidConfigError, match="without data"):
        obj.evaluate({"body.0": 0.5}, recovery=RecoveryConfig(finetune_steps=5), stage="finetuned")


def test_without_data_a_recovery_is_refused_and_a_known_base_score_is_used() -> None:
    model = _mlp()
    with pytest.raises(InvalidConfigError, match="BatchNorm re-estimation needs data"):
        Objective(model, example_inputs(model), None, metric=lambda m: 1.0, recovery=RecoveryConfig())
    calls: list[int] = []

    def score(m: nn.Module) -> float:
        calls.append(1)
        return 0.5

    obj = Objective(model, example_inputs(model), None, metric=score, latency=DeterministicMeter(), base_quality=0.9)
    assert calls == [] and obj.baseline.quality == 0.9  # the unpruned model is not scored again
    assert obj.evaluate({"body.0": 0.5}).quality == 0.5 and calls == [1]
    with pytest.raises(InvalidConfigError, match="base_quality"):
        Objective(model, example_inputs(model), None, metric=score, base_quality=float("nan"))


def test_delivered_models_get_a_held_out_test_figure(digits_objective: Objective) -> None:
    obj = digits_objective
    assert obj.has_test and obj.dataset is not None and obj.dataset.x_test is not None
    plan = obj.plan(dict.fromkeys(obj.group_names, 0.25))
    searched = obj.evaluate(plan)
    assert searched.test_quality is None and searched.base_test_quality is None  # never chosen on test
    delivered = obj.evaluate(plan, stage="finetuned")
    assert delivered.test_quality is not None and delivered.base_test_quality == obj.base_test_quality
    # the figure is the metric on the test split, which is not the validation split
    model = obj.materialize(plan)
    test_acc = float(obj.metric(model, obj.dataset.test_view(), batch_size=256))
    assert delivered.test_quality == pytest.approx(test_acc)
    assert Evaluation.from_json(delivered.to_json()).test_quality == delivered.test_quality
    assert delivered.to_json()["derived"]["test_quality_drop"] == pytest.approx(
        (obj.base_test_quality - delivered.test_quality) / obj.base_test_quality  # type: ignore[operator]
    )
    no_test = Objective(
        obj.base, obj.example_inputs, obj.dataset.test_view().subset(64, 32), latency=DeterministicMeter()
    )
    assert not no_test.has_test and no_test.evaluate(plan, stage="finetuned").test_quality is None


def test_named_metric_without_dataset_is_refused() -> None:
    model = _mlp()
    with pytest.raises(InvalidConfigError, match="dataset"):
        Objective(model, example_inputs(model), None, latency=DeterministicMeter())


def test_bad_pruning_settings_are_refused_early(digits_small: Dataset) -> None:
    model = _mlp()
    with pytest.raises(InvalidPlanError, match="criterion"):
        Objective(model, example_inputs(model), digits_small, criterion="l7", latency=DeterministicMeter())


# ---------------------------------------------------------------------------------------------- Pareto


def _point(e: Evaluation, quality: float, ratio: float, size: int | None = None, **kw: object) -> Evaluation:
    return replace(
        e,
        quality=quality,
        latency=replace(e.latency, ratio=ratio),
        size_bytes=e.size_bytes if size is None else size,
        **kw,  # type: ignore[arg-type]
    )


def test_front_excludes_dominated_points(half: Evaluation) -> None:
    a = _point(half, 0.90, 0.50)
    b = _point(half, 0.80, 0.30)
    c = _point(half, 0.70, 0.60)  # dominated by a and by b
    d = _point(half, 0.95, 0.90)
    e = _point(half, 0.85, 0.55)  # dominated by a
    archive = ParetoArchive([a, b, c])
    archive.add(d)
    archive.add(e)
    assert len(archive) == 5
    front = archive.front(with_size=False)
    assert front == [b, a, d]  # sorted by latency
    assert c not in front and e not in front
    assert pareto_front([]) == []


def test_front_uses_size_as_third_objective(half: Evaluation) -> None:
    a = _point(half, 0.90, 0.50, size=1000)
    smaller = _point(half, 0.85, 0.55, size=10)  # dominated in (quality, latency) but smaller
    assert archive_front(a, smaller, with_size=False) == [a]
    assert archive_front(a, smaller, with_size=True) == [a, smaller]


def archive_front(*evaluations: Evaluation, with_size: bool) -> list[Evaluation]:
    return ParetoArchive(evaluations).front(with_size=with_size)


def test_front_by_stage(half: Evaluation) -> None:
    search = _point(half, 0.9, 0.5)
    tuned = _point(half, 0.8, 0.6, stage="finetuned")
    archive = ParetoArchive([search, tuned])
    assert archive.front(with_size=False) == [search]
    assert archive.front(with_size=False, stage="finetuned") == [tuned]


def test_hypervolume_grows_with_a_dominating_point(half: Evaluation) -> None:
    a = _point(half, 0.8, 0.5)
    archive = ParetoArchive([a])
    hv = archive.hypervolume()
    assert hv == pytest.approx(0.8 * 0.5)
    archive.add(_point(half, 0.9, 0.4))
    assert archive.hypervolume() > hv
    assert archive.hypervolume() == pytest.approx(0.9 * 0.6)
    # points slower than the reference or without quality add nothing
    archive.add(_point(half, 1.0, 1.2))
    archive.add(_point(half, 0.0, 0.1))
    assert archive.hypervolume() == pytest.approx(0.9 * 0.6)
    assert hypervolume([]) == 0.0
    assert hypervolume([a], ref_latency_ratio=2.0) == pytest.approx(0.8 * 1.5)


def test_best_semantics(half: Evaluation) -> None:
    base_q = half.base_quality
    fast_bad = _point(half, base_q * 0.5, 0.2, reward=0.3)
    balanced = _point(half, base_q * 0.99, 0.5, reward=0.9)
    slow_good = _point(half, base_q, 0.8, reward=0.7)
    archive = ParetoArchive([fast_bad, balanced, slow_good])
    assert archive.best() is balanced  # max reward by default
    assert archive.best(key="reward") is balanced
    assert archive.best(key="latency") is fast_bad
    assert archive.best(key="latency", max_quality_drop=0.02) is balanced
    assert archive.best(key="latency", max_quality_drop=0.0) is slow_good
    assert archive.best(key="quality") is slow_good
    assert archive.best(key="quality", max_latency_ratio=0.6) is balanced
    assert archive.best(key="quality", max_latency_ratio=0.1) is None
    assert ParetoArchive().best() is None
    with pytest.raises(ValueError, match="unknown key"):
        archive.best(key="size")


def test_archive_of_real_evaluations(digits_objective: Objective, half: Evaluation) -> None:
    archive = ParetoArchive([digits_objective.baseline, half])
    front = archive.front()
    assert digits_objective.baseline in front  # nothing beats its quality
    assert archive.hypervolume() >= 0.0


def test_keep_takes_modules_and_containers_and_refuses_typos() -> None:
    model = _mlp()
    full = Objective(model, example_inputs(model), None, metric=lambda m: 1.0, latency=DeterministicMeter())
    assert "body.0" in full.group_names
    by_module = Objective(
        model, example_inputs(model), None, metric=lambda m: 1.0, latency=DeterministicMeter(), keep=[model.body[0]]
    )
    assert "body.0" not in by_module.group_names and "body.0" in by_module.structure.kept
    container = Objective(
        model, example_inputs(model), None, metric=lambda m: 1.0, latency=DeterministicMeter(), keep=["body"]
    )
    assert container.group_names == () or not any(g.startswith("body") for g in container.group_names)
    with pytest.raises(InvalidConfigError, match="did you mean body"):
        Objective(model, example_inputs(model), None, metric=lambda m: 1.0, keep=["bdy.0"])
    with pytest.raises(InvalidConfigError, match="not part of this model"):
        Objective(model, example_inputs(model), None, metric=lambda m: 1.0, keep=[nn.Linear(2, 2)])
