"""Lottery tickets: iterative magnitude pruning with rewinding, and the random re-initialisation control."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import pytest
import torch
from torch import nn

from autoprune.data import Dataset
from autoprune.errors import InvalidConfigError
from autoprune.gradual import prunable_weights, prune_to, sparsity, strip, train
from autoprune.lottery import TicketResult, TicketRound, find_ticket, random_reinit, rewind, round_targets
from autoprune.recovery import RecoveryConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # and `digits_subset`: tests/autoprune/conftest.py


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


RECIPE = RecoveryConfig(finetune_steps=30, batch_size=32, finetune_lr=3e-3)  # constant LR
TOTAL = 64 * 32 + 32 * 32 + 32 * 10  # prunable weights of _mlp


def _effective(module: nn.Module) -> torch.Tensor:
    return (module.weight_orig * module.weight_mask).detach() if hasattr(module, "weight_mask") else module.weight


@pytest.fixture(scope="module")
def ticket(digits_subset: Dataset) -> tuple[TicketResult, list[TicketRound], nn.Module, dict[str, torch.Tensor]]:
    model = _mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[TicketRound] = []
    result = find_ticket(model, digits_subset, RECIPE, sparsity=0.8, rounds=3, rewind_step=0, on_round=seen.append)
    return result, seen, model, init


def test_round_targets_keep_the_same_fraction_each_round() -> None:
    targets = round_targets(0.8, 3)
    keep = 0.2 ** (1 / 3)
    assert targets == pytest.approx([1 - keep, 1 - keep**2, 0.8])
    survivors = [1.0] + [1 - t for t in targets]
    assert [b / a for a, b in itertools.pairwise(survivors)] == pytest.approx([keep] * 3)
    assert round_targets(0.5, 1) == (0.5,)


def test_ticket_reaches_the_sparsity_on_the_geometric_schedule(ticket: Any) -> None:
    result, seen, _, _ = ticket
    assert abs(result.sparsity - 0.8) <= 1 / TOTAL
    assert abs(sparsity(result.model) - 0.8) <= 1 / TOTAL
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert list(result.rounds) == seen  # on_round saw every round
    for record, expected in zip(result.rounds, round_targets(0.8, 3), strict=True):
        assert record.target == pytest.approx(expected)
        assert abs(record.sparsity - expected) <= 1 / TOTAL
    assert sum(r.pruned for r in result.rounds) == round(0.8 * TOTAL)
    assert result.rounds[0].pruned > result.rounds[1].pruned > result.rounds[2].pruned  # a fixed fraction of fewer
    masked = sum(int((~m).sum()) for m in result.masks.values())
    assert masked == round(0.8 * TOTAL)
    assert set(result.masks) == {"1", "3", "5"}


def test_ticket_masks_hold_after_retraining_and_the_input_is_untouched(ticket: Any, digits_subset: Dataset) -> None:
    result, _, model, init = ticket
    assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items())
    assert not any(k.endswith("_mask") for k in model.state_dict())
    modules = dict(result.model.named_modules())
    for name, mask in result.masks.items():
        weight = _effective(modules[name])
        assert bool((weight[~mask] == 0).all())
        assert int((weight[mask] == 0).sum()) == 0
    assert not result.model.training
    with torch.no_grad():
        assert result.model(digits_subset.x_val[:4]).shape == (4, 10)
    stripped = strip(copy.deepcopy(result.model))
    assert not any(k.endswith(("_orig", "_mask")) for k in stripped.state_dict())


def test_rewind_step_zero_snapshots_the_initialisation(ticket: Any) -> None:
    result, _, _, init = ticket
    assert result.rewind_step == 0
    assert set(result.rewind_state) == set(init)
    assert all(torch.equal(result.rewind_state[k], v) for k, v in init.items())


def test_rewinding_sets_survivors_to_the_snapshot_and_keeps_masks(ticket: Any) -> None:
    result, _, _, init = ticket
    model = copy.deepcopy(result.model)
    assert rewind(model, result.rewind_state) is model
    modules = dict(model.named_modules())
    for name, mask in result.masks.items():
        weight = _effective(modules[name])
        assert torch.equal(weight, init[f"{name}.weight"] * mask)
        assert torch.equal(modules[name].weight, weight)  # the attribute the forward reads is refreshed
        assert torch.equal(modules[name].bias, init[f"{name}.bias"])
        assert torch.equal(modules[name].weight_mask != 0, mask)


def test_the_snapshot_is_the_model_after_rewind_step_steps(digits_subset: Dataset) -> None:
    result = find_ticket(_mlp(), digits_subset, RECIPE, sparsity=0.5, rounds=1, rewind_step=7)
    early = _mlp()
    train(
        early, digits_subset, dataclasses.replace(RECIPE, finetune_steps=7)
    )  # constant LR: the first 7 steps are the same
    assert result.rewind_step == 7
    for key, value in early.state_dict().items():
        assert torch.allclose(result.rewind_state[key], value, atol=1e-6), key
    assert not torch.equal(result.rewind_state["1.weight"], _mlp().state_dict()["1.weight"])
    # the ticket is the composition: dense training, magnitude pruning, rewind to step 7, retraining from step 7
    manual = _mlp()
    train(manual, digits_subset, RECIPE)
    prune_to([(m, "weight") for _, m in prunable_weights(manual)], 0.5)
    rewind(manual, result.rewind_state)
    train(manual, digits_subset, RECIPE, start_step=7)
    modules = dict(result.model.named_modules())
    for name, module in prunable_weights(manual):
        assert torch.allclose(_effective(module), _effective(modules[name]), atol=1e-5)


def test_rewinding_to_the_end_prunes_the_trained_weights_without_retraining(digits_subset: Dataset) -> None:
    total = RECIPE.total_steps(digits_subset.num_train)
    result = find_ticket(_mlp(), digits_subset, RECIPE, sparsity=0.6, rounds=1, rewind_step=total)
    dense = _mlp()
    train(dense, digits_subset, RECIPE)
    trained = dense.state_dict()
    assert all(torch.allclose(result.rewind_state[k], v) for k, v in trained.items())
    modules = dict(result.model.named_modules())
    for name, mask in result.masks.items():
        assert torch.allclose(_effective(modules[name]), trained[f"{name}.weight"] * mask)
        # magnitude pruning: every survivor is at least as large as every pruned weight of the trained model
    weights = torch.cat([trained[f"{n}.weight"].abs().flatten() for n in result.masks])
    kept = torch.cat([m.flatten() for m in result.masks.values()])
    assert float(weights[kept].min()) >= float(weights[~kept].max())
    assert abs(result.sparsity - 0.6) <= 1 / TOTAL


def test_random_reinit_keeps_the_masks_with_fresh_values(ticket: Any, digits_subset: Dataset) -> None:
    result, _, _, init = ticket
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    control = random_reinit(result, seed=1)
    again = random_reinit(result, seed=1)
    other = random_reinit(result, seed=2)
    modules = dict(control.named_modules())
    for name, mask in result.masks.items():
        weight = _effective(modules[name])
        assert torch.equal(modules[name].weight_mask != 0, mask)
        assert bool((weight[~mask] == 0).all())
        assert not torch.allclose(weight[mask], init[f"{name}.weight"][mask])  # not the ticket's initialisation
        assert torch.equal(weight, _effective(dict(again.named_modules())[name]))  # seeded
        assert not torch.equal(weight, _effective(dict(other.named_modules())[name]))
    assert sparsity(control) == pytest.approx(result.sparsity)
    assert all(torch.equal(v, before[k]) for k, v in result.model.state_dict().items())  # the ticket is untouched
    trained = random_reinit(result, digits_subset, RECIPE, seed=1)
    assert sparsity(trained) == pytest.approx(result.sparsity)  # training under the masks keeps them
    first = _effective(dict(trained.named_modules())["1"])
    assert not torch.allclose(first, _effective(modules["1"]))  # it did train
    assert not torch.allclose(first, _effective(dict(result.model.named_modules())["1"]))
    with pytest.raises(InvalidConfigError):
        random_reinit(result, digits_subset)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 0.0},
        {"sparsity": 1.0},
        {"sparsity": 1.5},
        {"sparsity": True},
        {"rounds": 0},
        {"rounds": 1.5},
        {"rewind_step": -1},
        {"rewind_step": 31},  # the recipe has 30 steps
        {"rewind_step": 2.0},
        {"keep": ["nope"]},
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], digits_subset: Dataset) -> None:
    settings: dict[str, Any] = {"sparsity": 0.5, "rounds": 2, "rewind_step": 0}
    with pytest.raises(InvalidConfigError):
        find_ticket(_mlp(), digits_subset, RECIPE, **{**settings, **kwargs})


def test_a_recipe_that_does_not_train_or_a_masked_model_is_refused(digits_subset: Dataset) -> None:
    with pytest.raises(InvalidConfigError):
        find_ticket(_mlp(), digits_subset, RecoveryConfig(), sparsity=0.5, rounds=1)
    masked = _mlp()
    prune_to([(m, "weight") for _, m in prunable_weights(masked)], 0.3)
    with pytest.raises(InvalidConfigError, match="strip"):
        find_ticket(masked, digits_subset, RECIPE, sparsity=0.5, rounds=1)
