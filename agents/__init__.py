"""Search strategies over pruning plans, and the one loop that runs them.

The registry maps names to lazily imported strategies: validating a name (``check_strategy``) imports neither
torch nor Optuna nor stable-baselines3, so the API process can use it.

    from agents import run_search, Budget
    result = run_search(objective, "optuna-tpe", Budget(evaluations=30), seed=0)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidConfigError

if TYPE_CHECKING:
    from agents.base import Budget, CallbackList, SearchCallback, SearchSession, SearchSpace, Strategy, run_search
    from agents.result import SearchResult, Selection

__all__ = [
    "STORAGE_OPTIONS",
    "STRATEGIES",
    "Budget",
    "CallbackList",
    "SearchCallback",
    "SearchResult",
    "SearchSession",
    "SearchSpace",
    "Selection",
    "Strategy",
    "StrategyInfo",
    "check_options",
    "check_strategy",
    "list_strategies",
    "make_strategy",
    "run_search",
]


STORAGE_OPTIONS = frozenset({"storage", "study_name"})
"""Options that name a database, or a study in one. A local user's choice from the CLI or Python; in the
service they are operator configuration (``AUTOPRUNE_STUDY_STORAGE``): the API refuses them in a job, since a
caller could otherwise make a worker create files, probe hosts or write into the service's own database."""


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    target: str
    """``module:Class``, imported only when the strategy is made."""
    summary: str
    defaults: tuple[tuple[str, Any], ...] = ()
    """Constructor keywords fixed by this name (e.g. the SB3 algorithm)."""
    options: tuple[str, ...] = ()
    """Options a user may set (constructor keywords); declared here so that validating them imports nothing.
    A test checks them against the constructors."""


_SB3_OPTIONS = (
    "baseline_alpha",
    "batch_size",
    "episodes_per_update",
    "gamma",
    "learning_rate",
    "n_epochs",
    "net_arch",
    "noise_decay",
    "noise_sigma",
    "reward_baseline",
    "warmup_episodes",
)
_SB3_OFF_POLICY_OPTIONS = tuple(sorted((*_SB3_OPTIONS, "warm_start")))  # PPO's constructor refuses warm_start > 0

STRATEGIES: dict[str, StrategyInfo] = {
    s.name: s
    for s in (
        StrategyInfo(
            "uniform",
            "agents.baselines:UniformSweep",
            "one ratio for every group, swept low to high (the Torch-Pruning user's baseline; deterministic, no seed)",
            options=("ratios", "step"),
        ),
        StrategyInfo("random", "agents.baselines:RandomSearch", "independent uniform ratios per group"),
        StrategyInfo(
            "knapsack",
            "agents.knapsack:KnapsackSearch",
            "latency-guided: each group probed alone (measured latency, quality), then a knapsack per target "
            "(deterministic given its probes, no seed)",
            options=("probe_ratios", "min_target", "staircase_step", "focus_drop"),
        ),
        StrategyInfo(
            "optuna-tpe",
            "agents.optuna_search:OptunaTPE",
            "Optuna TPE on the scalar reward",
            options=("n_startup_trials", "storage", "study_name", "warm_start"),
        ),
        StrategyInfo(
            "optuna-nsga2",
            "agents.optuna_search:OptunaNSGA2",
            "Optuna NSGA-II on (quality, measured latency)",
            options=("population_size", "storage", "study_name", "warm_start"),
        ),
        StrategyInfo(
            "sb3-ddpg",
            "agents.rl:SB3Strategy",
            "DDPG as in AMC, on the LayerPrune env",
            (("algorithm", "ddpg"),),
            _SB3_OFF_POLICY_OPTIONS,
        ),
        StrategyInfo(
            "sb3-td3",
            "agents.rl:SB3Strategy",
            "TD3 on the LayerPrune env",
            (("algorithm", "td3"),),
            _SB3_OFF_POLICY_OPTIONS,
        ),
        StrategyInfo(
            "sb3-sac",
            "agents.rl:SB3Strategy",
            "SAC on the LayerPrune env",
            (("algorithm", "sac"),),
            _SB3_OFF_POLICY_OPTIONS,
        ),
        StrategyInfo(
            "sb3-ppo",
            "agents.rl:SB3Strategy",
            "PPO on the LayerPrune env",
            (("algorithm", "ppo"),),
            _SB3_OFF_POLICY_OPTIONS,
        ),
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


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """:class:`InvalidConfigError` for options the strategy does not have (imports nothing)."""
    info = check_strategy(name)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        choices = ", ".join(info.options) or "none"
        raise InvalidConfigError(f"strategy {name!r} has no option(s) {', '.join(unknown)}; options: {choices}")


def strategy_options(name: str) -> dict[str, Any]:
    """Constructor options a strategy accepts (name -> default), without the ones its name fixes (imports it)."""
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
    check_options(name, options)
    strategy = _load(info)(**dict(info.defaults), **options)
    strategy.name = name
    return strategy  # type: ignore[no-any-return]


def __getattr__(name: str) -> Any:
    lazy = {
        "Budget": "agents.base",
        "CallbackList": "agents.base",
        "SearchCallback": "agents.base",
        "SearchSession": "agents.base",
        "SearchSpace": "agents.base",
        "Strategy": "agents.base",
        "run_search": "agents.base",
        "SearchResult": "agents.result",
        "Selection": "agents.result",
    }
    if name in lazy:
        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
