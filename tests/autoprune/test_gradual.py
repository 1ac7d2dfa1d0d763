"""Training-time pruning: the polynomial schedule, gradual magnitude pruning, strip, iterative structured pruning."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import pytest
import torch
from torch import nn

from autoprune.data import Dataset
from autoprune.errors import InvalidConfigError
from autoprune.gradual import (
    GradualProgress,
    IterativeStep,
    PolynomialDecay,
    gradual_magnitude_prune,
    iterative_prune,
    prunable_weights,
    prune_to,
    sparsity,
    strip,
)
from autoprune.models.registry import build_model
from autoprune.plan import Plan
from autoprune.pruning import PruningContext, analyze
from autoprune.recovery import RecoveryConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # and `digits_subset`: tests/autoprune/conftest.py


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _total_weights(model: nn.Module, keep: tuple[str, ...] = ()) -> int:
    return sum(m.weight.numel() for _, m in prunable_weights(model, keep))


RECIPE = RecoveryConfig(finetune_steps=50, batch_size=32, finetune_lr=3e-3)
SCHEDULE = PolynomialDecay(initial_sparsity=0.0, final_sparsity=0.6, begin_step=0, end_step=40, frequency=10)


# ------------------------------------------------------------------------------------------------ schedule
def test_polynomial_decay_follows_the_formula() -> None:
    cubic = PolynomialDecay(0.1, 0.9, begin_step=100, end_step=500, power=3, frequency=50)
    linear = PolynomialDecay(0.1, 0.9, begin_step=100, end_step=500, power=1, frequency=50)
    assert cubic.sparsity_at(100) == pytest.approx(0.1)
    assert cubic.sparsity_at(500) == pytest.approx(0.9)
    assert cubic.sparsity_at(0) == pytest.approx(0.1)  # clamped before the begin
    assert cubic.sparsity_at(10_000) == pytest.approx(0.9)  # and after the end
    # half-way: s_f + (s_i - s_f) * (1 - 0.5) ** power
    assert cubic.sparsity_at(300) == pytest.approx(0.9 - 0.8 * 0.5**3)
    assert linear.sparsity_at(300) == pytest.approx(0.5)
    assert cubic.sparsity_at(200) == pytest.approx(0.9 - 0.8 * 0.75**3)
    # the cubic schedule prunes fast early and slowly late
    assert cubic.sparsity_at(200) > linear.sparsity_at(200)
    assert cubic.sparsity_at(450) - cubic.sparsity_at(400) < linear.sparsity_at(450) - linear.sparsity_at(400)


def test_polynomial_decay_pruning_steps_and_their_last() -> None:
    schedule = PolynomialDecay(0.0, 0.5, begin_step=10, end_step=100, power=3, frequency=40)
    assert schedule.pruning_steps() == [10, 50, 90]
    assert [s for s in range(200) if schedule.should_prune(s)] == [10, 50, 90]
    assert schedule.last_pruning_step == 90
    # the grid misses end_step: the last update stops short of the final sparsity (as in TF-MOT)
    assert schedule.reached_sparsity() == pytest.approx(schedule.sparsity_at(90))
    assert schedule.reached_sparsity() < 0.5
    on_grid = PolynomialDecay(0.0, 0.5, begin_step=10, end_step=90, frequency=40)
    assert on_grid.last_pruning_step == 90
    assert on_grid.reached_sparsity() == pytest.approx(0.5)
    single = PolynomialDecay(0.2, 0.4, begin_step=5, end_step=5, frequency=3)
    assert single.pruning_steps() == [5]
    assert single.sparsity_at(4) == pytest.approx(0.2)
    assert single.sparsity_at(5) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_sparsity": 0.5, "final_sparsity": 0.4},  # sparsity only grows
        {"final_sparsity": 1.0},
        {"initial_sparsity": -0.1},
        {"begin_step": -1},
        {"begin_step": 50, "end_step": 40},
        {"frequency": 0},
        {"power": 0},
        {"power": math.inf},
        {"end_step": 10.5},
        {"frequency": True},
        {"final_sparsity": "0.5"},
    ],
)
def test_polynomial_decay_refuses_bad_settings(kwargs: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 0, "end_step": 100}
    with pytest.raises(InvalidConfigError):
        PolynomialDecay(**{**settings, **kwargs})


# ------------------------------------------------------------------------------------- gradual magnitude pruning
def test_gradual_pruning_reaches_the_target_and_masks_only_grow(digits_subset: Dataset) -> None:
    model = _mlp()
    layers = prunable_weights(model)
    total = _total_weights(model)
    seen: list[GradualProgress] = []
    masks: list[torch.Tensor] = []

    def record(progress: GradualProgress) -> None:
        seen.append(progress)
        masks.append(torch.cat([getattr(m, "weight_mask", torch.ones_like(m.weight)).flatten() for _, m in layers]))

    report = gradual_magnitude_prune(model, digits_subset, SCHEDULE, RECIPE, on_progress=record)
    assert [p.step for p in seen] == SCHEDULE.pruning_steps() == [0, 10, 20, 30, 40]
    assert [step for step, _ in report.updates] == [0, 10, 20, 30, 40]
    for progress in seen:
        assert progress.target == pytest.approx(SCHEDULE.sparsity_at(progress.step))
        assert abs(progress.sparsity - progress.target) <= 1 / total  # within one weight
    for before, after in itertools.pairwise(masks):
        assert bool((after <= before).all()), "a pruned weight came back"
        assert int((after == 0).sum()) > int((before == 0).sum()) or bool((after == before).all())
    assert int((masks[-1] == 0).sum()) == round(0.6 * total)
    assert report.steps == 50
    assert abs(report.sparsity - 0.6) <= 1 / total
    assert report.target_sparsity == pytest.approx(0.6)
    assert sparsity(model) == pytest.approx(report.sparsity)
    assert report.layers == ("1", "3", "5")
    assert math.isfinite(report.train_loss)
    # ten more steps of training after the last update: the masked weights are still exactly zero
    weights = torch.cat([m.weight.detach().flatten() for _, m in layers])
    assert bool((weights[masks[-1] == 0] == 0).all())


def test_pruning_ranks_the_current_weights_not_the_last_forwards(digits_subset: Dataset) -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    assert prune_to([(layer, "weight")], 0.25) == 2  # masks 1 and 2
    with torch.no_grad():  # what an optimizer step does: the _orig parameter moves, the forward has not run yet
        layer.weight_orig.copy_(torch.tensor([[1.0, 2.0, 3.0, 0.1], [5.0, 6.0, 0.2, 8.0]]))
    assert prune_to([(layer, "weight")], 0.5) == 2
    expected = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.float32)
    assert torch.equal(layer.weight_mask, expected)
    assert torch.equal(layer.weight, layer.weight_orig * expected)
    assert prune_to([(layer, "weight")], 0.5) == 0  # already there


def test_stripped_model_is_plain_keeps_the_zeros_and_runs(digits_subset: Dataset) -> None:
    model = _mlp()
    gradual_magnitude_prune(model, digits_subset, SCHEDULE, RECIPE)
    assert any(k.endswith("_mask") for k in model.state_dict())
    x = digits_subset.x_val[:8]
    with torch.no_grad():
        masked_out = model(x)
    twin = copy.deepcopy(model)  # a model that trained under masks can be copied
    before = sparsity(model)
    assert strip(model) is model
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
    assert sorted(keys) == sorted(k for k, _ in _mlp().state_dict().items())
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert all(isinstance(m.weight, nn.Parameter) for _, m in prunable_weights(model))
    assert sparsity(model) == pytest.approx(before)
    assert before > 0.59
    with torch.no_grad():
        out = model(x)
    assert out.shape == (8, 10)
    assert torch.allclose(out, masked_out)
    with torch.no_grad():
        assert torch.allclose(twin(x), masked_out)


def test_kept_layers_are_not_pruned(digits_subset: Dataset) -> None:
    model = _mlp()
    report = gradual_magnitude_prune(model, digits_subset, SCHEDULE, RECIPE, keep=["5"])
    kept = model[5]
    assert not hasattr(kept, "weight_mask")
    assert int((kept.weight == 0).sum()) == 0
    assert report.layers == ("1", "3")
    total = _total_weights(model, ("5",))
    assert abs(sparsity(model, ["5"]) - 0.6) <= 1 / total
    assert int((model[1].weight == 0).sum()) > 0
    with pytest.raises(InvalidConfigError, match="keep"):
        gradual_magnitude_prune(_mlp(), digits_subset, SCHEDULE, RECIPE, keep=["classifier"])


def test_a_training_run_shorter_than_the_schedule_is_refused(digits_subset: Dataset) -> None:
    model = _mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidConfigError, match="train longer"):
        gradual_magnitude_prune(
            model, digits_subset, SCHEDULE, RecoveryConfig(finetune_steps=40)
        )  # last update is step 40
    with pytest.raises(InvalidConfigError, match="training recipe"):
        gradual_magnitude_prune(model, digits_subset, SCHEDULE, RecoveryConfig())
    with pytest.raises(InvalidConfigError, match="early stopping"):
        gradual_magnitude_prune(
            model, digits_subset, SCHEDULE, RecoveryConfig(finetune_steps=50, early_stopping_patience=2)
        )
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing ran


# ---------------------------------------------------------------------------------- iterative structured pruning
@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1, image_size=8, width=0.5).eval()
    return model, torch.zeros(1, 1, 8, 8)


def _widths(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, int]:
    structure = analyze(model, x)
    return {n: structure.group(n).units for n in names}


@pytest.fixture(scope="module")
def iterated(resnet: tuple[nn.Module, torch.Tensor], digits_subset: Dataset) -> dict[str, Any]:
    model, x = resnet
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out: dict[str, Any] = {}
    for schedule in ("linear", "cubic"):
        steps: list[IterativeStep] = []
        result = iterative_prune(model, x, digits_subset, 0.5, steps=3, schedule=schedule, on_step=steps.append)
        out[schedule] = (result, steps)
    out["unchanged"] = all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return out


def test_iterative_prune_ends_at_the_one_shot_widths(
    resnet: tuple[nn.Module, torch.Tensor], iterated: dict[str, Any]
) -> None:
    model, x = resnet
    names = list(analyze(model, x).names)
    one_shot = PruningContext(model, x).apply(Plan.uniform(names, 0.5))
    expected = _widths(one_shot, x, names)
    for schedule in ("linear", "cubic"):
        result, steps = iterated[schedule]
        assert dict(result.widths) == expected
        assert dict(steps[-1].widths) == expected
        assert _widths(result.model, x, names) == expected  # the model itself, not only the record
        assert sum(p.numel() for p in result.model.parameters()) == sum(p.numel() for p in one_shot.parameters())
        assert [s.step for s in steps] == [1, 2, 3]
        assert steps[-1].fraction == 1.0
        assert result.steps == tuple(steps)


def test_iterative_increments_shrink_monotonically(
    resnet: tuple[nn.Module, torch.Tensor], iterated: dict[str, Any]
) -> None:
    model, x = resnet
    base = dict(_widths(model, x, list(analyze(model, x).names)))
    for schedule in ("linear", "cubic"):
        _, steps = iterated[schedule]
        previous = base
        for step in steps:
            widths = dict(step.widths)
            assert all(widths[n] <= previous[n] for n in widths)
            assert sum(widths.values()) < sum(previous[n] for n in widths)
            previous = widths
        assert [s.params for s in steps] == sorted((s.params for s in steps), reverse=True)


def test_cubic_cuts_more_first_than_linear(iterated: dict[str, Any]) -> None:
    (_, linear), (_, cubic) = iterated["linear"], iterated["cubic"]
    assert cubic[0].fraction > linear[0].fraction
    assert sum(dict(cubic[0].widths).values()) < sum(dict(linear[0].widths).values())
    assert cubic[0].params < linear[0].params
    assert dict(cubic[-1].widths) == dict(linear[-1].widths)


def test_iterative_result_runs_and_the_base_is_unchanged(
    resnet: tuple[nn.Module, torch.Tensor], iterated: dict[str, Any], digits_subset: Dataset
) -> None:
    model, _ = resnet
    assert iterated["unchanged"]
    result, steps = iterated["cubic"]
    assert result.model is not model
    assert not result.model.training
    with torch.no_grad():
        out = result.model(digits_subset.x_val[:4])
    assert out.shape == (4, 10)
    assert bool(torch.isfinite(out).all())
    assert all(s.output_shape == (1, 10) for s in steps)


def test_iterative_prune_refuses_bad_settings(resnet: tuple[nn.Module, torch.Tensor], digits_subset: Dataset) -> None:
    model, x = resnet
    with pytest.raises(InvalidConfigError):
        iterative_prune(model, x, digits_subset, 0.5, steps=0)
    with pytest.raises(InvalidConfigError):
        iterative_prune(model, x, digits_subset, 0.5, schedule="exponential")
    with pytest.raises(InvalidConfigError):
        iterative_prune(model, x, digits_subset, Plan(ratios=(("*", 0.5),), method="unstructured"))


# ------------------------------------------------------------------ iterative recipes (RecoveryConfig.prune_steps)
def test_per_increment_splits_the_whole_fine_tune() -> None:
    recipe = RecoveryConfig(finetune_steps=12, warmup_steps=6, time_budget_s=9.0, prune_steps=3)
    one = recipe.per_increment()
    assert (one.finetune_steps, one.warmup_steps, one.time_budget_s, one.prune_steps) == (4, 2, 3.0, 1)
    epochs = RecoveryConfig(finetune_epochs=6.0, prune_steps=4, prune_schedule="cubic").per_increment()
    assert (epochs.finetune_epochs, epochs.finetune_steps) == (1.5, 0)
    assert RecoveryConfig(finetune_steps=2, prune_steps=5).per_increment().finetune_steps == 1  # at least one
    assert RECIPE.per_increment() is RECIPE
    assert (
        "3 cubic prune + fine-tune increments"
        in RecoveryConfig(finetune_steps=9, prune_steps=3, prune_schedule="cubic").describe()
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"finetune_steps": 10, "prune_steps": 0}, "prune_steps must be an integer in"),
        ({"finetune_steps": 10, "prune_steps": 101}, "prune_steps must be an integer in"),
        ({"finetune_steps": 10, "prune_steps": 2.0}, "prune_steps must be an integer in"),
        ({"finetune_steps": 10, "prune_steps": 2, "prune_schedule": "exp"}, "unknown prune_schedule 'exp'"),
        ({"prune_steps": 2}, "give finetune_steps or finetune_epochs"),
    ],
)
def test_iterative_recipes_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidConfigError, match=message):
        RecoveryConfig(**kwargs)


def test_a_fine_tuned_point_can_be_reached_iteratively(
    resnet: tuple[nn.Module, torch.Tensor], digits_subset: Dataset
) -> None:
    from autoprune.latency import DeterministicMeter
    from autoprune.objective import Objective

    model, x = resnet
    objective = Objective(model, x, digits_subset, latency=DeterministicMeter(), round_to=1)
    plan = objective.plan(dict.fromkeys(objective.group_names, 0.5))
    reports: list[Any] = []
    recipe = RecoveryConfig(finetune_steps=12, batch_size=32, prune_steps=3, prune_schedule="cubic")
    tuned = objective.evaluate(plan, recovery=recipe, stage="finetuned", keep_model=True, on_finetune=reports.append)
    one_shot = objective.evaluate(plan, recovery=RecoveryConfig(finetune_steps=12, batch_size=32))
    assert tuned.params == one_shot.params  # the increments end at the one-shot plan's widths
    assert tuned.params < tuned.base_params
    finals = [r for r in reports if r.steps == r.total_steps]
    assert [r.total_steps for r in finals] == [4, 4, 4]  # the 12 steps split over 3 increments
    kept = objective.materialize(plan, recovery=recipe)  # the kept model, not a rebuild
    rebuilt = objective.materialize(plan, recovery=recipe)  # rebuilt deterministically the same way
    names = list(objective.group_names)
    assert _widths(kept, x, names) == _widths(rebuilt, x, names)
    for a, b in zip(kept.state_dict().values(), rebuilt.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    with pytest.raises(InvalidConfigError, match="applies to structured plans"):
        objective.evaluate(Plan(ratios=(("*", 0.5),), method="unstructured"), recovery=recipe)


def test_iterative_prune_runs_the_after_prune_hook_on_every_increment(
    resnet: tuple[nn.Module, torch.Tensor], digits_subset: Dataset
) -> None:
    model, x = resnet
    seen: list[float] = []

    def hook(pruned: nn.Module, plan: Plan) -> None:
        seen.append(max(r for _, r in plan.ratios))

    iterative_prune(model, x, digits_subset, 0.5, steps=3, after_prune=hook)
    assert len(seen) >= 3  # the base's first cut and the two later increments (lock-probe trials may add more)
    assert any(0 < r < 0.5 for r in seen)  # an intermediate increment, not only the final plan
