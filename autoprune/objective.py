"""One path for every candidate: ``Objective(plan) -> Evaluation``.

An :class:`Objective` owns the base model, its example inputs, the data, the quality metric, the recovery
recipe, the latency meter and the reward. Calling it with a plan prunes a copy of the base model for real,
recovers it cheaply (BatchNorm re-estimation, optional short fine-tune), evaluates its quality, measures its
latency interleaved with the base model, and returns a frozen :class:`Evaluation` with the wall time of each
stage. Every strategy (RL, Optuna, baselines) evaluates candidates through this one object.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autoprune.cost import Cost, MacProfile, count_macs, measure_cost
from autoprune.data import Batch, Dataset, check_compatible
from autoprune.errors import DataRequiredError, InvalidConfigError
from autoprune.inputs import Inputs, as_inputs, split_batch
from autoprune.latency import CachedMeter, LatencyConfig, LatencyMeter, Meter, shape_signature
from autoprune.plan import Plan
from autoprune.pruning import PruningContext, Structure, analyze_unstructured, apply_plan
from autoprune.pruning.structured import AfterPrune, resolve_keep
from autoprune.quality import CallableMetric, QualityMetric, get_metric
from autoprune.records import Evaluation
from autoprune.recovery import (
    FinetuneReport,
    RecoveryConfig,
    TrainStep,
    recalibrate_batchnorm,
    recalibration_batches,
    recover,
)
from autoprune.reward import RewardConfig, compute_reward

MetricSpec = str | QualityMetric | Callable[[nn.Module], Any]
"""A built-in metric's name, a :class:`QualityMetric`, or ``fn(model) -> float`` (or ``-> {name: float}``)."""


