"""SB3 strategies (real stable-baselines3) on the LayerPrune env: budgets, seeds, AMC's warm-up, noise and
reward baseline, stop signal, time-only budgets and history replay."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import Budget, make_strategy, run_search
from agents.base import Progress
from agents.rl import ALGORITHMS, DecayingNormalNoise, MovingBaselineReward, SB3Strategy
from autoprune.errors import InvalidConfigError
from autoprune.objective import Objective

if TYPE_CHECKING:
    from agents.result import SearchResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # and `objective`: tests/agents/conftest.py


def _plans(result: Any) -> list[Any]:
    return [e.plan for e in result.evaluations]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_budget_ratios_groups_and_seeds(
    objective: Objective, algorithm: str, check_budget_ratios_groups_and_seeds: Callable[..., SearchResult]
) -> None:
    first = check_budget_ratios_groups_and_seeds(objective, f"sb3-{algorithm}", 6, 0.6)
    for e in first.evaluations:  # rounded like the ask/tell strategies' plans
        assert all(round(r, 6) == r for r in e.plan.as_dict().values())


def test_ddpg_warmup_is_random_then_noise_decays(objective: Objective) -> None:
    strategy = make_strategy("sb3-ddpg", warmup_episodes=3)
    assert isinstance(strategy, SB3Strategy)
    result = run_search(objective, strategy, 8, seed=7)
    n = len(objective.group_names)
    # warm-up: the action space's own seeded samples, no noise added (AMC's random exploration)
    box = spaces.Box(-1.0, 1.0, (1,), np.float32)
    box.seed(7)
    expected = [round(float((box.sample()[0] + 1.0) / 2.0 * 0.8), 6) for _ in range(3 * n)]
    warm = [r for e in result.evaluations[:3] for r in e.plan.as_dict().values()]
    assert warm == pytest.approx(expected, abs=2e-6)
    # after warm-up the policy acts: not the continuation of the random stream
    rest = [round(float((box.sample()[0] + 1.0) / 2.0 * 0.8), 6) for _ in range(n)]
    assert list(result.evaluations[3].plan.as_dict().values()) != pytest.approx(rest, abs=2e-6)
    # SB3 resets the noise after every episode but the last (learning stops right after it)
    noise = strategy.noise
    assert noise is not None
    assert noise.episodes == 7
    assert noise.sigma == pytest.approx(0.5 * 0.95**4)
    model = strategy.model
    assert model is not None
    assert model.learning_starts == 3 * n  # type: ignore[attr-defined]
    assert model.gamma == 1.0  # type: ignore[attr-defined]
    assert model.train_freq.unit.value == "episode"  # type: ignore[attr-defined]
    assert isinstance(model.get_env().envs[0].env, MovingBaselineReward)  # type: ignore[union-attr, attr-defined]


@pytest.mark.parametrize("algorithm", ["ddpg", "ppo"])
def test_sb3_writes_no_log_folders(
    objective: Objective, algorithm: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SB3's default logger would make SB3-<time>/
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    result = run_search(objective, f"sb3-{algorithm}", 2, max_ratio=0.6)
    assert len(result.evaluations) == 2
    assert list(tmp_path.iterdir()) == []


def test_decaying_noise_schedule() -> None:
    noise = DecayingNormalNoise(0.5, 0.9, warmup_episodes=2, seed=0)
    assert noise.sigma == 0.0
    noise.reset()  # SB3 also resets when learn() starts: no action since, so no episode ended
    assert noise.episodes == 0
    assert np.array_equal(noise(), np.zeros(1, dtype=np.float32))
    noise.reset()
    assert (noise.episodes, noise.sigma) == (1, 0.0)
    noise()
    noise.reset()  # warm-up over: the first policy episode uses the initial sigma
    assert noise.sigma == pytest.approx(0.5)
    draws = np.array([noise()[0] for _ in range(4000)])
    assert draws.dtype == np.float32
    assert abs(draws.mean()) < 0.05
    assert draws.std() == pytest.approx(0.5, rel=0.1)
    noise.reset()
    noise()
    noise.reset()
    assert noise.episodes == 4
    assert noise.sigma == pytest.approx(0.5 * 0.9**2)
    a, b = DecayingNormalNoise(0.5, 0.9, seed=3), DecayingNormalNoise(0.5, 0.9, seed=3)
    assert [float(a()[0]) for _ in range(5)] == [float(b()[0]) for _ in range(5)]


class _TwoStepEnv(gym.Env[np.ndarray, np.ndarray]):
    """Episodes of two steps; the second ends the episode with the next reward from ``rewards``."""

    def __init__(self, rewards: list[float]) -> None:
        self.rewards = list(rewards)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, (1,), np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._t += 1
        done = self._t == 2
        return np.zeros(1, np.float32), self.rewards.pop(0) if done else 0.0, done, False, {}


def test_moving_baseline_arithmetic() -> None:
    env = MovingBaselineReward(_TwoStepEnv([1.0, 3.0, 2.0, 0.0]), alpha=0.5)
    seen = []
    for _ in range(4):
        env.reset()
        _, mid, *_ = env.step(np.zeros(1, np.float32))
        assert mid == 0.0  # only the final step carries reward
        _, final, terminated, _, info = env.step(np.zeros(1, np.float32))
        assert terminated
        seen.append((final, info["raw_reward"], info["reward_baseline"]))
    # baselines: 1 (first reward), then 1 + 0.5 * (3 - 1) = 2, then 2 + 0.5 * (2 - 2) = 2
    assert seen == [(0.0, 1.0, 1.0), (2.0, 3.0, 1.0), (0.0, 2.0, 2.0), (-2.0, 0.0, 2.0)]
    assert env.baseline == pytest.approx(1.0)
    with pytest.raises(InvalidConfigError, match="alpha"):
        MovingBaselineReward(_TwoStepEnv([]), alpha=0.0)


def test_ppo_rollouts_hold_whole_episodes(objective: Objective) -> None:
    strategy = make_strategy("sb3-ppo")
    assert isinstance(strategy, SB3Strategy)
    result = run_search(objective, strategy, 5)
    assert len(result.evaluations) == 5
    n = len(objective.group_names)
    model = strategy.model
    assert model is not None
    assert model.n_steps == 4 * n  # type: ignore[attr-defined]
    assert (4 * n) % model.batch_size == 0  # type: ignore[attr-defined]
    assert model.gamma == 1.0  # type: ignore[attr-defined]
    assert not strategy.uses_baseline()
    assert strategy.warmup(Budget(evaluations=40)) == 0
    assert strategy.noise is None


def test_defaults_per_algorithm() -> None:
    ddpg = SB3Strategy("ddpg")
    assert ddpg.warmup(Budget(evaluations=3)) == 1
    assert ddpg.warmup(Budget(evaluations=20)) == 5
    assert ddpg.warmup(Budget(evaluations=400)) == 10
    assert ddpg.warmup(Budget(seconds=60)) == 10
    assert ddpg.uses_baseline()
    assert SB3Strategy("sac").uses_baseline()
    assert not SB3Strategy("sac", reward_baseline=False).uses_baseline()
    assert SB3Strategy("ppo", reward_baseline=True).uses_baseline()
    assert SB3Strategy("TD3").name == "sb3-td3"


def test_invalid_algorithm_and_options() -> None:
    with pytest.raises(InvalidConfigError, match="ddpg, td3, sac, ppo"):
        SB3Strategy("a2c")
    with pytest.raises(InvalidConfigError, match="has no option"):
        make_strategy("sb3-ddpg", n_startup_trials=3)
    with pytest.raises(InvalidConfigError, match="has no option"):
        make_strategy("sb3-ppo", algorithm="sac")  # the name fixes the algorithm
    bad: list[dict[str, Any]] = [
        {"noise_decay": 0.0},
        {"noise_sigma": -0.1},
        {"gamma": 1.5},
        {"episodes_per_update": 1},
        {"warmup_episodes": -1},
        {"net_arch": "64"},
        {"net_arch": [64, 0]},
        {"batch_size": True},
        {"learning_rate": 0.0},
        {"reward_baseline": "yes"},
    ]
    for options in bad:
        with pytest.raises(InvalidConfigError):
            make_strategy("sb3-ddpg", **options)


def test_stop_signal_between_episodes(objective: Objective) -> None:
    stop = threading.Event()

    def after_two(p: Progress) -> None:
        if p.done == 2:
            stop.set()

    result = run_search(objective, "sb3-td3", 10, stop=stop, callbacks=[after_two])
    assert len(result.evaluations) == 2
    assert result.stop_reason == "stopped"


def test_time_only_budget(objective: Objective) -> None:
    result = run_search(objective, "sb3-sac", Budget(seconds=1.0), options={"warmup_episodes": 2})
    assert result.stop_reason == "time"
    assert len(result.evaluations) >= 1


@pytest.mark.parametrize("algorithm", ["ddpg", "ppo"])
def test_history_replay(objective: Objective, algorithm: str) -> None:
    name = f"sb3-{algorithm}"
    first = run_search(objective, name, 6, seed=2, options={"warmup_episodes": 2} if algorithm == "ddpg" else None)
    again = run_search(
        objective,
        name,
        6,
        seed=2,
        history=first.evaluations,
        options={"warmup_episodes": 2} if algorithm == "ddpg" else None,
    )
    assert again.replayed == 6
    assert _plans(again) == _plans(first)
    assert [e.reward for e in again.evaluations] == [e.reward for e in first.evaluations]


def test_callers_global_generators_are_left_alone(objective: Objective) -> None:
    import random

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    run_search(objective, "sb3-sac", 3, seed=0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("algorithm", ["ddpg", "sac"])
def test_off_policy_agents_start_from_the_knapsack_plans(objective: Objective, algorithm: str) -> None:
    strategy = make_strategy(f"sb3-{algorithm}", warm_start=2, warmup_episodes=3)
    assert isinstance(strategy, SB3Strategy)
    result = run_search(objective, strategy, 6, max_ratio=0.75, seed=1)
    warm = result.info["warm_start"]
    assert len(warm) == 2 and result.info["sensitivity"]["probes"]
    played = [e.plan.as_dict() for e in result.evaluations[:2]]
    for plan, asked in zip(played, warm, strict=True):  # the first episodes are the knapsack plans, for real
        assert plan == pytest.approx({name: asked.get(name, 0.0) for name in plan}, abs=2e-6)
    assert len(result.evaluations) == 6
    n = len(objective.group_names)
    model = strategy.model
    assert model is not None
    assert model.learning_starts == (3 - 2) * n  # type: ignore[attr-defined]  # two random episodes replaced
    assert model.replay_buffer.size() >= 5 * n  # type: ignore[attr-defined]  # the warm episodes are in it
    stored = model.replay_buffer.actions[:n, 0, 0]  # type: ignore[attr-defined]
    first = [warm[0].get(name, 0.0) for name in objective.group_names]
    assert stored == pytest.approx([2 * r / 0.75 - 1 for r in first], abs=1e-5)
    if algorithm == "ddpg":
        assert strategy.noise is not None and strategy.noise.warmup_episodes == 1
    cold = run_search(objective, f"sb3-{algorithm}", 3, max_ratio=0.75, seed=1)
    assert [e.plan.as_dict() for e in cold.evaluations][:2] != played


def test_ppo_has_no_replay_buffer_to_warm() -> None:
    with pytest.raises(InvalidConfigError, match="ppo has none"):
        make_strategy("sb3-ppo", warm_start=2)
    with pytest.raises(InvalidConfigError, match="warm_start"):
        make_strategy("sb3-ddpg", warm_start=-1)
