"""Honest baselines: one uniform ratio for every group (what Torch-Pruning users do by hand) and random search."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from agents.base import AskTellStrategy, Budget, Ratios, SearchSession, SearchSpace
from autoprune.errors import InvalidConfigError
from autoprune.names import MAX_RATIO

if TYPE_CHECKING:
    from autoprune.objective import Evaluation


class UniformSweep(AskTellStrategy):
    """The same ratio for every group, swept from low to high across the budget.

    With ``ratios`` given, those are tried in order; otherwise ``n`` evenly spaced ratios in
    ``(0, max_ratio]`` where ``n`` is the evaluation budget (steps of ``step`` for a time-only budget). A ratio
    whose rounded widths (every group's, with the plan's ``round_to``) are those of a ratio already asked is
    skipped: it would prune the same model again (as is one that rounds to the unpruned model, the baseline).
    """

    name = "uniform"

    def __init__(self, ratios: tuple[float, ...] | list[float] | None = None, step: float = 0.05) -> None:
        if ratios is not None and (not ratios or any(not 0.0 <= float(r) <= MAX_RATIO for r in ratios)):
            raise InvalidConfigError(f"uniform ratios must be a non-empty list of numbers in [0, {MAX_RATIO}]")
        if not 0.0 < step <= MAX_RATIO:
            raise InvalidConfigError(f"uniform step must be in (0, {MAX_RATIO}], got {step}")
        self.ratios = None if ratios is None else [float(r) for r in ratios]
        self.step = step
        self._queue: list[float] = []
        self._groups: tuple[str, ...] = ()
        self._widths: Callable[[float], tuple[int, ...]] | None = None
        self._asked: set[tuple[int, ...]] = set()
        self._unpruned: tuple[int, ...] | None = None

    def setup(self, space: SearchSpace, budget: Budget, seed: int) -> None:
        self._groups = space.groups
        self._asked = set()
        if self.ratios is not None:
            self._queue = [min(r, space.max_ratio) for r in self.ratios]
        elif budget.evaluations is not None:
            self._queue = [float(r) for r in np.linspace(0.0, space.max_ratio, budget.evaluations + 1)[1:]]
        else:
            n = int(space.max_ratio / self.step + 1e-9)
            self._queue = [self.step * (i + 1) for i in range(n)]

    def run(self, session: SearchSession) -> None:
        objective = session.objective
        if objective.method == "structured":  # ratios that round to the same widths prune the same model
            from autoprune.sensitivity import kept_width

            self._widths = lambda r: tuple(kept_width(objective, g, r) for g in session.space.groups)
            self._unpruned = self._widths(0.0)  # the baseline, evaluated already
        super().run(session)

    def ask(self) -> Ratios | None:
        while self._queue:
            ratio = self._queue.pop(0)
            if self._widths is not None:
                widths = self._widths(ratio)
                if widths in self._asked or widths == self._unpruned:  # the same model again: not evaluated twice
                    continue
                self._asked.add(widths)
            return dict.fromkeys(self._groups, ratio)
        return None

    def tell(self, ratios: Ratios, evaluation: Evaluation) -> None:
        pass


class RandomSearch(AskTellStrategy):
    """Independent ratios per group, uniform in ``[0, max_ratio]``, from a seeded generator."""

    name = "random"

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)
        self._space: SearchSpace | None = None

    def setup(self, space: SearchSpace, budget: Budget, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._space = space

    def ask(self) -> Ratios:
        assert self._space is not None
        values = self._rng.uniform(0.0, self._space.max_ratio, size=len(self._space.groups))
        return dict(zip(self._space.groups, (float(v) for v in values), strict=True))

    def tell(self, ratios: Ratios, evaluation: Evaluation) -> None:
        pass
