"""The gymnasium environment ``autoprune/LayerPrune-v0``: checkers, episodes, determinism, budget clipping."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import autoprune
from autoprune.data import load_dataset
from autoprune.env import OBS_SIZE, LayerPruneEnv, estimate_macs
from autoprune.errors import InvalidConfigError
from autoprune.latency import DeterministicMeter
from autoprune.models.registry import build_model, example_inputs
from autoprune.objective import Evaluation, Objective
from autoprune.reward import RewardConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _relevant(caught: list[warnings.WarningMessage]) -> list[str]:
    """Every warning except DeprecationWarnings raised from inside torch (unrelated to the env)."""
    return [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if not (issubclass(w.category, DeprecationWarning) and "/torch/" in w.filename.replace("\\", "/"))
    ]


@pytest.fixture
def env(digits_objective: Objective) -> Iterator[gymnasium.Env]:
    made = gymnasium.make(autoprune.ENV_ID, objective=digits_objective)
    yield made
    made.close()


def _episode(env: LayerPruneEnv, actions: list[float], *, seed: int | None = 0) -> tuple[list, list]:
    """Run one episode; return the transitions ``(obs, reward, terminated, truncated, info)`` and observations."""
    obs, _ = env.reset(seed=seed)
    observations = [obs]
    steps = []
    for a in actions:
        step = env.step(np.array([a], dtype=np.float32))
        steps.append(step)
        observations.append(step[0])
        if step[2] or step[3]:
            break
    return steps, observations


# ----------------------------------------------------------------------------------------- registration


def test_env_is_registered_nondeterministic() -> None:
    spec = gymnasium.spec(autoprune.ENV_ID)
    assert spec.nondeterministic is True
    assert spec.entry_point == "autoprune.env:LayerPruneEnv"


def test_make_with_an_objective(env: gymnasium.Env, digits_objective: Objective) -> None:
    unwrapped = env.unwrapped
    assert isinstance(unwrapped, LayerPruneEnv)
    assert unwrapped.objective is digits_objective
    assert env.spec is not None  # the spec (with the objective in its kwargs) can be copied
    assert env.spec.kwargs["objective"] is digits_objective
    assert copy.deepcopy(digits_objective) is digits_objective  # a live handle: copies share it
    assert unwrapped.action_space == gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert unwrapped.observation_space.shape == (OBS_SIZE,)
    assert unwrapped.observation_space.dtype == np.float32
    assert np.all(np.isfinite(unwrapped.observation_space.low))
    assert np.all(np.isfinite(unwrapped.observation_space.high))


# --------------------------------------------------------------------------------------------- checkers


def test_gymnasium_checker_passes_without_warnings(env: gymnasium.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gymnasium_check_env(env.unwrapped)
    assert _relevant(caught) == []


def test_sb3_checker_passes_without_warnings(env: gymnasium.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env.unwrapped, warn=True)
    assert _relevant(caught) == []


# ---------------------------------------------------------------------------------------------- episodes


def test_one_step_per_group_and_terminal_reward(env: gymnasium.Env, digits_objective: Objective) -> None:
    unwrapped = env.unwrapped
    groups = digits_objective.structure.groups
    _obs, info = env.reset(seed=0)
    assert info == {"group": groups[0].name}
    rng = np.random.default_rng(0)
    for i, group in enumerate(groups):
        action = rng.uniform(-1, 1, size=1).astype(np.float32)
        _obs, reward, terminated, truncated, info = env.step(action)
        assert info["group"] == group.name
        assert info["ratio"] == pytest.approx(unwrapped.action_to_ratio(action))
        assert truncated is False
        if i < len(groups) - 1:
            assert reward == 0.0
            assert terminated is False
            assert "reward_terms" not in info
    assert terminated is True
    evaluation = info["evaluation"]
    assert isinstance(evaluation, Evaluation)
    assert evaluation is unwrapped.last_evaluation
    assert isinstance(reward, float)
    assert reward == evaluation.reward
    assert math.isfinite(reward)
    assert info["reward_terms"] == evaluation.reward_terms
    assert set(info["reward_terms"]) >= {"quality", "latency_ratio", "target"}
    assert info["quality"] == evaluation.quality
    assert info["latency_ratio"] == evaluation.latency_ratio
    assert info["macs"] == evaluation.macs
    assert info["plan"] == evaluation.plan.as_dict()
    assert set(info["plan"]) == {g.name for g in groups}
    assert evaluation.plan.round_to == digits_objective.round_to
    assert info["estimated_macs"] == pytest.approx(estimate_macs(digits_objective.structure, info["plan"]))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, dtype=np.float32))


def test_observations_are_bounded_float32(env: gymnasium.Env) -> None:
    unwrapped = env.unwrapped
    n = len(unwrapped.structure.groups)
    steps, observations = _episode(unwrapped, [1.0] * n)
    assert len(steps) == n
    for obs in observations:
        assert obs.dtype == np.float32
        assert obs.shape == (OBS_SIZE,)
        assert np.all(obs >= 0.0) and np.all(obs <= 1.0)
        assert unwrapped.observation_space.contains(obs)
    # the observation moves through the groups: index feature goes 0 -> 1
    assert observations[0][0] == 0.0
    assert observations[-2][0] == pytest.approx(1.0)
    # the one-hot kind feature is set
    assert all(obs[9:].sum() == 1.0 for obs in observations)


def test_reset_seed_makes_the_episode_deterministic(env: gymnasium.Env) -> None:
    unwrapped = env.unwrapped
    n = len(unwrapped.structure.groups)
    actions = np.random.default_rng(7).uniform(-1, 1, size=n).tolist()
    steps_a, obs_a = _episode(unwrapped, actions, seed=3)
    steps_b, obs_b = _episode(unwrapped, actions, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(obs_a, obs_b, strict=True))
    assert steps_a[-1][4]["plan"] == steps_b[-1][4]["plan"]
    assert steps_a[-1][1] == steps_b[-1][1]  # same reward with the deterministic meter
    assert [s[1] for s in steps_a] == [s[1] for s in steps_b]


def test_action_mapping(env: gymnasium.Env) -> None:
    unwrapped = env.unwrapped
    assert unwrapped.action_to_ratio(np.array([-1.0], dtype=np.float32)) == 0.0
    assert unwrapped.action_to_ratio(np.array([1.0], dtype=np.float32)) == pytest.approx(unwrapped.max_ratio)
    assert unwrapped.action_to_ratio(np.array([0.0], dtype=np.float32)) == pytest.approx(unwrapped.max_ratio / 2)
    assert unwrapped.action_to_ratio(5.0) == pytest.approx(unwrapped.max_ratio)  # clipped
    assert unwrapped.action_to_ratio(-5.0) == 0.0


def test_bad_construction(digits_objective: Objective) -> None:
    with pytest.raises(InvalidConfigError, match="max_ratio"):
        LayerPruneEnv(digits_objective, max_ratio=0.0)
    with pytest.raises(InvalidConfigError, match="max_ratio"):
        LayerPruneEnv(digits_objective, max_ratio=0.99)
    with pytest.raises(InvalidConfigError, match="Objective"):
        LayerPruneEnv(digits_objective, reward=RewardConfig(form="budget"))
    with pytest.raises(InvalidConfigError, match="Objective"):
        LayerPruneEnv(digits_objective, meter=DeterministicMeter())


# ------------------------------------------------------------------------------------------------ budget


@pytest.fixture(scope="module")
def budget_env() -> LayerPruneEnv:
    torch.manual_seed(0)
    model = build_model("mlp", image_size=8, hidden=(64, 64, 32)).eval()
    objective = Objective(
        model,
        example_inputs(model),
        load_dataset("digits").subset(128, 64),
        reward=RewardConfig(form="budget", target=0.5),
        latency=DeterministicMeter(),
    )
    return gymnasium.make(autoprune.ENV_ID, objective=objective).unwrapped


@pytest.mark.parametrize("action", [-1.0, 0.0, 1.0])
def test_budget_clips_actions_to_reach_the_target(action: float, budget_env: LayerPruneEnv) -> None:
    structure = budget_env.structure
    assert len(structure.groups) == 3
    steps, _ = _episode(budget_env, [action] * len(structure.groups))
    assert len(steps) == 3 and steps[-1][2] is True
    info = steps[-1][4]
    total = structure.total_macs
    assert info["estimated_macs"] <= 0.5 * total * (1 + 1e-9) + 1
    for _, _, _, _, step_info in steps:
        assert step_info["ratio"] >= step_info["requested_ratio"]
        assert 0.0 <= step_info["ratio"] <= budget_env.max_ratio
    if action == -1.0:  # asked to prune nothing: the clipping alone reaches the target, and only just
        assert info["estimated_macs"] == pytest.approx(0.5 * total, rel=1e-6)
    evaluation = info["evaluation"]
    assert evaluation.macs < evaluation.base_macs
    assert set(evaluation.reward_terms) >= {"overshoot", "penalty"}


def test_budget_clipping_is_off_for_other_forms(env: gymnasium.Env) -> None:
    unwrapped = env.unwrapped
    assert unwrapped.objective.reward_config.form == "mnasnet"
    steps, _ = _episode(unwrapped, [-1.0] * len(unwrapped.structure.groups))
    assert all(s[4]["ratio"] == 0.0 for s in steps)
    evaluation = steps[-1][4]["evaluation"]
    assert evaluation.macs == evaluation.base_macs
    assert evaluation.latency_ratio == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- default make


@pytest.mark.slow
def test_make_without_arguments_runs_an_episode() -> None:
    env = gymnasium.make(autoprune.ENV_ID)
    try:
        unwrapped = env.unwrapped
        assert isinstance(unwrapped, LayerPruneEnv)
        assert unwrapped.objective.reward_config.form == "mnasnet"
        env.action_space.seed(0)
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        terminated = truncated = False
        steps = 0
        while not (terminated or truncated):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            steps += 1
        assert terminated and not truncated
        assert steps == len(unwrapped.structure.groups)
        assert math.isfinite(reward)
        assert reward == info["evaluation"].reward
        protocol = info["evaluation"].latency.protocol
        assert protocol.meter == "measured" and protocol.interleaved
        assert info["latency_ratio"] > 0
    finally:
        env.close()
