"""stable-baselines3 agents on the ``LayerPrune`` env: DDPG as in AMC, TD3, SAC and PPO.

The strategy wraps the session's recording objective in :class:`~autoprune.env.LayerPruneEnv` (one step per
prunable group, the plan evaluated at the end of each episode) and calls SB3's ``learn``. Every episode is one
evaluation through the session, so budget, history replay and progress callbacks behave as for the ask/tell
strategies; an SB3 callback ends learning as soon as the session says stop (budget spent, time up, stop
signal), and a stop that arrives mid-evaluation surfaces as :class:`~agents.base.SearchStopped`.

Choices (AMC, He et al. 2018, adapted to SB3):

* **Discount** ``gamma = 1.0``. The reward is sparse: only the last step of an episode (the evaluated plan)
  carries it, and episodes are short and always terminate. With ``gamma = 1`` every step's value is the
  expected final reward, which is what AMC gets by copying the final reward onto every transition (with its
  discount of 1); a discount < 1 would only make early groups look less important.
* **Warm-up** (DDPG/TD3/SAC): the first ``warmup_episodes`` episodes take uniformly random actions
  (``learning_starts = warmup_episodes x groups``) and no exploration noise.
* **Exploration** (DDPG/TD3): Gaussian noise added to the action in action units (the env's ``[-1, 1]``),
  ``sigma = 0.5`` on the first episode after warm-up, multiplied by ``noise_decay = 0.95`` after each later
  episode (:class:`DecayingNormalNoise`, its own seeded generator). SAC explores through its own entropy term.
* **Reward baseline** (off-policy algorithms): the final reward minus an exponential moving average of past
  final rewards (:class:`MovingBaselineReward`). AMC subtracts the average from each sampled batch at update
  time; here it is subtracted when the transition is collected, so older transitions in the replay buffer keep
  the baseline of their time, a small bias that keeps the wrapper a plain gymnasium wrapper. PPO normalises
  its advantages itself and learns a value baseline, so it sees the raw reward.
* **Updates**: off-policy algorithms train once per episode, as many gradient steps as the episode had steps
  (AMC updates after each episode). PPO collects ``episodes_per_update`` whole episodes per rollout
  (``n_steps = episodes_per_update x groups``), in two minibatches, for ``n_epochs`` epochs.

Same seed and a deterministic objective give the same plans: SB3 is seeded with the session's seed, the env
and the noise draw from seeded generators, and the device is the CPU. SB3 seeds and draws from Python's,
NumPy's and torch's global generators; :meth:`SB3Strategy.run` restores them afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DDPG, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise

from agents.base import Budget, SearchSession
from agents.knapsack import StoredProbes
from autoprune.env import LayerPruneEnv
from autoprune.errors import InvalidConfigError

if TYPE_CHECKING:
    pass

__all__ = ["ALGORITHMS", "DecayingNormalNoise", "MovingBaselineReward", "SB3Strategy"]

ALGORITHMS = ("ddpg", "td3", "sac", "ppo")
OFF_POLICY = ("ddpg", "td3", "sac")
_TIME_ONLY_TIMESTEPS = 10**12
"""``learn`` horizon for a time-only budget: the session's stop ends learning long before."""
_TIME_ONLY_BUFFER = 100_000


