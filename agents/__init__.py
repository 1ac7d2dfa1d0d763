"""Search strategies over pruning plans, and the one loop that runs them.

The registry maps names to lazily imported strategies: validating a name (``check_strategy``) imports neither
torch nor Optuna nor stable-baselines3, so the API process can use it.

    from agents import run_search, Budget
    result = run_search(objective, "optuna-tpe", Budget(evaluations=30), seed=0)
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidConfigError

if TYPE_CHECKING:
    from agents.base import Budget, SearchSession, SearchSpace, Strategy, run_search
    from agents.result import SearchResult

__all__ = [
    "STRATEGIES",
    "Budget",
    "SearchResult",
    "SearchSession",
    "SearchSpace",
    "Strategy",
    "StrategyInfo",
    "check_strategy",
    "list_strategies",
    "make_strategy",
    "run_search",
]


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    target: str
    """``module:Class``, imported only when the strategy is made."""
    summary: str
    defaults: tuple[tuple[str, Any], ...] = ()
    """Constructor keywords fixed by this name (e.g. the SB3 algorithm)."""


STRATEGIES: dict[str, StrategyInfo] = {
    s.name: s
    for s in (
        StrategyInfo(
            "uniform",
            "agents.baselines:UniformSweep",
            "one ratio for every group, swept low to high (the Torch-Pruning user's baseline)",
        ),
        StrategyInfo("random", "agents.baselines:RandomSearch", "independent uniform ratios per group"),
        StrategyInfo("optuna-tpe", "agents.optuna_search:OptunaTPE", "Optuna TPE on the scalar reward"),
        StrategyInfo(
            "optuna-nsga2", "agents.optuna_search:OptunaNSGA2", "Optuna NSGA-II on (quality, measured latency)"
        ),
        StrategyInfo(
            "sb3-ddpg", "agents.rl:SB3Strategy", "DDPG as in AMC, on the LayerPrune env", (("algorithm", "ddpg"),)
        ),
        StrategyInfo("sb3-td3", "agents.rl:SB3Strategy", "TD3 on the LayerPrune env", (("algorithm", "td3"),)),
        StrategyInfo("sb3-sac", "agents.rl:SB3Strategy", "SAC on the LayerPrune env", (("algorithm", "sac"),)),
        StrategyInfo("sb3-ppo", "agents.rl:SB3Strategy", "PPO on the LayerPrune env", (("algorithm", "ppo"),)),
    )
}


def list_strategies() -> list[StrategyInfo]:
    return list(STRATEGIES.values())


def check_strategy(name: str) -> StrategyInfo:
    """The registered strategy called ``name``; :class:`InvalidConfigError` naming the choices otherwise."""
    info = STRATEGIES.get(name) if isinstance(name, str) else None
    if info is None:
        raise InvalidConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return info


def _load(info: StrategyInfo) -> type:
    module, _, attr = info.target.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def strategy_options(name: str) -> dict[str, Any]:
    """Constructor options a strategy accepts (name -> default), without the ones its name fixes."""
    info = check_strategy(name)
    params = inspect.signature(_load(info)).parameters
    fixed = dict(info.defaults)
    return {
        p.name: p.default
        for p in params.values()
        if p.name not in fixed and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def make_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy called ``name`` with ``options`` (unknown options are an error)."""
    info = check_strategy(name)
    allowed = strategy_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        choices = ", ".join(sorted(allowed)) or "none"
        raise InvalidConfigError(f"strategy {name!r} has no option(s) {', '.join(unknown)}; options: {choices}")
    strategy = _load(info)(**dict(info.defaults), **options)
    strategy.name = name
    return strategy  # type: ignore[no-any-return]


def __getattr__(name: str) -> Any:
    lazy = {
        "Budget": "agents.base",
        "SearchSession": "agents.base",
        "SearchSpace": "agents.base",
        "Strategy": "agents.base",
        "run_search": "agents.base",
        "SearchResult": "agents.result",
    }
    if name in lazy:
        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
