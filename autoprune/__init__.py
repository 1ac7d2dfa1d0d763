"""autoprune: prune a PyTorch model for the hardware it runs on, with latency measured in the loop.

Importing the package registers the gymnasium environment ``autoprune/LayerPrune-v0``; the heavier pieces are
imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Plan": "autoprune.plan",
    "Objective": "autoprune.objective",
    "Evaluation": "autoprune.objective",
    "ParetoArchive": "autoprune.pareto",
    "LatencyConfig": "autoprune.latency",
    "Meter": "autoprune.latency",
    "analyze": "autoprune.pruning",
    "apply_plan": "autoprune.pruning",
    "build_model": "autoprune.models.registry",
    "load_dataset": "autoprune.data",
    "Dataset": "autoprune.data",
    "as_dataset": "autoprune.data",
    "RecoveryConfig": "autoprune.recovery",
    "RewardConfig": "autoprune.reward",
    "search": "autoprune.job",
    "JobSpec": "autoprune.job",
    "finetune": "autoprune.recovery",
    "recover": "autoprune.recovery",
    "PolynomialDecay": "autoprune.gradual",
    "gradual_magnitude_prune": "autoprune.gradual",
    "iterative_prune": "autoprune.gradual",
    "strip": "autoprune.gradual",
    "find_ticket": "autoprune.lottery",
    "random_reinit": "autoprune.lottery",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


ENV_ID = "autoprune/LayerPrune-v0"


def _register_env() -> None:
    """Register the env by entry-point string: gymnasium imports ``autoprune.env`` (and torch) only on make()."""
    try:
        import gymnasium
    except ImportError:  # pragma: no cover - gymnasium is a dependency; keep the library importable without it
        return
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="autoprune.env:LayerPruneEnv", nondeterministic=True)


_register_env()