class DecayingNormalNoise(ActionNoise):
    """Gaussian action noise that is off during warm-up and decays by ``decay`` after every later episode.

    SB3 calls :meth:`reset` at the end of each episode (and once when ``learn`` starts: a reset with no action
    since the previous one ends no episode and is not counted). Episode ``e`` (0-based) draws with
    ``sigma * decay ** (e - warmup_episodes)`` for ``e >= warmup_episodes`` and adds nothing before.
    Draws come from a private generator seeded with ``seed``.
    """

    def __init__(
        self, sigma: float, decay: float, *, warmup_episodes: int = 0, size: int = 1, seed: int | None = 0
    ) -> None:
        super().__init__()
        self.initial_sigma = float(sigma)
        self.decay = float(decay)
        self.warmup_episodes = int(warmup_episodes)
        self.size = int(size)
        self.episodes = 0
        self._actions = 0  # noise requests (one per action) since the last reset
        self._sigma = float(sigma)
        self._rng = np.random.default_rng(seed)

    @property
    def sigma(self) -> float:
        """The standard deviation used in the current episode (0 during warm-up)."""
        return 0.0 if self.episodes < self.warmup_episodes else self._sigma

    def __call__(self) -> np.ndarray:
        self._actions += 1
        if self.episodes < self.warmup_episodes:
            return np.zeros(self.size, dtype=np.float32)
        return self._rng.normal(0.0, self._sigma, size=self.size).astype(np.float32)

    def reset(self) -> None:
        if self._actions == 0:
            return
        self._actions = 0
        self.episodes += 1
        if self.episodes > self.warmup_episodes:
            self._sigma *= self.decay

    def __repr__(self) -> str:
        return f"DecayingNormalNoise(sigma={self.sigma}, decay={self.decay}, episodes={self.episodes})"


