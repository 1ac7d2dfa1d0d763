"""Candidates that cannot be pruned (a cut the model's forward rejects): skipped, recorded, told, and bounded."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from autoprune.objective import Objective


class _EvenWidths(nn.Module):
    """A model whose forward rejects odd widths below 15 (as some kernels do): the analysis' trials (halved, and
    one unit short of full width) pass, other cuts fail. (Odd widths everywhere would be learned as a step.)"""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.shape[1] % 2 and h.shape[1] < 15:
            raise RuntimeError(f"odd width {h.shape[1]}")
        return self.head(torch.relu(self.b(h)))


def _even_widths_objective() -> Objective:
    from autoprune.latency import DeterministicMeter
    from autoprune.objective import Objective

    torch.manual_seed(0)
    return Objective(
        _EvenWidths().eval(), torch.randn(1, 8), None, metric=lambda m: 1.0, latency=DeterministicMeter(), round_to=1
    )


@pytest.mark.parametrize("name", ["random", "optuna-tpe", "sb3-ddpg"])
def test_candidates_that_cannot_be_pruned_are_skipped_and_recorded(name: str) -> None:
    from agents import run_search

    objective = _even_widths_objective()
    assert objective.group_names == ("a", "b") and objective.structure.locked == ()
    result = run_search(objective, name, 12, seed=0)
    assert result.stop_reason == "budget"
    assert result.failures and result.evaluations  # the failures did not end the search
    assert len(result.evaluations) + len(result.failures) == 12  # each counts against the budget
    assert all("odd width" in failure.reason for failure in result.failures)
    widths = {16 - math.floor(f.plan.as_dict()["a"] * 16 + 1e-9) for f in result.failures}
    assert all(w % 2 for w in widths)
    assert all(e.plan not in {f.plan for f in result.failures} for e in result.evaluations)


def test_optuna_marks_the_trial_of_a_failed_candidate_failed() -> None:
    import optuna

    from agents import run_search
    from agents.optuna_search import OptunaTPE

    strategy = OptunaTPE()
    result = run_search(_even_widths_objective(), strategy, 10, seed=0)
    failed = strategy.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == len(result.failures) > 0
    assert all("odd width" in t.user_attrs["failure"] for t in failed)


def test_a_search_whose_candidates_keep_failing_stops_and_says_so() -> None:
    from agents import run_search
    from agents.base import MAX_CONSECUTIVE_FAILURES, AskTellStrategy

    told: list[str] = []

    class Stubborn(AskTellStrategy):
        name = "stubborn"

        def ask(self) -> dict[str, float]:
            return {"a": 0.2}  # 16 -> 13 units: odd

        def tell(self, ratios: dict[str, float], evaluation: Any) -> None:
            raise AssertionError("nothing can be told: every candidate fails")

        def tell_failed(self, ratios: dict[str, float], reason: str) -> None:
            told.append(reason)

    result = run_search(_even_widths_objective(), Stubborn(), 100)
    assert result.stop_reason == "failing"
    assert len(result.failures) == len(told) == MAX_CONSECUTIVE_FAILURES
    assert result.evaluations == [] and "odd width 13" in told[0]


def test_the_env_ends_an_episode_whose_plan_cannot_be_pruned_with_the_worst_reward() -> None:
    import numpy as np

    from autoprune.env import LayerPruneEnv
    from autoprune.reward import compute_reward

    objective = _even_widths_objective()
    env = LayerPruneEnv(objective, max_ratio=0.8)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(np.array([-0.5], dtype=np.float32))  # a: ratio 0.2 -> 13 units
    assert reward == 0.0 and not terminated
    _, reward, terminated, truncated, info = env.step(np.array([-1.0], dtype=np.float32))
    assert terminated and not truncated
    assert "odd width 13" in info["failed"] and env.last_evaluation is None
    assert reward == compute_reward(0.0, 1.0, objective.reward_config)[0]
    env.reset(seed=0)  # the next episode runs normally
    env.step(np.array([-1.0], dtype=np.float32))
    _, reward, terminated, _, info = env.step(np.array([-1.0], dtype=np.float32))
    assert terminated and "failed" not in info and env.last_evaluation is not None
