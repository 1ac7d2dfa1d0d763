"""Per-group sensitivity: a measured latency table and quality probes, and the knapsack that plans from them.

:func:`profile_groups` prunes **one group at a time** at each probe ratio (every other group intact), recovers it
as every candidate is recovered (BatchNorm re-estimation), scores it on the validation split and measures its
latency interleaved with the unpruned model, in the objective's runtime, threads and batch size (the
objective's latency cache times each pruned shape once). That is a :class:`SensitivityTable`: for each group
and kept width, what the cut saves in measured time and what it costs in quality. The widths are the plan's
rounded widths, so the table shows the staircase: two ratios that round to the same width cost the same (measured
once), a ratio that rounds to the group's full width cuts nothing (recorded as ``skipped``, not measured), and a
width that runs slower than a wider one (odd widths in some kernels) is visible as a negative saving.

:meth:`SensitivityTable.solve` is the multiple-choice knapsack of latency-aware pruning (HALP, NeurIPS'22: a
latency table and importance, one choice per group): the probe level per group that loses the least predicted
quality while the predicted latency stays within a target. Predictions are additive over groups (savings add;
quality drops add), scaled by calibration factors that a caller fits from real evaluations
(:meth:`SensitivityTable.calibration`), because cuts interact: two neighbouring groups share the layers between
them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidConfigError, PruningError
from autoprune.names import MAX_RATIO

if TYPE_CHECKING:
    from autoprune.objective import Evaluation, Objective

__all__ = [
    "PROBE_RATIOS",
    "STEP_TOLERANCE",
    "Probe",
    "SensitivityTable",
    "WidthTiming",
    "isotonic",
    "kept_width",
    "profile_groups",
    "width_ratio",
]

PROBE_RATIOS = (0.125, 0.25, 0.5, 0.75)
"""The default probe levels (a level that rounds to the full width or to an already probed width costs nothing)."""
STEP_TOLERANCE = 0.01
"""The smallest drop of the fitted latency ratio (a fraction of the unpruned latency) that counts as a step of the
staircase: narrower widths that save less than this over the last admissible width are not admissible."""


def width_ratio(units: int, width: int) -> float:
    """The ratio that keeps exactly ``width`` of ``units`` in a plan with ``round_to=1`` (rounded up to 1e-6, so a
    search space's rounding to 1e-6 keeps it and the pruner's floor still gives ``width``)."""
    if not 1 <= width <= units:
        raise InvalidConfigError(f"width {width} is not in [1, {units}]")
    return math.ceil((units - width) / units * 1e6 - 1e-6) / 1e6


def isotonic(points: Sequence[tuple[int, float]]) -> dict[int, float]:
    """The least-squares fit of ``(width, latency)`` points that never gets faster with more width
    (scikit-learn's isotonic regression): measurement noise pooled into a staircase of plateaus, one fitted
    latency per width."""
    from sklearn.isotonic import IsotonicRegression

    widths = [float(w) for w, _ in points]
    fitted = IsotonicRegression(increasing=True).fit_transform(widths, [float(y) for _, y in points])
    return {int(w): float(y) for w, y in zip(widths, fitted, strict=True)}


@dataclass(frozen=True)
class WidthTiming:
    """One group pruned alone to one width, timed only (no recovery, no scoring): a point of its staircase."""

    group: str
    width: int
    latency_ratio: float

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "width": self.width, "latency_ratio": self.latency_ratio}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WidthTiming:
        try:
            return cls(str(data["group"]), int(data["width"]), float(data["latency_ratio"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(f"not a width timing record: {exc!r}") from exc


@dataclass(frozen=True)
class Probe:
    """One group pruned alone at one ratio."""

    group: str
    ratio: float
    """The ratio asked for (the plan rounds the kept width to ``round_to``)."""
    width: int | None
    """Units the group keeps (None when the cut could not be pruned)."""
    latency_ratio: float
    """Measured latency against the unpruned model, interleaved (1.0 for a failed probe)."""
    quality_drop: float
    """Relative quality lost on the validation split after recovery (1.0 for a failed probe)."""
    macs: int
    failed: str | None = None
    """Why the cut could not be pruned, if it could not."""
    skipped: bool = False
    """The ratio rounds to the group's full width: nothing is cut, so nothing was evaluated (the uncut level)."""

    @property
    def saving(self) -> float:
        """Fraction of the unpruned model's latency this cut saves (negative: it runs slower)."""
        return 1.0 - self.latency_ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "ratio": self.ratio,
            "width": self.width,
            "latency_ratio": self.latency_ratio,
            "quality_drop": self.quality_drop,
            "macs": self.macs,
            "failed": self.failed,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Probe:
        try:
            return cls(
                group=str(data["group"]),
                ratio=float(data["ratio"]),
                width=None if data["width"] is None else int(data["width"]),
                latency_ratio=float(data["latency_ratio"]),
                quality_drop=float(data["quality_drop"]),
                macs=int(data["macs"]),
                failed=None if data.get("failed") is None else str(data["failed"]),
                skipped=bool(data.get("skipped", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(f"not a probe record: {exc}") from exc


@dataclass(frozen=True)
class SensitivityTable:
    """What each group's cut saves and costs, measured one group at a time (:func:`profile_groups`)."""

    groups: tuple[str, ...]
    widths: tuple[int, ...]
    """Units of each group in the unpruned model."""
    probes: tuple[Probe, ...]
    seconds: float
    """Wall time the probes took."""
    runtime: str
    batch_size: int
    threads: int
    timings: tuple[WidthTiming, ...] = ()
    """The latency staircase (:func:`profile_groups` with ``staircase_step``): each group timed alone at candidate
    widths. With it, the probes sit on admissible widths only (:meth:`admissible`), their plans keep exact widths
    (``round_to`` 1, :attr:`round_to`) and the knapsack's savings are the fitted staircase's, not one timing's."""
    step_tolerance: float = STEP_TOLERANCE
    """The smallest fitted latency drop that counts as a step (see :data:`STEP_TOLERANCE`)."""

    @property
    def round_to(self) -> int | None:
        """1 when the plans keep exact staircase widths (the table has timings), else None (the objective's)."""
        return 1 if self.timings else None

    def staircase(self, group: str) -> dict[int, float]:
        """The group's fitted latency ratio per timed width (:func:`isotonic`, capped at 1.0: the full width is
        1.0 by definition, and a cut that the fit finds no faster saves nothing); empty without timings."""
        points = [(t.width, t.latency_ratio) for t in self.timings if t.group == group]
        if not points:
            return {}
        units = self.widths[self.groups.index(group)]
        fitted = isotonic([(units, 1.0), *points])
        return {w: min(1.0, y) for w, y in fitted.items()} | {units: 1.0}

    def admissible(self, group: str) -> list[int]:
        """The widths worth proposing for ``group``, widest first: the full width, then each width where the
        fitted latency steps down by at least :attr:`step_tolerance` from the last admissible one, the widest
        width of its plateau (a narrower width on the same plateau only loses quality). Without timings: []."""
        fitted = self.staircase(group)
        if not fitted:
            return []
        units = self.widths[self.groups.index(group)]
        out, last = [units], 1.0
        for width in sorted(fitted, reverse=True):
            if fitted[width] <= last - self.step_tolerance:
                out.append(width)
                last = fitted[width]
        return out

    def choice(self, probe: Probe) -> float:
        """The ratio a plan uses for ``probe``'s level: the exact ratio of its width when the table has timings
        (plans with ``round_to`` 1), else the ratio asked (plans round it as the objective does)."""
        if not self.timings or probe.width is None or probe.ratio == 0.0:
            return probe.ratio
        return width_ratio(self.widths[self.groups.index(probe.group)], probe.width)

    def saving(self, probe: Probe) -> float:
        """What ``probe``'s level saves: the fitted staircase's saving at its width when timed, else its own."""
        fitted = self.staircase(probe.group).get(probe.width) if self.timings and probe.width else None
        return probe.saving if fitted is None else 1.0 - fitted

    def levels(self, group: str) -> list[Probe]:
        """The usable probes of ``group`` by ratio, with the uncut level (ratio 0) first: one level per kept width
        (the lowest ratio that gives it), so a skipped probe (full width) or a repeat of a width is not a choice."""
        if group not in self.groups:
            raise InvalidConfigError(f"no group {group!r} in the table")
        uncut = Probe(group, 0.0, self.widths[self.groups.index(group)], 1.0, 0.0, 0)
        levels, widths = [uncut], {uncut.width}
        for p in sorted((p for p in self.probes if p.group == group and p.failed is None), key=lambda p: p.ratio):
            if p.width not in widths and not p.skipped:
                levels.append(p)
                widths.add(p.width)
        return levels

    def predict(
        self, ratios: Mapping[str, float], *, latency_scale: float = 1.0, quality_scale: float = 1.0
    ) -> tuple[float, float]:
        """(latency ratio, relative quality drop) predicted for ``ratios`` made of probe levels: one minus the
        scaled sum of the groups' savings, and the scaled sum of their drops. A ratio between two levels takes
        the level below it (never optimistic)."""
        saving = drop = 0.0
        for group in self.groups:
            r = float(ratios.get(group, 0.0))
            level = max((p for p in self.levels(group) if self.choice(p) <= r + 1e-9), key=self.choice)
            saving += self.saving(level)
            drop += level.quality_drop
        return 1.0 - latency_scale * saving, quality_scale * drop

    def solve(
        self, target: float, *, latency_scale: float = 1.0, quality_scale: float = 1.0, resolution: int = 2000
    ) -> dict[str, float] | None:
        """The probe ratio per group with the least predicted quality drop whose predicted latency ratio is at
        most ``target`` (a multiple-choice knapsack, solved exactly by dynamic programming over the saving
        discretised into ``resolution`` steps); None when no combination reaches the target."""
        if not (math.isfinite(target) and target > 0.0):
            raise InvalidConfigError(f"target latency ratio must be > 0, got {target}")
        need = (1.0 - target) / max(latency_scale, 1e-9)
        if need <= 0:
            return dict.fromkeys(self.groups, 0.0)
        drop, chosen = self._least_drops(need, quality_scale, resolution)[resolution]
        if drop == math.inf:
            return None
        return dict(zip(self.groups, chosen, strict=True))

    def solve_drop(
        self, max_drop: float, *, latency_scale: float = 1.0, quality_scale: float = 1.0, resolution: int = 2000
    ) -> dict[str, float]:
        """The dual knapsack: the probe ratio per group with the most predicted saving whose predicted quality drop
        is at most ``max_drop`` (the fastest plan the table expects within a quality budget; all zeros when no cut
        fits)."""
        if not (math.isfinite(max_drop) and max_drop >= 0.0):
            raise InvalidConfigError(f"max_drop must be >= 0, got {max_drop}")
        need = 1.0 - self.fastest()
        if need <= 0:
            return dict.fromkeys(self.groups, 0.0)
        best = self._least_drops(need, quality_scale, resolution)
        for drop, chosen in reversed(best):
            if drop <= max_drop + 1e-12:
                return dict(zip(self.groups, chosen, strict=True))
        return dict.fromkeys(self.groups, 0.0)

    def _least_drops(self, need: float, quality_scale: float, resolution: int) -> list[tuple[float, tuple[float, ...]]]:
        """best[s] = (least scaled drop whose saving reaches s * need / resolution, capped at ``resolution``; the
        choice per group), by dynamic programming over the groups."""
        step = need / resolution
        inf = math.inf
        empty: tuple[float, ...] = ()
        best: list[tuple[float, tuple[float, ...]]] = [(inf, empty)] * (resolution + 1)
        best[0] = (0.0, empty)
        for group in self.groups:
            options = [
                (self.choice(p), max(0, math.floor(self.saving(p) / step + 1e-9)), p.quality_drop)
                for p in self.levels(group)
            ]
            nxt: list[tuple[float, tuple[float, ...]]] = [(inf, empty)] * (resolution + 1)
            for s, (drop, chosen) in enumerate(best):
                if drop == inf:
                    continue
                for ratio, units, cost in options:
                    t = min(resolution, s + units)
                    total = drop + quality_scale * cost
                    if total < nxt[t][0] - 1e-12:
                        nxt[t] = (total, (*chosen, ratio))
            best = nxt
        return best

    def fastest(self, *, latency_scale: float = 1.0) -> float:
        """The lowest latency ratio the table can predict (every group at its most saving level)."""
        saving = sum(max(self.saving(p) for p in self.levels(g)) for g in self.groups)
        return 1.0 - latency_scale * saving

    @staticmethod
    def calibration(pairs: Sequence[tuple[float, float]]) -> float:
        """The scale that maps predicted onto measured amounts (median of measured / predicted over ``pairs`` of
        (predicted, measured) savings or drops; 1.0 without usable pairs), clipped to [0.25, 4]."""
        ratios = sorted(m / p for p, m in pairs if p > 1e-6 and math.isfinite(m))
        if not ratios:
            return 1.0
        mid = len(ratios) // 2
        median = ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])
        return min(4.0, max(0.25, median))

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "widths": list(self.widths),
            "probes": [p.to_json() for p in self.probes],
            "seconds": self.seconds,
            "runtime": self.runtime,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "timings": [t.to_json() for t in self.timings],
            "step_tolerance": self.step_tolerance,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SensitivityTable:
        """The table :meth:`to_json` wrote (a stored job's ``probes`` event): an :class:`InvalidConfigError` for
        anything else."""
        try:
            groups = tuple(str(g) for g in data["groups"])
            widths = tuple(int(w) for w in data["widths"])
            table = cls(
                groups=groups,
                widths=widths,
                probes=tuple(Probe.from_json(p) for p in data["probes"]),
                seconds=float(data["seconds"]),
                runtime=str(data["runtime"]),
                batch_size=int(data["batch_size"]),
                threads=int(data["threads"]),
                timings=tuple(WidthTiming.from_json(t) for t in data.get("timings", ())),
                step_tolerance=float(data.get("step_tolerance", STEP_TOLERANCE)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(f"not a sensitivity table: {exc!r}") from exc
        if (
            len(groups) != len(widths)
            or any(p.group not in groups for p in table.probes)
            or any(t.group not in groups for t in table.timings)
        ):
            raise InvalidConfigError("not a sensitivity table: its groups, widths, probes and timings do not match")
        return table


def profile_groups(
    objective: Objective,
    ratios: Sequence[float] = PROBE_RATIOS,
    *,
    groups: Sequence[str] | None = None,
    on_probe: Callable[[Probe], None] | None = None,
    evaluate: Callable[[Any], Evaluation] | None = None,
    staircase_step: int = 0,
    max_ratio: float = MAX_RATIO,
    step_tolerance: float = STEP_TOLERANCE,
    measure: Callable[[Any], float] | None = None,
) -> SensitivityTable:
    """Probe every group (or ``groups``) alone at each of ``ratios``: prune, recover, score on validation, measure.

    ``evaluate(plan) -> Evaluation`` replaces ``objective.evaluate`` (a caller that wants the probes counted or
    stopped); a probe the model's forward rejects is recorded as failed and left out of the plans. A ratio whose
    rounded width is the group's full width is recorded as ``skipped`` (the uncut level) and one that rounds to
    an already probed width copies that probe: neither is evaluated. Probes are never scored on the test split.

    ``staircase_step > 0`` (structured only) first **times** each group alone at every ``staircase_step``-th width
    below its full width (down to ``max_ratio``; no recovery, no scoring: ``measure(plan) -> latency ratio``,
    default :meth:`Objective.measure_latency`), which gives the staircase of :meth:`SensitivityTable.admissible`;
    each probe ratio then keeps the admissible width of its plateau (the widest width as fast as the one the ratio
    asks for) instead of the objective's fixed ``round_to`` multiple, and its plan keeps that width exactly.
    """
    if not ratios or any(not 0.0 < float(r) < 1.0 for r in ratios):
        raise InvalidConfigError(f"probe ratios must be in (0, 1), got {list(ratios)}")
    if isinstance(staircase_step, bool) or not isinstance(staircase_step, int) or staircase_step < 0:
        raise InvalidConfigError(f"staircase_step must be an integer >= 0, got {staircase_step!r}")
    if not 0.0 < max_ratio <= MAX_RATIO:
        raise InvalidConfigError(f"max_ratio must be in (0, {MAX_RATIO}], got {max_ratio}")
    names = tuple(groups) if groups is not None else objective.group_names
    unknown = [g for g in names if g not in objective.group_names]
    if unknown:
        raise InvalidConfigError(f"unknown group(s) {unknown}; see `autoprune groups`")
    run = evaluate or (lambda plan: objective.evaluate(plan, stage="probe", test=False))
    time_plan = measure or objective.measure_latency
    base_quality = objective.baseline.quality
    started = time.perf_counter()
    structured = objective.method == "structured"  # unstructured ratios are not rounded to widths
    widths = tuple(objective.structure.group(g).units for g in names)
    protocol = objective.baseline.latency.protocol
    timings: list[WidthTiming] = []
    if staircase_step and structured:
        for group, units in zip(names, widths, strict=True):
            narrowest = units - math.floor(max_ratio * units + 1e-9)
            for width in range(units - staircase_step, max(narrowest, 1) - 1, -staircase_step):
                plan = dataclasses.replace(objective.plan({group: width_ratio(units, width)}), round_to=1)
                try:
                    timings.append(WidthTiming(group, width, time_plan(plan)))
                except PruningError:  # the forward refuses this width: it is not admissible
                    continue
    table = SensitivityTable(
        names, widths, (), 0.0, protocol.runtime, protocol.batch_size, protocol.threads, tuple(timings), step_tolerance
    )
    probes: list[Probe] = []
    seen: dict[tuple[str, int], Probe] = {}
    for group, units in zip(names, widths, strict=True):
        admissible = table.admissible(group)
        for ratio in sorted({round(float(r), 6) for r in ratios}):
            if admissible:  # the widest admissible width as fast as the width the ratio asks for
                asked = kept_width(objective, group, ratio, 1)
                width = min((w for w in admissible if w >= asked), default=units)
                plan = dataclasses.replace(objective.plan({group: width_ratio(units, width)}), round_to=1)
            else:
                plan = objective.plan({group: ratio})
                width = kept_width(objective, group, ratio, plan.round_to)
            if structured and width >= units:  # the plan rounds the cut away: the unpruned model, not measured
                probe = Probe(group, ratio, units, 1.0, 0.0, objective.baseline.macs, skipped=True)
            elif structured and (group, width) in seen:  # a width already probed: the same cut, not measured twice
                probe = dataclasses.replace(seen[(group, width)], ratio=ratio)
            else:
                try:
                    ev = run(plan)
                except PruningError as exc:
                    probe = Probe(group, ratio, None, 1.0, 1.0, 0, failed=str(exc).splitlines()[0][:300])
                else:
                    drop = (base_quality - ev.quality) / base_quality if base_quality else 0.0
                    probe = Probe(group, ratio, width, ev.latency_ratio, max(0.0, drop), ev.macs)
                    seen[(group, width)] = probe
            probes.append(probe)
            if on_probe is not None:
                on_probe(probe)
    return dataclasses.replace(table, probes=tuple(probes), seconds=time.perf_counter() - started)


def kept_width(objective: Objective, group: str, ratio: float, round_to: int | None = None) -> int:
    """The units a plan of ``objective`` (rounding to ``round_to``, default the objective's) keeps for ``group`` at
    ``ratio``: the pruner's own rounding (:func:`~autoprune.pruning.structured.kept_units`; attention groups count
    heads, which are not rounded)."""
    from autoprune.pruning.structured import kept_units

    info = objective.structure.group(group)
    step = math.lcm(objective.round_to if round_to is None else round_to, info.step)  # info.step: a shape constraint
    return kept_units(info.units, ratio, 1 if info.kind == "attention" else step)