class MovingBaselineReward(gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray]):
    """AMC's reward normalisation: the final reward of an episode minus a moving baseline of past ones.

    At the end of an episode with raw reward ``r`` the agent sees ``r - b`` (``b`` is the baseline before this
    episode; the first episode sets ``b = r`` and so sees 0), then ``b <- b + alpha * (r - b)``. Steps that do
    not end an episode pass their (zero) reward through. ``info`` gains ``raw_reward`` and ``reward_baseline``
    at the end of each episode.
    """

    def __init__(self, env: gym.Env[np.ndarray, np.ndarray], alpha: float = 0.5) -> None:
        super().__init__(env)
        if not 0.0 < alpha <= 1.0:
            raise InvalidConfigError(f"baseline alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.baseline: float | None = None

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if not (terminated or truncated):
            return obs, float(reward), terminated, truncated, info
        raw = float(reward)
        before = raw if self.baseline is None else self.baseline
        self.baseline = before + self.alpha * (raw - before)
        info = {**info, "raw_reward": raw, "reward_baseline": before}
        return obs, raw - before, terminated, truncated, info


class _StopWhenSessionStops(BaseCallback):
    """Ends ``learn`` (``on_step`` returns False) once the session's budget is spent or a stop was requested."""

    def __init__(self, session: SearchSession) -> None:
        super().__init__(verbose=0)
        self.session = session

    def _on_step(self) -> bool:
        return not self.session.should_stop()


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidConfigError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class SB3Strategy(StoredProbes):
    """An SB3 agent choosing one ratio per group, episode by episode; ``algorithm`` is ddpg, td3, sac or ppo.

    Options (all keyword):

    * ``warmup_episodes``: random-action episodes before learning (off-policy algorithms); default
      ``max(1, min(10, evaluations // 4))``, 10 for a time-only budget.
    * ``noise_sigma``, ``noise_decay``: DDPG/TD3 exploration noise (action units) and its per-episode decay.
    * ``reward_baseline``: subtract a moving baseline from the reward (default: on for ddpg/td3/sac, off for
      ppo); ``baseline_alpha`` is its update rate.
    * ``gamma``: discount (default 1.0, see the module docstring).
    * ``learning_rate``: default SB3's per algorithm (1e-3 DDPG/TD3, 3e-4 SAC/PPO).
    * ``net_arch``: hidden layers of actor and critic.
    * ``batch_size``: replay minibatch (off-policy algorithms).
    * ``episodes_per_update``, ``n_epochs``: PPO rollout length (in episodes) and epochs per update.
    * ``warm_start``: off-policy algorithms first play this many knapsack plans (:mod:`agents.knapsack`:
      measured latency table, least predicted loss per latency target) as episodes, their transitions stored
      in the replay buffer, in place of as many random warm-up episodes: exploration starts from them.

    After :meth:`run`, ``model`` is the trained SB3 model and ``noise`` the exploration noise (DDPG/TD3).
    """

    name = "sb3"

    def __init__(
        self,
        algorithm: str = "ddpg",
        *,
        warmup_episodes: int | None = None,
        noise_sigma: float = 0.5,
        noise_decay: float = 0.95,
        reward_baseline: bool | None = None,
        baseline_alpha: float = 0.5,
        gamma: float = 1.0,
        learning_rate: float | None = None,
        net_arch: Sequence[int] = (64, 64),
        batch_size: int = 64,
        episodes_per_update: int = 4,
        n_epochs: int = 4,
        warm_start: int = 0,
    ) -> None:
        if not isinstance(algorithm, str) or algorithm.strip().lower() not in ALGORITHMS:
            raise InvalidConfigError(f"unknown SB3 algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        self.algorithm = algorithm.strip().lower()
        self.name = f"sb3-{self.algorithm}"
        self.warmup_episodes = None if warmup_episodes is None else _integer("warmup_episodes", warmup_episodes, 0)
        self.noise_sigma = _number("noise_sigma", noise_sigma, 0.0, 2.0)
        self.noise_decay = _number("noise_decay", noise_decay, 0.0, 1.0, low_open=True)
        if reward_baseline is not None and not isinstance(reward_baseline, bool):
            raise InvalidConfigError(f"reward_baseline must be true, false or null, got {reward_baseline!r}")
        self.reward_baseline = reward_baseline
        self.baseline_alpha = _number("baseline_alpha", baseline_alpha, 0.0, 1.0, low_open=True)
        self.gamma = _number("gamma", gamma, 0.0, 1.0, low_open=True)
        self.learning_rate = (
            None if learning_rate is None else _number("learning_rate", learning_rate, 0.0, 1.0, low_open=True)
        )
        if isinstance(net_arch, str | bytes) or not isinstance(net_arch, Sequence):
            raise InvalidConfigError(f"net_arch must be a list of layer widths, got {net_arch!r}")
        self.net_arch = tuple(_integer("net_arch width", w, 1) for w in net_arch)
        self.batch_size = _integer("batch_size", batch_size, 1)
        self.episodes_per_update = _integer("episodes_per_update", episodes_per_update, 2)
        self.n_epochs = _integer("n_epochs", n_epochs, 1)
        self.warm_start = _integer("warm_start", warm_start, 0)
        if self.warm_start and self.algorithm == "ppo":
            raise InvalidConfigError("warm_start fills the replay buffer of ddpg, td3 or sac; ppo has none")
        self.model: BaseAlgorithm | None = None
        self.noise: DecayingNormalNoise | None = None
        self._info: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        """The latency table and the plans of the warm start, if there was one."""
        return dict(self._info)

    # -- derived settings ---------------------------------------------------------------------------------
    def warmup(self, budget: Budget) -> int:
        """Warm-up episodes with random actions (0 for PPO)."""
        if self.algorithm == "ppo":
            return 0
        if self.warmup_episodes is not None:
            return self.warmup_episodes
        if budget.evaluations is None:
            return 10
        return max(1, min(10, budget.evaluations // 4))

    def uses_baseline(self) -> bool:
        return self.algorithm in OFF_POLICY if self.reward_baseline is None else self.reward_baseline

    # -- the search ---------------------------------------------------------------------------------------
    def make_env(self, session: SearchSession) -> gym.Env[np.ndarray, np.ndarray]:
        env: gym.Env[np.ndarray, np.ndarray] = LayerPruneEnv(
            session.recording_objective(),  # type: ignore[arg-type]  # an Objective stand-in
            max_ratio=session.space.max_ratio,
        )
        if self.uses_baseline():
            env = MovingBaselineReward(env, self.baseline_alpha)
        return env

    def make_model(self, env: gym.Env[np.ndarray, np.ndarray], session: SearchSession) -> BaseAlgorithm:
        n_groups = len(session.space.groups)
        common: dict[str, Any] = {
            "policy": "MlpPolicy",
            "env": env,
            "gamma": self.gamma,
            "policy_kwargs": {"net_arch": list(self.net_arch)},
            "seed": session.seed,
            "device": "cpu",
            "verbose": 0,
        }
        if self.learning_rate is not None:
            common["learning_rate"] = self.learning_rate
        if self.algorithm == "ppo":
            n_steps = self.episodes_per_update * n_groups
            return PPO(
                **common,
                n_steps=n_steps,
                batch_size=n_steps // 2 if n_steps % 2 == 0 else n_steps,
                n_epochs=self.n_epochs,
            )
        evaluations = session.budget.evaluations
        buffer = _TIME_ONLY_BUFFER if evaluations is None else max((evaluations + 1) * n_groups, 2)
        off_policy: dict[str, Any] = {
            "learning_starts": self.warmup(session.budget) * n_groups,
            "batch_size": self.batch_size,
            "buffer_size": buffer,
            "train_freq": (1, "episode"),
            "gradient_steps": -1,  # as many as the episode had steps
        }
        if self.algorithm == "sac":
            return SAC(**common, **off_policy)
        self.noise = DecayingNormalNoise(
            self.noise_sigma, self.noise_decay, warmup_episodes=self.warmup(session.budget), seed=session.seed
        )
        cls = DDPG if self.algorithm == "ddpg" else TD3
        return cls(**common, **off_policy, action_noise=self.noise)

    def run(self, session: SearchSession) -> None:
        if session.should_stop():
            return
        # SB3 seeds (and then draws from) Python's, NumPy's and torch's global generators; give the caller's
        # generators back as they were, so a search leaves no trace on the rest of the process
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                self._learn(session)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _learn(self, session: SearchSession) -> None:
        env = self.make_env(session)
        self.noise = None
        self.model = self.make_model(env, session)
        # SB3's default logger makes a SB3-<timestamp> folder in /tmp on every learn(); ours writes nowhere
        from stable_baselines3.common.logger import Logger

        self.model.set_logger(Logger(folder=None, output_formats=[]))
        n_groups = len(session.space.groups)
        if self.warm_start:
            self._play_warm_start(session, n_groups)
            if session.should_stop():
                return
        remaining = session.remaining
        # one episode per evaluation; one spare so that the session's stop, not the horizon, ends learning
        timesteps = _TIME_ONLY_TIMESTEPS if remaining is None else (remaining + 1) * n_groups
        try:
            self.model.learn(total_timesteps=timesteps, callback=_StopWhenSessionStops(session))
        finally:
            env.close()

    def _play_warm_start(self, session: SearchSession, n_groups: int) -> None:
        """Play the knapsack plans as episodes through the model's own (vectorised) env, store their
        transitions with SB3's own ``_store_transition`` (what ``collect_rollouts`` calls: terminal observations,
        VecNormalize), and shorten the random warm-up by as many episodes."""
        from agents.knapsack import knapsack_plans

        model = self.model
        assert model is not None
        table, plans = knapsack_plans(session, self.warm_start, table=self._restored)
        self.table = table
        self._info = {"sensitivity": table.to_json(), "warm_start": [dict(p) for p in plans]}
        env, buffer = model.get_env(), getattr(model, "replay_buffer", None)
        assert env is not None and buffer is not None
        inner: LayerPruneEnv = env.envs[0].unwrapped  # type: ignore[attr-defined]  # a DummyVecEnv of one
        order = [g.name for g in inner.structure.groups]
        played = 0
        for plan in plans:
            if session.should_stop():
                break
            model._last_obs = env.reset()  # type: ignore[assignment]  # what _store_transition reads
            for name in order:
                ratio = float(plan.get(name, 0.0))
                # the action space is Box(-1, 1): the env's action is already SB3's normalised buffer action
                action = np.array([[2.0 * ratio / inner.max_ratio - 1.0]], dtype=np.float32).clip(-1.0, 1.0)
                new_obs, rewards, dones, infos = env.step(action)
                model._store_transition(buffer, action, new_obs, rewards, dones, infos)  # type: ignore[attr-defined]
                if dones[0]:
                    break
            played += 1
        left = max(0, self.warmup(session.budget) - played)
        model.learning_starts = left * n_groups  # type: ignore[attr-defined]
        if self.noise is not None:
            self.noise.warmup_episodes = left
