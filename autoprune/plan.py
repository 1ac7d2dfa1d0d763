"""Pruning plans: which groups to prune, by how much, and how.

A :class:`Plan` is a frozen record. Applying it to the same base model always gives identical weights, so the
database stores plans and rebuilds pruned models from (base model, plan) on demand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from autoprune.errors import InvalidPlanError
from autoprune.names import CRITERIA, MAX_RATIO, METHODS

Method = Literal["structured", "unstructured"]


@dataclass(frozen=True)
class Plan:
    """Per-group pruning ratios plus the settings that decide which channels or weights go.

    ``ratios`` may be given as a mapping; it is stored as a sorted tuple of ``(group, ratio)`` pairs so that
    plans are hashable and compare equal whatever order they were written in. Groups not named keep all
    their channels.
    """

    ratios: tuple[tuple[str, float], ...] = ()
    """``(group name, ratio)`` pairs; a ratio is the fraction of the group's channels (or weights) removed."""
    method: Method = "structured"
    """``structured`` removes channels, neurons, hidden units and heads; ``unstructured`` zeroes weights."""
    criterion: str = "l1"
    """Importance criterion: ``l1``, ``l2``, ``taylor`` (gradient x weight), ``bn_scale``, ``random``."""
    round_to: int = 1
    """Structured only: kept widths are rounded to a multiple of this (8 suits most CPU kernels)."""
    seed: int = 0
    """Seed for the ``random`` criterion."""
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)
    """Free-form annotations (e.g. which strategy proposed the plan); not used when applying it."""

    def __post_init__(self) -> None:
        raw = self.ratios.items() if isinstance(self.ratios, Mapping) else self.ratios
        pairs: dict[str, float] = {}
        for item in raw:
            try:
                name, ratio = item
            except (TypeError, ValueError) as exc:
                raise InvalidPlanError(f"plan entry {item!r} is not a (group, ratio) pair") from exc
            if isinstance(ratio, bool) or not isinstance(ratio, int | float):  # "0.5" or True is a mistake
                raise InvalidPlanError(
                    f"plan entry ({name!r}, {ratio!r}) is not a (group, ratio) pair: the ratio must be a number"
                )
            ratio = float(ratio)
            if not isinstance(name, str) or not name:
                raise InvalidPlanError(f"plan group names must be non-empty strings, got {name!r}")
            if name in pairs:
                raise InvalidPlanError(f"plan names group {name!r} twice")
            if not math.isfinite(ratio) or not 0.0 <= ratio <= MAX_RATIO:
                raise InvalidPlanError(f"ratio for {name!r} must be in [0, {MAX_RATIO}], got {ratio}")
            pairs[name] = ratio
        object.__setattr__(self, "ratios", tuple(sorted(pairs.items())))
        if isinstance(self.extra, Mapping):
            object.__setattr__(self, "extra", tuple(sorted(self.extra.items())))
        if self.method not in METHODS:
            raise InvalidPlanError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.criterion not in CRITERIA:
            raise InvalidPlanError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise InvalidPlanError(f"round_to must be a positive integer, got {self.round_to!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):  # else torch.manual_seed fails later
            raise InvalidPlanError(f"seed must be an integer, got {self.seed!r}")

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, groups: Iterable[str], ratio: float, **settings: Any) -> Plan:
        """The same ratio for every group (what Torch-Pruning users do by hand)."""
        return cls(ratios=tuple((g, ratio) for g in groups), **settings)

    def with_ratios(self, ratios: Mapping[str, float]) -> Plan:
        return Plan(
            ratios=tuple(ratios.items()),
            method=self.method,
            criterion=self.criterion,
            round_to=self.round_to,
            seed=self.seed,
            extra=self.extra,
        )

    # -- access -------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, float]:
        return dict(self.ratios)

    def ratio(self, group: str) -> float:
        return self.as_dict().get(group, 0.0)

    @property
    def is_identity(self) -> bool:
        return all(r == 0.0 for _, r in self.ratios)

    def validate_against(self, group_names: Iterable[str]) -> None:
        """Raise :class:`InvalidPlanError` if the plan names groups the model does not have."""
        known = set(group_names)
        unknown = [name for name, _ in self.ratios if name not in known]
        if unknown:
            import difflib

            hints = []
            for name in unknown[:3]:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise InvalidPlanError(
                f"plan names {len(unknown)} group(s) the model does not have: {', '.join(hints)}; "
                f"known groups: {', '.join(sorted(known)[:12])}{' ...' if len(known) > 12 else ''}"
            )

    # -- JSON ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "ratios": self.as_dict(),
            "method": self.method,
            "criterion": self.criterion,
            "round_to": self.round_to,
            "seed": self.seed,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Plan:
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise InvalidPlanError(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise InvalidPlanError("a plan must be a JSON object")
        allowed = {"ratios", "method", "criterion", "round_to", "seed", "extra"}
        unknown = set(data) - allowed
        if unknown:
            raise InvalidPlanError(f"unknown plan keys: {', '.join(sorted(unknown))}")
        ratios = data.get("ratios", {})
        if not isinstance(ratios, Mapping):
            raise InvalidPlanError("plan 'ratios' must be an object mapping group names to ratios")
        if not isinstance(data.get("extra") or {}, Mapping):
            raise InvalidPlanError("plan 'extra' must be an object")
        return cls(
            ratios=tuple(ratios.items()),
            method=data.get("method", "structured"),
            criterion=data.get("criterion", "l1"),
            round_to=data.get("round_to", 1),
            seed=data.get("seed", 0),
            extra=tuple(dict(data.get("extra") or {}).items()),
        )
