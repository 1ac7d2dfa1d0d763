"""The Pareto archive: non-dominated evaluations (max quality, min measured latency, min size).

Dominance and hypervolume come from ``moocore``. Latency is compared as the ratio to the unpruned model
measured in the same window (see :mod:`autoprune.latency`), size as the bytes needed to ship the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import moocore
import numpy as np

from autoprune.records import Evaluation


def _points(evaluations: Sequence[Evaluation], with_size: bool = True) -> np.ndarray:
    rows = [
        [-e.quality, e.latency_ratio, float(e.storage_bytes)] if with_size else [-e.quality, e.latency_ratio]
        for e in evaluations
    ]
    return np.asarray(rows, dtype=float).reshape(len(rows), 3 if with_size else 2)


def pareto_front(evaluations: Sequence[Evaluation], *, with_size: bool = True) -> list[Evaluation]:
    """The non-dominated evaluations, sorted by latency (duplicates of the same point kept once)."""
    if not evaluations:
        return []
    points = _points(evaluations, with_size)
    mask = moocore.is_nondominated(points, keep_weakly=False)
    front = [e for e, keep in zip(evaluations, mask, strict=True) if keep]
    return sorted(front, key=lambda e: (e.latency_ratio, -e.quality))


def hypervolume(
    evaluations: Sequence[Evaluation], *, ref_latency_ratio: float = 1.0, ref_quality: float = 0.0
) -> float:
    """Area dominated in the (quality, latency ratio) plane up to the reference point.

    The default reference is (quality 0, the unpruned model's latency): only candidates faster than the base
    model add volume. With quality in [0, 1] the result is in [0, 1].
    """
    pts = [[-e.quality, e.latency_ratio] for e in evaluations if e.latency_ratio < ref_latency_ratio]
    pts = [p for p in pts if -p[0] > ref_quality]
    if not pts:
        return 0.0
    return float(moocore.hypervolume(np.asarray(pts, dtype=float), ref=[-ref_quality, ref_latency_ratio]))


class ParetoArchive:
    """Every evaluation of a search, and the front derived from them."""

    def __init__(self, evaluations: Iterable[Evaluation] = ()) -> None:
        self.evaluations: list[Evaluation] = list(evaluations)

    def add(self, evaluation: Evaluation) -> None:
        self.evaluations.append(evaluation)

    def __len__(self) -> int:
        return len(self.evaluations)

    def front(self, *, with_size: bool = True, stage: str | None = None) -> list[Evaluation]:
        pool = [e for e in self.evaluations if stage is None or e.stage == stage]
        return pareto_front(pool, with_size=with_size)

    def hypervolume(self, **kwargs: float) -> float:
        return hypervolume(self.evaluations, **kwargs)

    def best(
        self,
        *,
        max_quality_drop: float | None = None,
        max_latency_ratio: float | None = None,
        key: str = "reward",
    ) -> Evaluation | None:
        """The best evaluation under a named objective.

        ``key="reward"`` maximises the reward; ``key="latency"`` minimises latency subject to
        ``max_quality_drop``; ``key="quality"`` maximises quality subject to ``max_latency_ratio``.
        """
        pool = self.evaluations
        if max_quality_drop is not None:
            pool = [e for e in pool if e.quality_drop <= max_quality_drop]
        if max_latency_ratio is not None:
            pool = [e for e in pool if e.latency_ratio <= max_latency_ratio]
        if not pool:
            return None
        if key == "reward":
            return max(pool, key=lambda e: e.reward)
        if key == "latency":
            return min(pool, key=lambda e: (e.latency_ratio, -e.quality))
        if key == "quality":
            return max(pool, key=lambda e: (e.quality, -e.latency_ratio))
        raise ValueError(f"unknown key {key!r}")