class Objective:
    """Turns plans into Evaluations for one model, dataset, metric, recovery recipe, meter and reward.

    ``method``, ``criterion`` and ``round_to`` are the job's pruning settings: :meth:`plan` builds plans with
    them from bare ``{group: ratio}`` mappings, which is what search strategies propose.

    Hooks for models users bring:

    * ``after_prune(model, plan)`` runs on every pruned copy (candidates, :meth:`materialize`, and the trial
      copies of the lock probe), before its forward is checked: fix up what the pruning cannot see (a head count
      stored elsewhere, a cached size); change the model in place or return the model to use.
    * ``calibration``: batches (tensors, dicts of tensors or ``(x, y)`` pairs) for BatchNorm re-estimation
      (all of them, whenever ``recovery.bn_recalibration_batches > 0``) and the ``taylor`` criterion, with or
      without a dataset.
    * ``metric`` may be a function returning a dict of metrics: ``metric_name`` names the one to optimise; all
      of them are recorded in each Evaluation's ``extra["metrics"]``.
    * ``base_quality``: the unpruned model's known score, so ``metric`` is not run on it.

    Without a dataset, a ``recovery`` that fine-tunes, or re-estimates BatchNorm with no ``calibration``, is a
    :class:`~autoprune.errors.DataRequiredError`; the recipe given is never replaced behind the user's back.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        dataset: Dataset | None,
        *,
        metric: MetricSpec = "accuracy",
        recovery: RecoveryConfig | None = None,
        latency: LatencyConfig | LatencyMeter | None = None,
        reward: RewardConfig | None = None,
        method: str = "structured",
        criterion: str = "l1",
        round_to: int = 8,
        keep: Sequence[str | nn.Module] = (),
        eval_batch_size: int = 256,
        calibration_batches: int = 4,
        train_step: TrainStep | None = None,
        base_quality: float | None = None,
        after_prune: AfterPrune | None = None,
        calibration: Iterable[Any] | None = None,
        metric_name: str | None = None,
    ) -> None:
        self.base = copy.deepcopy(model).eval()
        self.after_prune = after_prune
        self.calibration: list[Batch] | None = (
            None if calibration is None else [split_batch(b) for b in calibration]  # type: ignore[misc]
        )
        if self.calibration is not None and not self.calibration:
            raise InvalidConfigError("calibration is empty: give at least one batch, or leave it out")
        self.train_step = train_step
        """The user's loss for every fine-tune (:data:`autoprune.recovery.TrainStep`); None: the built-in one."""
        self.example_inputs: Inputs = as_inputs(example_inputs, "example_inputs")
        example_inputs = self.example_inputs
        self.dataset = dataset
        self.metric = self._metric(metric, metric_name)
        if dataset is None and not isinstance(self.metric, CallableMetric):
            raise DataRequiredError("without a dataset, pass metric=<a function model -> float> to evaluate")
        if dataset is None and recovery is not None and recovery.finetunes:
            raise DataRequiredError(
                "fine-tuning needs data: without a dataset the objective only evaluates (recovery may only "
                "re-estimate BatchNorm, from calibration= batches)"
            )
        if dataset is None and self.calibration is None and recovery is not None and recovery.bn_recalibration_batches:
            raise DataRequiredError(
                "BatchNorm re-estimation needs data: without a dataset pass calibration=<batches>, or "
                "RecoveryConfig(bn_recalibration_batches=0)"
            )
        if base_quality is not None and not (isinstance(base_quality, int | float) and math.isfinite(base_quality)):
            raise InvalidConfigError(f"base_quality must be a finite number, got {base_quality!r}")
        if recovery is None:  # the default recipe re-estimates BatchNorm when there is something to do it on
            no_data = dataset is None and self.calibration is None
            recovery = RecoveryConfig(bn_recalibration_batches=0) if no_data else RecoveryConfig()
        self.recovery = recovery
        self._test_set = dataset.test_view() if dataset is not None and dataset.has_test else None
        self._base_test_quality: float | None = None
        if isinstance(latency, LatencyConfig) or latency is None:
            self.meter: LatencyMeter = CachedMeter(Meter(latency or LatencyConfig()))
        else:
            self.meter = latency
        self.reward_config = reward or RewardConfig()
        self.method = method
        self.criterion = criterion
        self.round_to = round_to
        self.keep = resolve_keep(model, keep)  # names; modules and containers of the user's model resolved
        self.eval_batch_size = eval_batch_size
        self.calibration_batches = calibration_batches
        if dataset is not None:
            check_compatible(self.base, dataset)
        Plan(method=method, criterion=criterion, round_to=round_to)  # type: ignore[arg-type]  # validates the settings early
        self._context: PruningContext | None = None
        if method == "unstructured":
            self.structure: Structure = analyze_unstructured(self.base, example_inputs, keep=self.keep)
        else:
            calibration = self._calibration() if criterion == "taylor" else None
            self._context = PruningContext(
                self.base, example_inputs, keep=self.keep, calibration=calibration, after_prune=after_prune
            )
            self.structure = self._context.structure
        self._count = 0
        base_macs, per_module = count_macs(self.base, example_inputs)
        self.base_cost: Cost = measure_cost(self.base, example_inputs, macs=base_macs)
        # MACs of candidates: scaled from the base's per-layer count when the model allows it (no forward),
        # else counted once per pruned shape (unstructured plans keep the base's shape, hence its MACs)
        self._mac_profile = MacProfile.of(self.base, base_macs, per_module)
        self._macs_by_shape: dict[str, int] = {}
        if self._mac_profile is None:
            self._macs_by_shape[shape_signature(self.base, example_inputs)] = base_macs
        self._kept: dict[tuple[str, RecoveryConfig], nn.Module] = {}
        self._bn_batches: dict[tuple[int, int, int], list[Any]] = {}
        # a known score of the unpruned model saves one call of an expensive evaluate function
        self.base_metrics: dict[str, float] = {}
        """Every metric the evaluate function returned for the unpruned model (empty with ``base_quality``)."""
        if base_quality is not None:
            self.base_quality = float(base_quality)
        else:
            self.base_quality, self.base_metrics = self._score(self.base)
        self.baseline = self._evaluate_model(self.base, self.plan({}), {}, index=0)

    # -- configuration helpers ----------------------------------------------------------------------------
    @staticmethod
    def _metric(metric: MetricSpec, metric_name: str | None = None) -> QualityMetric:
        if isinstance(metric, str):
            if metric_name is not None:
                raise InvalidConfigError("metric_name names an entry of an evaluate function's result")
            return get_metric(metric)
        if hasattr(metric, "name") and callable(metric):
            return metric  # type: ignore[return-value]
        if callable(metric):
            return CallableMetric(metric, name=metric_name or getattr(metric, "__name__", "custom"), key=metric_name)
        raise InvalidConfigError(f"metric must be a name, a QualityMetric or a function, got {metric!r}")

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.structure.names

    def plan(self, ratios: Mapping[str, float], **extra: Any) -> Plan:
        """A plan with this objective's pruning settings."""
        return Plan(
            ratios=tuple(ratios.items()),
            method=self.method,  # type: ignore[arg-type]
            criterion=self.criterion,
            round_to=self.round_to,
            extra=tuple(extra.items()),
        )

    # -- the pipeline -------------------------------------------------------------------------------------
    def _calibration(self) -> list[tuple[Inputs, torch.Tensor | None]] | None:
        if self.calibration is not None:
            return list(self.calibration)
        if self.dataset is None:
            return None
        batches = self.dataset.train_batches(64, seed=0, max_batches=self.calibration_batches)
        return [(b[0], b[1]) for b in batches]

    def prune(self, plan: Plan) -> nn.Module:
        """The pruned model for ``plan``, before recovery."""
        if self._context is not None and plan.method == "structured":
            if plan.criterion == "taylor" and self._context.calibration is None:
                self._context.calibration = self._calibration()
            return self._context.apply(plan)
        calibration = self._calibration() if plan.criterion == "taylor" else None
        return apply_plan(
            self.base, plan, self.example_inputs, keep=self.keep, calibration=calibration, after_prune=self.after_prune
        )

    def measure_latency(self, plan: Plan | Mapping[str, float]) -> float:
        """The latency ratio of ``plan``'s pruned model against the unpruned one, timed interleaved like every
        candidate (and cached by shape), without recovery or scoring: the weights do not change the time, so a
        latency table needs nothing else. Raises :class:`~autoprune.errors.PruningError` like :meth:`evaluate`."""
        if not isinstance(plan, Plan):
            plan = self.plan(plan)
        model = self.prune(plan)
        latency = self.meter.measure(model, self.example_inputs, reference=self.base)
        return latency.ratio_to(self.baseline.latency.median_ms)

    def materialize(self, plan: Plan, *, recovery: RecoveryConfig | None = None) -> nn.Module:
        """Rebuild the pruned and recovered model for ``plan`` (deterministic).

        If ``evaluate(plan, recovery=..., keep_model=True)`` kept the model it evaluated, that model is handed
        over (once) instead of pruning and recovering again: recovery is deterministic, so the weights are the
        same, and a fine-tune is not paid twice.
        """
        kept = self._kept.pop(self._kept_key(plan, recovery or self.recovery), None)
        if kept is not None:
            return kept.eval()
        return self._recovered(plan, recovery or self.recovery).eval()

    def _recovered(
        self, plan: Plan, recovery: RecoveryConfig, on_finetune: Callable[[FinetuneReport], None] | None = None
    ) -> nn.Module:
        """The pruned model for ``plan``, recovered under ``recovery``: pruned once and recovered, or, when the
        recipe has ``prune_steps > 1``, reached in that many prune + fine-tune increments
        (:func:`autoprune.gradual.iterative_prune`, the fine-tune budget split over them)."""
        if recovery.prune_steps > 1:
            return self._prune_iteratively(plan, recovery, on_finetune)
        model = self.prune(plan)
        self._recover(model, recovery, on_finetune)
        return model

    def _prune_iteratively(
        self, plan: Plan, recovery: RecoveryConfig, on_finetune: Callable[[FinetuneReport], None] | None
    ) -> nn.Module:
        from autoprune.gradual import iterative_prune  # training module: only needed by iterative recipes

        if self.dataset is None:
            raise InvalidConfigError("iterative pruning fine-tunes between increments: it needs data")
        if plan.method != "structured":
            raise InvalidConfigError(
                "prune_steps > 1 applies to structured plans; unstructured sparsity is reached gradually during "
                "the fine-tune (autoprune.gradual.gradual_magnitude_prune, `autoprune prune --gradual`)"
            )
        result = iterative_prune(
            self.base,
            self.example_inputs,
            self.dataset,
            plan,
            steps=recovery.prune_steps,
            schedule=recovery.prune_schedule,
            recovery=recovery.per_increment(),
            keep=self.keep,
            teacher=self.base,
            on_finetune=on_finetune,
            train_step=self.train_step,
            after_prune=self.after_prune,
        )
        return result.model

    def _recover(
        self,
        model: nn.Module,
        recovery: RecoveryConfig,
        on_finetune: Callable[[FinetuneReport], None] | None = None,
    ) -> None:
        """Recover in place; the BatchNorm recalibration batches are drawn once per recipe, not per candidate
        (or are the ``calibration`` batches given)."""
        if self.dataset is None:
            if self.calibration is not None and recovery.bn_recalibration_batches > 0:
                recalibrate_batchnorm(model, self.calibration)
            return
        key = (recovery.batch_size, recovery.seed, recovery.bn_recalibration_batches)
        if key not in self._bn_batches:
            given = self.calibration if recovery.bn_recalibration_batches > 0 else None
            self._bn_batches[key] = list(given) if given is not None else recalibration_batches(self.dataset, recovery)
        if self.method == "unstructured" and recovery.finetunes and not recovery.keep_sparsity:
            recovery = dataclasses.replace(recovery, keep_sparsity=True)  # else fine-tuning refills the zeros
        recover(
            model,
            self.dataset,
            recovery,
            teacher=self.base,
            bn_batches=self._bn_batches[key],
            on_progress=on_finetune,
            train_step=self.train_step,
        )

    @staticmethod
    def _kept_key(plan: Plan, recovery: RecoveryConfig) -> tuple[str, RecoveryConfig]:
        return json.dumps(plan.to_json(), sort_keys=True), recovery  # a plan's extra may hold unhashable values

    def _macs(self, model: nn.Module) -> int:
        """MACs of a pruned copy of the base model (the same figure :func:`count_macs` gives)."""
        if self._mac_profile is not None:
            macs = self._mac_profile.macs(model)
            if macs is not None:
                return macs
        key = shape_signature(model, self.example_inputs)
        if key not in self._macs_by_shape:
            self._macs_by_shape[key] = count_macs(model, self.example_inputs)[0]
        return self._macs_by_shape[key]

    def _score(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        """The objective metric on the validation split and every metric an evaluate function returned."""
        if isinstance(self.metric, CallableMetric):
            return self.metric.evaluate_all(model)
        return self._quality(model), {}

    def _quality(self, model: nn.Module, dataset: Dataset | None = None) -> float:
        data = self.dataset if dataset is None else dataset
        return float(self.metric(model, data, reference=self.base, batch_size=self.eval_batch_size))  # type: ignore[arg-type]

    @property
    def has_test(self) -> bool:
        """Whether delivered models get a figure on a held-out test split."""
        return self._test_set is not None

    @property
    def base_test_quality(self) -> float | None:
        """The unpruned model's quality on the test split (``None`` without one); computed once."""
        if self._test_set is None:
            return None
        if self._base_test_quality is None:
            self._base_test_quality = self._quality(self.base, self._test_set)
        return self._base_test_quality

    def test_quality(self, model: nn.Module) -> float | None:
        """``model``'s quality on the held-out test split (``None`` without one). Never used to choose."""
        return None if self._test_set is None else self._quality(model, self._test_set)

    def __deepcopy__(self, memo: dict[int, Any]) -> Objective:
        # A live handle: its traced Torch-Pruning graph holds autograd nodes and cannot be deep-copied.
        # gymnasium deep-copies make() kwargs into the env spec (and check_env re-makes the env from it),
        # so copies share this objective instead of crashing.
        return self

    def __call__(self, plan: Plan | Mapping[str, float]) -> Evaluation:
        return self.evaluate(plan)

    def evaluate(
        self,
        plan: Plan | Mapping[str, float],
        *,
        recovery: RecoveryConfig | None = None,
        stage: str = "search",
        keep_model: bool = False,
        remeasure: bool = False,
        test: bool | None = None,
        on_finetune: Callable[[FinetuneReport], None] | None = None,
    ) -> Evaluation:
        """Prune, recover, evaluate and measure ``plan``.

        ``on_finetune`` receives the fine-tune's progress (:class:`~autoprune.recovery.FinetuneReport`, at every
        validation check and at the end) when the recipe fine-tunes.

        ``test`` adds the held-out test figure (``test_quality``); by default delivered stages get it
        (``stage != "search"``) and search candidates do not, so nothing is ever chosen on the test split.
        A recovery recipe that fine-tunes is refused without a dataset (:class:`InvalidConfigError`).

        ``remeasure=True`` times the model again even when its pruned shape is in the latency cache (the
        new figure replaces the cached one).

        ``keep_model=True`` keeps the recovered model so that the next ``materialize(plan, recovery=...)``
        returns it instead of rebuilding it (worth it after a long fine-tune; the objective holds the model
        until then).
        """
        if not isinstance(plan, Plan):
            plan = self.plan(plan)
        recovery = recovery or self.recovery
        if self.dataset is None and recovery.finetunes:
            raise DataRequiredError("cannot fine-tune without data: this objective was built without a dataset")
        if self.dataset is None and self.calibration is None and recovery.bn_recalibration_batches:
            raise DataRequiredError(
                "cannot re-estimate BatchNorm without data: this objective has no dataset and no calibration batches"
            )
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if recovery.prune_steps > 1:  # pruning and recovery interleave: one figure for both
            model = self._recovered(plan, recovery, on_finetune)
            timings["prune"], timings["recover"] = 0.0, time.perf_counter() - start
        else:
            model = self.prune(plan)
            timings["prune"] = time.perf_counter() - start
            t = time.perf_counter()
            self._recover(model, recovery, on_finetune)
            timings["recover"] = time.perf_counter() - t
        self._count += 1
        evaluation = self._evaluate_model(
            model, plan, timings, index=self._count, stage=stage, start=start, remeasure=remeasure
        )
        if test if test is not None else stage != "search":
            evaluation = self.with_test(evaluation, model)
        if keep_model:
            self._kept[self._kept_key(plan, recovery)] = model
        return evaluation

    def evaluate_model(self, model: nn.Module, plan: Plan, *, stage: str, test: bool | None = None) -> Evaluation:
        """Evaluate an already pruned model (e.g. after a longer fine-tune) as ``plan``."""
        self._count += 1
        evaluation = self._evaluate_model(model, plan, {}, index=self._count, stage=stage)
        return self.with_test(evaluation, model) if (test if test is not None else stage != "search") else evaluation

    def with_test(self, evaluation: Evaluation, model: nn.Module) -> Evaluation:
        """``evaluation`` with its held-out test figures filled in (unchanged without a test split)."""
        if self._test_set is None:
            return evaluation
        return dataclasses.replace(
            evaluation, test_quality=self.test_quality(model), base_test_quality=self.base_test_quality
        )

    def _evaluate_model(
        self,
        model: nn.Module,
        plan: Plan,
        timings: dict[str, float],
        *,
        index: int,
        stage: str = "search",
        start: float | None = None,
        remeasure: bool = False,
    ) -> Evaluation:
        start = time.perf_counter() if start is None else start
        t = time.perf_counter()
        quality, metrics = (self.base_quality, self.base_metrics) if index == 0 else self._score(model)
        timings["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        # the base model is timed alone (its ratio is 1 by definition); candidates interleaved with it
        reference = self.base if index else None
        if remeasure and isinstance(self.meter, CachedMeter):
            latency = self.meter.measure(model, self.example_inputs, reference=reference, refresh=True)
        else:
            latency = self.meter.measure(model, self.example_inputs, reference=reference)
        timings["measure"] = time.perf_counter() - t
        t = time.perf_counter()
        cost = (
            self.base_cost
            if index == 0
            else measure_cost(
                model, self.example_inputs, macs=self._macs(model), compress=plan.method == "unstructured"
            )
        )
        timings["cost"] = time.perf_counter() - t
        base_ms = self.baseline.latency.median_ms if index else latency.median_ms
        reward, terms = compute_reward(quality, latency.ratio_to(base_ms), self.reward_config)
        timings["total"] = time.perf_counter() - start
        return Evaluation(
            plan=plan,
            quality=quality,
            metric=self.metric.name,
            latency=latency,
            macs=cost.macs,
            params=cost.params,
            nonzero_params=cost.nonzero_params,
            size_bytes=cost.size_bytes,
            compressed_bytes=cost.compressed_bytes,
            reward=reward,
            reward_terms=terms,
            timings=timings,
            base_quality=self.base_quality,
            base_latency_ms=base_ms,
            base_macs=self.base_cost.macs,
            base_params=self.base_cost.params,
            index=index,
            stage=stage,
            extra={"metrics": metrics} if metrics else {},
        )
