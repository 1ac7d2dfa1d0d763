"""Rewards that combine quality and measured latency.

Latency enters as the *ratio* to the unpruned model measured in the same window (the figure that survives a
noisy machine); ``target`` is the latency the user wants, as a fraction of the unpruned model's.

* ``mnasnet``: ``quality * (ratio / target) ** w`` with ``w = -0.07`` (MnasNet's soft constraint).
* ``budget``: AMC-style hard budget. The environment clips actions so that the target stays reachable (by a MAC
  estimate); the reward is the quality, minus ``penalty * (ratio / target - 1)`` when the *measured* latency
  still misses the target.
* ``weighted``: ``quality - weight * ratio``, a plain trade-off.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoprune.errors import InvalidConfigError
from autoprune.names import FORMS


@dataclass(frozen=True)
class RewardConfig:
    """How quality and latency combine into one number (higher is better)."""

    form: str = "mnasnet"
    """``mnasnet``, ``budget`` or ``weighted``."""
    target: float = 0.5
    """Target latency as a fraction of the unpruned model's measured latency."""
    exponent: float = -0.07
    """``mnasnet``: the exponent ``w`` (negative: slower than target is penalised, faster rewarded)."""
    penalty: float = 1.0
    """``budget``: reward lost per unit of relative overshoot of the measured latency."""
    weight: float = 0.5
    """``weighted``: reward lost per unit of latency ratio."""

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise InvalidConfigError(f"unknown reward form {self.form!r}; choose one of {', '.join(FORMS)}")
        if not 0 < self.target <= 2:
            raise InvalidConfigError(f"reward target must be a latency ratio in (0, 2], got {self.target}")
        if self.exponent > 0:
            raise InvalidConfigError(f"mnasnet exponent must be <= 0, got {self.exponent}")
        if self.penalty < 0 or self.weight < 0:
            raise InvalidConfigError("reward penalty and weight must be >= 0")


def compute_reward(quality: float, latency_ratio: float, config: RewardConfig) -> tuple[float, dict[str, float]]:
    """The reward and its named terms (kept in every Evaluation and in the env's ``info``)."""
    terms: dict[str, float] = {"quality": quality, "latency_ratio": latency_ratio, "target": config.target}
    if config.form == "mnasnet":
        factor = (max(latency_ratio, 1e-9) / config.target) ** config.exponent
        terms["latency_factor"] = factor
        value = quality * factor
    elif config.form == "budget":
        overshoot = max(0.0, latency_ratio / config.target - 1.0)
        terms["overshoot"] = overshoot
        terms["penalty"] = config.penalty * overshoot
        value = quality - config.penalty * overshoot
    else:
        terms["latency_cost"] = config.weight * latency_ratio
        value = quality - config.weight * latency_ratio
    return float(value), terms
