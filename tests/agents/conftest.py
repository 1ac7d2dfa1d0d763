"""Shared fixtures of the search-strategy tests: one torch thread per module, a small trained MLP objective and
the check every strategy passes (budget, ratios, groups, seeds).

This file lives in tests/agents, not tests/ (see the docstring of tests/autoprune/conftest.py for why).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from agents.result import SearchResult
    from autoprune.objective import Objective


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (restored after): the models are tiny and the machine is shared."""
    from autoprune.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def objective(one_torch_thread: None) -> Objective:
    """A 3-group MLP trained briefly on digits (so pruning trades accuracy for latency), deterministic meter.

    Module-scoped: evaluation indices grow as a module's tests evaluate plans. A module may override it.
    """
    import torch
    import torch.nn.functional as F

    from autoprune.data import load_dataset
    from autoprune.latency import DeterministicMeter
    from autoprune.models.registry import build_model, example_inputs
    from autoprune.objective import Objective

    ds = load_dataset("digits")
    assert ds.y_train is not None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("mlp", image_size=8, hidden=(32, 32, 16))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(80):
            opt.zero_grad()
            F.cross_entropy(model(ds.x_train), ds.y_train).backward()
            opt.step()
    model.eval()
    return Objective(model, example_inputs(model), ds.subset(128, 128), latency=DeterministicMeter(overhead_ms=0.0))


def _budget_ratios_groups_and_seeds(objective: Objective, name: str, budget: int, max_ratio: float) -> SearchResult:
    """Search with strategy ``name`` (seed 0) and check: ``budget`` evaluations, stopped by the budget, a ratio in
    [0, max_ratio] for every group of each plan; seed 0 again gives the same plans, seed 1 others. The first run."""
    from agents import run_search

    def plans(result: SearchResult) -> list[object]:
        return [e.plan for e in result.evaluations]

    first = run_search(objective, name, budget, seed=0, max_ratio=max_ratio)
    assert len(first.evaluations) == budget
    assert first.stop_reason == "budget"
    assert first.strategy == name
    for e in first.evaluations:
        ratios = e.plan.as_dict()
        assert set(ratios) == set(objective.group_names)
        assert all(0.0 <= r <= max_ratio for r in ratios.values())
    assert plans(run_search(objective, name, budget, seed=0, max_ratio=max_ratio)) == plans(first)
    assert plans(run_search(objective, name, budget, seed=1, max_ratio=max_ratio)) != plans(first)
    return first


@pytest.fixture(scope="session")
def check_budget_ratios_groups_and_seeds() -> Callable[[Objective, str, int, float], SearchResult]:
    """A function ``(objective, strategy name, budget, max_ratio) -> the seed-0 result``: see
    :func:`_budget_ratios_groups_and_seeds`."""
    return _budget_ratios_groups_and_seeds
