"""``knapsack``: latency-guided search from a measured per-group table (HALP-style, NeurIPS'22).

1. **Probe** (:func:`autoprune.sensitivity.profile_groups`): each group alone at a few ratios, recovered, scored on
   validation and *timed* in the job's runtime, interleaved with the unpruned model. Probes are not candidates:
   they are not counted against the evaluation budget, but their wall time is (a time budget covers them) and
   they are reported (``info()["sensitivity"]``, the job's ``sensitivity.json``).
2. **Plan**: for a sweep of latency targets, the multiple-choice knapsack over the table gives the probe level
   per group with the least predicted quality loss within the target.
3. **Evaluate for real** like every other candidate; each plan carries its predictions
   (``plan.extra["predicted_latency_ratio"]``, ``["predicted_quality_drop"]``) so the prediction error of every
   evaluation is on record. After each evaluation the predictor is re-calibrated (median measured/predicted
   saving and drop), because cuts interact and the additive table is only a first guess.

Targets sweep the achievable range coarse to fine (van der Corput order), so any budget covers the whole
trade-off; a target whose plan was already evaluated is skipped.

Deterministic: the search's seed is not used. Given the same probe table it asks the same plans in the same
order; two runs differ only where the measurements (the probes' latencies, the re-calibration) differ. Seeds in
a benchmark therefore vary the timing noise, not the plans (a resumed job gets its stored probes back and asks
the same plans again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agents.base import Progress, SearchCallback, SearchSession, SearchStopped
from autoprune.errors import InvalidConfigError, PruningError
from autoprune.sensitivity import PROBE_RATIOS

if TYPE_CHECKING:
    from autoprune.objective import Evaluation
    from autoprune.plan import Plan
    from autoprune.sensitivity import SensitivityTable

MAX_TARGETS = 512
"""Targets tried before the strategy says it has nothing new to propose."""
MIN_TARGET = 0.05
"""The lowest latency ratio the sweep aims at (default ``min_target``)."""
FOCUS_DROP = 0.01
"""The quality loss the focused candidates aim at (default ``focus_drop``: the default selection's
``max_quality_drop``)."""
FOCUS_STEPS = (1.0, 0.5, 1.5, 0.75, 2.0, 0.25, 3.0)
"""Multiples of ``focus_drop`` tried in turn until the dual knapsack gives a plan not asked yet."""


def _van_der_corput(n: int) -> float:
    q, denom = 0.0, 1.0
    while n:
        denom *= 2
        n, bit = divmod(n, 2)
        q += bit / denom
    return q


def probe_table(
    session: SearchSession,
    probe_ratios: Sequence[float] = PROBE_RATIOS,
    *,
    table: SensitivityTable | None = None,
    staircase_step: int = 0,
) -> SensitivityTable:
    """The measured latency / sensitivity table of the session's groups: ``table`` when it is one of this session
    (same groups and widths, probed at these ratios, with a staircase iff ``staircase_step``: a resumed job's
    stored probes), else each group probed alone at ``probe_ratios`` (capped at the space's ``max_ratio``), after
    timing its width staircase when ``staircase_step > 0`` (:func:`~autoprune.sensitivity.profile_groups`). Probes
    and timings are not candidates: they do not count against the evaluation budget, but a time budget or a stop
    request also stops them (:class:`SearchStopped`)."""
    from autoprune.sensitivity import profile_groups

    levels = sorted({round(min(float(r), session.space.max_ratio), 6) for r in probe_ratios})
    if table is not None and _fits(table, session, levels, staircase_step):
        return table
    objective = session.objective

    def evaluate(plan: Plan) -> Evaluation:
        if session.should_stop():
            raise SearchStopped(session.stop_reason)
        return objective.evaluate(plan, stage="probe", test=False)

    def measure(plan: Plan) -> float:
        if session.should_stop():
            raise SearchStopped(session.stop_reason)
        return objective.measure_latency(plan)

    return profile_groups(
        objective,
        levels,
        groups=session.space.groups,
        evaluate=evaluate,
        staircase_step=staircase_step,
        max_ratio=session.space.max_ratio,
        measure=measure,
    )


def _fits(table: SensitivityTable, session: SearchSession, levels: list[float], staircase_step: int) -> bool:
    """Whether ``table`` is the one :func:`probe_table` would measure for ``session`` at ``levels``."""
    structure = session.objective.structure
    staircase = bool(staircase_step) and session.objective.method == "structured"
    return (
        table.groups == session.space.groups
        and table.widths == tuple(structure.group(g).units for g in table.groups)
        and all(sorted(p.ratio for p in table.probes if p.group == g) == levels for g in table.groups)
        and bool(table.timings) == staircase
    )


def knapsack_plans(
    session: SearchSession,
    count: int,
    probe_ratios: Sequence[float] = PROBE_RATIOS,
    *,
    table: SensitivityTable | None = None,
) -> tuple[SensitivityTable, list[dict[str, float]]]:
    """The session's table (``table`` if it fits, else probed: :func:`probe_table`) with up to ``count`` distinct
    knapsack plans over a sweep of latency targets (uncalibrated: nothing is evaluated here). The warm start of
    the Optuna strategies and the RL agents: their ratios are applied with the objective's ``round_to``, so the
    table has no staircase (``staircase_step`` 0)."""
    table = probe_table(session, probe_ratios, table=table)
    plans: list[dict[str, float]] = []
    hi, lo = 0.97, max(MIN_TARGET, table.fastest())
    for n in range(1, MAX_TARGETS + 1):
        if len(plans) >= count or lo >= hi:
            break
        choice = table.solve(hi - _van_der_corput(n) * (hi - lo))
        if choice is None:
            continue
        ratios = session.space.clip(choice)
        if ratios not in plans and any(r > 0 for r in ratios.values()):
            plans.append(ratios)
    return table, plans


class StoredProbes:
    """The optional probe hooks of a strategy that probes (``knapsack``, the ``warm_start`` of Optuna and the RL
    agents): a service stores :meth:`probe_record` with the job once probing has ended, and hands it back to a
    resumed run through :meth:`restore_probes`, so the resumed run does not probe (nor time) again."""

    table: SensitivityTable | None = None
    """The table this run probed or restored (None before probing)."""
    _restored: SensitivityTable | None = None

    def probe_record(self) -> dict[str, Any] | None:
        """The probe table as JSON (:meth:`SensitivityTable.to_json`) once probing has ended, else None."""
        return None if self.table is None else self.table.to_json()

    def restore_probes(self, table: Mapping[str, Any]) -> None:
        """Use a table :meth:`probe_record` gave in an earlier run of the same job instead of probing again (it is
        probed anyway if it does not fit the session: other groups, widths or probe ratios). With the replayed
        evaluations, every plan is then the same as in the first run."""
        from autoprune.sensitivity import SensitivityTable

        self._restored = SensitivityTable.from_json(table)

    @property
    def uses_stored_probes(self) -> bool:
        """Whether this run's table is the one :meth:`restore_probes` gave (it fitted: nothing was probed)."""
        return self.table is not None and self.table is self._restored


class KeepProbes(SearchCallback):
    """Resume a probing strategy without probing again, wherever the job runs: hands ``previous`` (a table an
    earlier run stored, or None) to ``strategy.restore_probes`` and calls ``save(table)`` once probing has ended
    (before the first evaluation goes on, and at the end of the search) unless the run used the restored table.
    A no-op for strategies without probe hooks. ``unusable(message)`` hears a stored table that cannot be used
    (the strategy then probes again rather than fail)."""

    def __init__(
        self,
        strategy: Any,
        previous: Mapping[str, Any] | None,
        save: Callable[[dict[str, Any]], object],
        unusable: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.strategy = strategy if isinstance(strategy, StoredProbes) else None
        self.save = save
        self.saved = False
        self.restored = False
        """Whether ``previous`` was handed to the strategy (it may still not fit the session)."""
        if self.strategy is not None and previous is not None:
            try:
                self.strategy.restore_probes(previous)
                self.restored = True
            except InvalidConfigError as exc:
                unusable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def store(self) -> None:
        """Save the strategy's table once it has one (and it is not the restored one)."""
        if self.saved or self.strategy is None:
            return
        record = self.strategy.probe_record()
        if record is not None:
            self.saved = True
            if not self.strategy.uses_stored_probes:
                self.save(record)

    def on_evaluation(self, progress: Progress) -> bool:
        self.store()
        return True

    def on_end(self, result: Any) -> None:
        self.store()


class KnapsackSearch(StoredProbes):
    """Latency table + knapsack, calibrated by each real evaluation (see the module docstring)."""

    name = "knapsack"

    def __init__(
        self,
        probe_ratios: Sequence[float] = PROBE_RATIOS,
        min_target: float = MIN_TARGET,
        staircase_step: int | None = 0,
        focus_drop: float = FOCUS_DROP,
    ):
        """``staircase_step``: time every group alone at every ``staircase_step``-th width first and plan on the
        admissible widths of that staircase (exact widths, ``round_to`` 1); None: half the objective's
        ``round_to`` (at least 1); 0 (the default): no staircase, probe ratios rounded to the objective's
        ``round_to`` (at batch 1 on this project's 2-core box the single-group savings are within the timing
        noise, and the staircase plans measured worse on ResNet-20/digits: see the issue 11 note).
        ``focus_drop``: every other candidate is the dual knapsack's fastest plan within about this predicted
        quality loss (calibrated), so the frontier where a user selects is searched densely; 0: the sweep only."""
        ratios = [float(r) for r in probe_ratios]
        if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
            raise InvalidConfigError(f"probe_ratios must be numbers in (0, 1), got {list(probe_ratios)}")
        if not 0.0 < min_target < 1.0:
            raise InvalidConfigError(f"min_target must be in (0, 1), got {min_target}")
        if staircase_step is not None and (
            isinstance(staircase_step, bool) or not isinstance(staircase_step, int) or staircase_step < 0
        ):
            raise InvalidConfigError(f"staircase_step must be an integer >= 0, got {staircase_step!r}")
        if isinstance(focus_drop, bool) or not isinstance(focus_drop, int | float) or not 0.0 <= focus_drop < 1.0:
            raise InvalidConfigError(f"focus_drop must be in [0, 1), got {focus_drop!r}")
        self.probe_ratios = ratios
        self.min_target = min_target
        self.focus_drop = float(focus_drop)
        self.staircase_step = staircase_step
        self.table: SensitivityTable | None = None
        self._restored: SensitivityTable | None = None
        self.latency_scale = 1.0
        self.quality_scale = 1.0

    def info(self) -> dict[str, Any]:
        """What the search learnt: the sensitivity table and the calibration it ended with."""
        if self.table is None:
            return {}
        return {
            "sensitivity": self.table.to_json(),
            "calibration": {"latency_scale": self.latency_scale, "quality_scale": self.quality_scale},
        }

    def _plan(self, session: SearchSession, table: SensitivityTable, ratios: dict[str, float]) -> Plan:
        """The plan of ``ratios`` with the (calibrated) predictions it carries."""
        predicted_latency, predicted_drop = table.predict(
            ratios, latency_scale=self.latency_scale, quality_scale=self.quality_scale
        )
        plan = session.objective.plan(
            ratios,
            predicted_latency_ratio=round(predicted_latency, 6),
            predicted_quality_drop=round(predicted_drop, 6),
        )
        if table.round_to is not None:  # the staircase's exact widths, not the objective's multiples
            plan = dataclasses.replace(plan, round_to=table.round_to)
        return plan

    def _focus(self, session: SearchSession, table: SensitivityTable, asked: set[Plan]) -> dict[str, float] | None:
        """The fastest plan the calibrated table expects within a quality budget near ``focus_drop`` (the budget
        itself, then tighter and looser ones) that was not asked yet; None when every budget gives an asked plan."""
        for k in FOCUS_STEPS:
            choice = table.solve_drop(self.focus_drop * k, quality_scale=self.quality_scale)
            ratios = session.space.clip(choice)
            if any(r > 0 for r in ratios.values()) and self._plan(session, table, ratios) not in asked:
                return ratios
        return None

    def run(self, session: SearchSession) -> None:
        from autoprune.sensitivity import SensitivityTable

        step = self.staircase_step
        if step is None:
            step = max(1, session.objective.round_to // 2)
        table = self.table = probe_table(session, self.probe_ratios, table=self._restored, staircase_step=step)
        base_quality = session.objective.baseline.quality
        savings: list[tuple[float, float]] = []
        drops: list[tuple[float, float]] = []
        asked: set[Plan] = set()
        hi = 0.97
        sweep = 0
        focus_turn = self.focus_drop > 0
        for _ in range(2 * MAX_TARGETS):
            if session.should_stop():
                return
            choice: dict[str, float] | None
            if focus_turn:  # every other candidate: the frontier at the quality loss a user selects at
                focus_turn = False
                choice = self._focus(session, table, asked)
            else:
                focus_turn = self.focus_drop > 0
                sweep += 1
                lo = max(self.min_target, table.fastest(latency_scale=self.latency_scale))
                if lo >= hi or sweep > MAX_TARGETS:
                    break
                target = hi - _van_der_corput(sweep) * (hi - lo)
                choice = table.solve(target, latency_scale=self.latency_scale, quality_scale=self.quality_scale)
            if choice is None:
                continue
            ratios = session.space.clip(choice)
            plan = self._plan(session, table, ratios)
            if plan in asked or all(r == 0 for r in ratios.values()):
                continue
            asked.add(plan)
            raw_latency, raw_drop = table.predict(ratios)
            try:
                ev = session.evaluate(plan, checked=True)
            except PruningError:  # recorded by the session; the table's levels combine in a way the model refuses
                continue
            savings.append((1.0 - raw_latency, 1.0 - ev.latency_ratio))
            drop = (base_quality - ev.quality) / base_quality if base_quality else 0.0
            drops.append((raw_drop, max(0.0, drop)))
            self.latency_scale = SensitivityTable.calibration(savings)
            self.quality_scale = SensitivityTable.calibration(drops)
        session.interrupt("exhausted")
