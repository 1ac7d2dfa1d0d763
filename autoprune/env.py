"""``autoprune/LayerPrune-v0``: an AMC-style gymnasium environment over a model's prunable groups.

One step per prunable group (in forward order). The action, ``Box(-1, 1, (1,))``, maps to a ratio in
``[0, max_ratio]``. The observation describes the current group (AMC's layer embedding): its index, kind,
input/output channels, kernel, stride, its MACs, the MACs removed so far, the MACs of the groups still to
come, and the previous action, all normalised to ``[0, 1]``. At the end of the episode the plan is applied,
evaluated and *measured* by the :class:`~autoprune.objective.Objective`; the reward combines quality and
measured latency (``mnasnet``, ``budget`` or ``weighted``) and its terms are in ``info``. Intermediate steps
give 0 reward.

With the ``budget`` reward, actions are clipped (as in AMC) so that the latency target stays reachable by a
MAC estimate even if every later group is pruned at ``max_ratio``.

``gymnasium.make("autoprune/LayerPrune-v0")`` with no arguments builds ResNet-20 on digits (weights shipped in
the package) with a real latency meter; pass ``objective=...`` or ``workload=...``, ``meter=...``,
``reward=...`` to choose.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from autoprune import ENV_ID
from autoprune.errors import InvalidConfigError, PruningError
from autoprune.latency import LatencyConfig, LatencyMeter
from autoprune.objective import Evaluation, Objective
from autoprune.plan import MAX_RATIO
from autoprune.pruning import Structure
from autoprune.recovery import RecoveryConfig
from autoprune.reward import RewardConfig, compute_reward

__all__ = ["ENV_ID", "LayerPruneEnv", "estimate_macs"]
KINDS = ("conv", "linear", "recurrent", "attention")
OBS_SIZE = 9 + len(KINDS)


def estimate_macs(structure: Structure, ratios: dict[str, float]) -> float:
    """MACs after pruning, estimated from per-group MACs: each group's share scales by its kept fraction.

    A first-order estimate used only to keep budget actions feasible; candidates are always measured.
    """
    removed = sum(g.macs * ratios.get(g.name, 0.0) for g in structure.groups)
    return max(0.0, structure.total_macs - removed)


class LayerPruneEnv(gym.Env[np.ndarray, np.ndarray]):
    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium reads it as a class attribute

    def __init__(
        self,
        objective: Objective | None = None,
        *,
        workload: str = "resnet20-digits",
        metric: str = "accuracy",
        reward: RewardConfig | None = None,
        meter: LatencyMeter | LatencyConfig | None = None,
        recovery: RecoveryConfig | None = None,
        max_ratio: float = 0.8,
        round_to: int = 8,
    ) -> None:
        super().__init__()
        if not 0.0 < max_ratio <= MAX_RATIO:
            raise InvalidConfigError(f"max_ratio must be in (0, {MAX_RATIO}], got {max_ratio}")
        if objective is None:
            from autoprune.workloads import load_workload

            wl = load_workload(workload)
            objective = Objective(
                wl.model,
                wl.example_inputs,
                wl.dataset.subset(512, 256),
                metric=metric,
                reward=reward,
                latency=meter,
                recovery=recovery,
                round_to=round_to,
            )
        elif reward is not None or meter is not None:
            raise InvalidConfigError("pass reward/meter to the Objective, not to the env, when giving an objective")
        self.objective = objective
        self.structure = objective.structure
        if not self.structure.groups:
            raise InvalidConfigError(self.structure.no_groups_message())
        self.max_ratio = float(max_ratio)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(OBS_SIZE,), dtype=np.float32)
        groups = self.structure.groups
        self._max_in = max(max(g.in_channels for g in groups), 1)
        self._max_units = max(max(g.units for g in groups), 1)
        self._max_kernel = max(max(g.kernel for g in groups), 1)
        self._max_stride = max(max(g.stride for g in groups), 1)
        self._total = max(float(self.structure.total_macs), 1.0)
        self._ratios: dict[str, float] = {}
        self._step = 0
        self._prev = 0.0
        self.last_evaluation: Evaluation | None = None

    # -- helpers ------------------------------------------------------------------------------------------
    def action_to_ratio(self, action: np.ndarray | float) -> float:
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        return (a + 1.0) / 2.0 * self.max_ratio

    def _budget_cap(self, index: int) -> float:
        """Largest ratio for group ``index`` that keeps the MAC target reachable (AMC clipping)."""
        cfg = self.objective.reward_config
        target = cfg.target * self._total
        groups = self.structure.groups
        done = sum(g.macs * self._ratios.get(g.name, 0.0) for g in groups[:index])
        later = sum(g.macs * self.max_ratio for g in groups[index + 1 :])
        needed = self._total - target - done - later  # MACs this group must remove at least
        g = groups[index]
        if g.macs <= 0:
            return self.max_ratio
        return float(np.clip(needed / g.macs, 0.0, self.max_ratio))

    def _observation(self) -> np.ndarray:
        groups = self.structure.groups
        i = min(self._step, len(groups) - 1)
        g = groups[i]
        removed = sum(gr.macs * self._ratios.get(gr.name, 0.0) for gr in groups[:i])
        later = sum(gr.macs for gr in groups[i + 1 :])
        kind = np.zeros(len(KINDS), dtype=np.float32)
        if g.kind in KINDS:
            kind[KINDS.index(g.kind)] = 1.0
        values = [
            i / max(len(groups) - 1, 1),
            g.in_channels / self._max_in,
            g.units / self._max_units,
            g.kernel / self._max_kernel,
            g.stride / self._max_stride,
            g.macs / self._total,
            removed / self._total,
            later / self._total,
            self._prev / self.max_ratio,
        ]
        obs = np.concatenate([np.asarray(values, dtype=np.float32), kind])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # -- gymnasium API ------------------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._ratios = {}
        self._step = 0
        self._prev = 0.0
        return self._observation(), {"group": self.structure.groups[0].name}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        groups = self.structure.groups
        if self._step >= len(groups):
            raise RuntimeError("step() called after the episode ended; call reset()")
        g = groups[self._step]
        ratio = self.action_to_ratio(action)
        info: dict[str, Any] = {"group": g.name, "requested_ratio": ratio}
        if self.objective.reward_config.form == "budget":
            ratio = max(ratio, self._budget_cap(self._step))
        info["ratio"] = ratio
        self._ratios[g.name] = ratio
        self._prev = ratio
        self._step += 1
        if self._step < len(groups):
            return self._observation(), 0.0, False, False, info
        try:
            evaluation = self.objective(self.objective.plan(self._ratios))
        except PruningError as exc:
            # a combination of cuts the model's forward rejects: the episode ends with the reward of a model that
            # lost all quality for no speed-up, and the search goes on
            self.last_evaluation = None
            reward, terms = compute_reward(0.0, 1.0, self.objective.reward_config)
            info.update({"failed": str(exc), "reward_terms": dict(terms), "plan": dict(self._ratios)})
            return self._observation(), float(reward), True, False, info
        self.last_evaluation = evaluation
        info.update(
            {
                "reward_terms": dict(evaluation.reward_terms),
                "quality": evaluation.quality,
                "latency_ms": evaluation.latency_ms,
                "latency_ratio": evaluation.latency_ratio,
                "macs": evaluation.macs,
                "estimated_macs": estimate_macs(self.structure, self._ratios),
                "plan": evaluation.plan.as_dict(),
                "evaluation": evaluation,
            }
        )
        return self._observation(), float(evaluation.reward), True, False, info
