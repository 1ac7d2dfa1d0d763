"""``autoprune.search(...)``: the end-to-end local search, and the job spec shared by the CLI (and the service).

(The module is ``autoprune.job`` so that ``autoprune.search`` stays the function.)

This is the one place in ``autoprune`` allowed to import ``agents`` (at call time, never at import time): users
write ``import autoprune; autoprune.search(model, data, strategy="optuna-tpe", budget=30)`` while the rest of
the library knows nothing of strategies.

A :class:`JobSpec` is a plain, frozen description of a search job (model, data, metric, reward, strategy,
budget, latency settings, seed, final fine-tuning); it is validated completely (names, ranges, unknown keys)
before any model is loaded, so bad input fails fast and nothing is half-done.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from agents.base import ProgressCallback, StopSignal, Strategy
    from agents.result import SearchResult
    from autoprune.data import Dataset
    from autoprune.latency import LatencyConfig, LatencyMeter
    from autoprune.objective import Evaluation, Objective
    from autoprune.recovery import RecoveryConfig
    from autoprune.reward import RewardConfig

SELECTIONS = ("reward", "latency", "quality")
METRICS = ("accuracy", "agreement", "kl", "cosine")
SHARED_STRATEGIES = ("optuna-tpe", "optuna-nsga2")
"""Strategies whose search state lives in a database (an Optuna study), so several workers can share a job."""
"""The quality metrics a job spec may name (``autoprune.quality.metric_names()``; kept here torch-free)."""


@dataclass(frozen=True)
class JobSpec:
    """A search job as the CLI's flags, a JSON/YAML spec file or the service's job body describe it."""

    model: str
    """Built-in architecture name (``autoprune architectures``) or a ``.pt2`` file."""
    data: str | None = None
    """Built-in dataset name (``digits``, ``mnist1d``) or a ``.npz`` / ``.safetensors`` file."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Architecture keyword arguments."""
    weights: str | None = None
    """Weights for the architecture (``.safetensors``); without them the shipped reference weights are used
    when there are some for (model, data), else the model is trained for ``train_epochs``."""
    train_epochs: int = 0
    strategy: str = "random"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    budget: int | None = 20
    """Number of candidate evaluations."""
    seconds: float | None = None
    """Wall-clock limit (checked between evaluations)."""
    seed: int = 0
    metric: str = "accuracy"
    """``accuracy`` (needs labels), or the label-free ``agreement``, ``kl``, ``cosine``."""
    objective: str = "mnasnet"
    """Reward form: ``mnasnet`` (quality x (latency/target)^w), ``budget`` (hard latency target) or ``weighted``."""
    target: float = 0.5
    """Target latency as a fraction of the unpruned model's."""
    select: str = "reward"
    """Which point is "best": ``reward``, ``latency`` (fastest within ``max_quality_drop``) or ``quality``
    (best within ``max_latency_ratio``)."""
    max_quality_drop: float = 0.01
    max_latency_ratio: float = 0.5
    max_ratio: float = 0.8
    """Largest pruning ratio a strategy may give a group."""
    method: str = "structured"
    criterion: str = "l1"
    round_to: int = 8
    bn_batches: int = 8
    """BatchNorm re-estimation batches after pruning each candidate (0: off)."""
    val_samples: int | None = None
    """Evaluate candidates on this many validation samples (all when unset)."""
    runtime: str = "torch"
    threads: int = 1
    batch_size: int = 1
    finetune_top: int = 0
    """After the search, fine-tune the top K front points and re-measure them (0: off)."""
    finetune_steps: int = 200
    distill: bool = True
    export_formats: tuple[str, ...] = ("onnx", "safetensors")
    workers: int = 1
    """How many service workers may run this job at once, sharing one Optuna study (``optuna-tpe`` /
    ``optuna-nsga2`` only; the study needs a database both reach: the service's PostgreSQL or a ``storage``
    URL). A local run ignores it."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> JobSpec:
        """A spec from a JSON/YAML mapping; unknown keys and wrong types are :class:`InvalidConfigError`."""
        if not isinstance(data, Mapping):
            raise InvalidConfigError("a job spec must be a mapping of option names to values")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise InvalidConfigError(
                f"unknown job spec key(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        if "model" not in data:
            raise InvalidConfigError("a job spec needs 'model'")
        values = dict(data)
        if "export_formats" in values and isinstance(values["export_formats"], list):
            values["export_formats"] = tuple(values["export_formats"])
        spec = cls(**values)
        spec.validate()
        return spec

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        return cls.from_mapping(read_spec_file(path))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kwargs"] = dict(self.kwargs)
        data["strategy_options"] = dict(self.strategy_options)
        data["export_formats"] = list(self.export_formats)
        return data

    def validate(self) -> None:
        """Check every field without loading anything heavy: no torch, no model, no data (the API uses it)."""
        from agents import check_options

        def _int(name: str, lo: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InvalidConfigError(f"{name} must be an integer >= {lo}, got {v!r}")

        def _num(name: str, lo: float, hi: float, allow_none: bool = False, lo_open: bool = True) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidConfigError(f"{name} must be a number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or v > hi:
                raise InvalidConfigError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")

        if not isinstance(self.model, str) or not self.model:
            raise InvalidConfigError("model must be an architecture name or a .pt2 path")
        if not isinstance(self.kwargs, Mapping) or not isinstance(self.strategy_options, Mapping):
            raise InvalidConfigError("kwargs and strategy_options must be mappings")
        check_options(self.strategy, self.strategy_options)
        if self.budget is None and self.seconds is None:
            raise InvalidConfigError("give a budget (evaluations) and/or seconds")
        _int("budget", 1, allow_none=True)
        _num("seconds", 0.0, 1e9, allow_none=True)
        _int("seed", 0)
        _int("train_epochs", 0)
        from autoprune.reward import RewardConfig

        if self.metric not in METRICS:
            raise InvalidConfigError(f"unknown quality metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        RewardConfig(form=self.objective, target=self.target)
        if self.select not in SELECTIONS:
            raise InvalidConfigError(f"unknown selection {self.select!r}; choose one of {', '.join(SELECTIONS)}")
        _num("max_quality_drop", 0.0, 1.0, lo_open=False)
        _num("max_latency_ratio", 0.0, 10.0)
        _num("max_ratio", 0.0, 0.95)
        if self.method not in ("structured", "unstructured"):
            raise InvalidConfigError(f"method must be structured or unstructured, got {self.method!r}")
        if self.method == "unstructured":
            raise InvalidConfigError("search over unstructured plans is not supported: sparsity does not cut latency")
        from autoprune.plan import Plan

        Plan(criterion=self.criterion, round_to=self.round_to)
        _int("bn_batches", 0)
        _int("val_samples", 1, allow_none=True)
        if self.runtime not in ("torch", "onnxruntime"):
            raise InvalidConfigError(f"runtime must be torch or onnxruntime, got {self.runtime!r}")
        _int("threads", 1)
        _int("batch_size", 1)
        _int("finetune_top", 0)
        _int("finetune_steps", 1)
        _int("workers", 1)
        if self.workers > 1 and self.strategy not in SHARED_STRATEGIES:
            raise InvalidConfigError(
                f"workers > 1 needs a strategy that shares its state across workers ({', '.join(SHARED_STRATEGIES)}); "
                f"{self.strategy!r} runs on one worker (workers=1)"
            )
        unknown_formats = [f for f in self.export_formats if f not in ("onnx", "safetensors", "pt2")]
        if unknown_formats or not self.export_formats:
            raise InvalidConfigError(f"export_formats must be among onnx, safetensors, pt2; got {self.export_formats}")

    # -- building the job ---------------------------------------------------------------------------------
    def latency_config(self) -> LatencyConfig:
        from autoprune.latency import LatencyConfig

        return LatencyConfig(runtime=self.runtime, threads=self.threads, batch_size=self.batch_size)

    def reward_config(self) -> RewardConfig:
        from autoprune.reward import RewardConfig

        return RewardConfig(form=self.objective, target=self.target)

    def finetune_recovery(self) -> RecoveryConfig:
        from autoprune.recovery import RecoveryConfig

        return RecoveryConfig(
            bn_recalibration_batches=self.bn_batches,
            finetune_steps=self.finetune_steps,
            distill=self.distill,
            finetune_lr=2e-3,
            seed=self.seed,
        )

    def build_objective(self, *, log: Callable[[str], None] | None = None) -> Objective:
        """Load the model and data and build the Objective (this measures the unpruned model)."""
        from autoprune.objective import Objective
        from autoprune.recovery import RecoveryConfig

        net, ex, dataset, note = resolve_inputs(
            self.model, dict(self.kwargs), self.weights, self.data, self.train_epochs
        )
        if note and log is not None:
            log(note)
        if dataset is None:
            raise InvalidConfigError("a search needs data to evaluate quality: give data (a built-in name or a file)")
        if self.val_samples is not None and self.val_samples < dataset.num_val:
            dataset = dataset.subset(dataset.num_train, self.val_samples, seed=self.seed)
        return Objective(
            net,
            ex,
            dataset,
            metric=self.metric,
            recovery=RecoveryConfig(bn_recalibration_batches=self.bn_batches),
            latency=self.latency_config(),
            reward=self.reward_config(),
            method=self.method,
            criterion=self.criterion,
            round_to=self.round_to,
        )


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON or YAML (``.yaml``/``.yml``) job spec file; :class:`InvalidConfigError` otherwise."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, RecursionError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidConfigError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {first}") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{path} must hold a mapping of job settings")
    return data


def resolve_inputs(
    model: str, kwargs: dict[str, Any], weights: str | Path | None, data: str | None, train_epochs: int = 0
) -> tuple[nn.Module, torch.Tensor | tuple[torch.Tensor, ...], Dataset | None, str]:
    """(model, example inputs, dataset, note) from names and paths, as the CLI and job specs give them."""
    import torch

    from autoprune.data import load_dataset
    from autoprune.models.registry import example_inputs
    from autoprune.models.weights import load_weights
    from autoprune.workloads import WORKLOADS, build_for_dataset, load_workload, shipped_workload_for, train_classifier

    dataset = load_dataset(data) if data else None
    if model.endswith(".pt2"):
        from autoprune.models.pt2 import load_pt2

        program, ex = load_pt2(Path(model))
        return program, ex[0] if len(ex) == 1 else ex, dataset, ""
    if weights is None and train_epochs == 0 and dataset is not None:
        shipped = shipped_workload_for(model, dataset.name, kwargs)
        if shipped is not None:
            wl = load_workload(shipped)
            return wl.model, wl.example_inputs, dataset, f"using the shipped {shipped} reference weights"
    torch.manual_seed(0)
    net = build_for_dataset(model, dataset, **kwargs)
    note = ""
    if weights is not None:
        load_weights(net, weights)
    elif train_epochs > 0:
        if dataset is None:
            raise InvalidConfigError("training the model first (train epochs) needs data")
        train_classifier(net, dataset, epochs=train_epochs, lr=3e-3, batch_size=64, seed=0)
        note = f"trained for {train_epochs} epochs"
    else:
        note = "no weights: the model is randomly initialised (quality figures are meaningless)"
        if dataset is not None and any(s.dataset == dataset.name for s in WORKLOADS.values()):
            note += "; pass train epochs to train it first"
    return net.eval(), example_inputs(net), dataset, note


def run_job(
    spec: JobSpec,
    *,
    objective: Objective | None = None,
    callbacks: Sequence[ProgressCallback] = (),
    stop: StopSignal = None,
    history: Iterable[Evaluation] = (),
    log: Callable[[str], None] | None = None,
    strategy: Strategy | None = None,
    next_index: Callable[[int], int] | None = None,
) -> SearchResult:
    """Run a validated job spec: build the objective (unless given), search, then the final fine-tuning stage.

    ``strategy``: a strategy object to use instead of building ``spec.strategy`` from ``spec.strategy_options``
    (a service worker sharing a study configures its own); ``next_index`` numbers the evaluations
    (:class:`agents.base.SearchSession`)."""
    from agents import Budget, run_search

    spec.validate()
    objective = objective or spec.build_objective(log=log)
    result = run_search(
        objective,
        spec.strategy if strategy is None else strategy,
        Budget(evaluations=spec.budget, seconds=spec.seconds),
        seed=spec.seed,
        max_ratio=spec.max_ratio,
        stop=stop,
        callbacks=callbacks,
        history=history,
        options=dict(spec.strategy_options) if strategy is None else None,
        next_index=next_index,
    )
    if spec.finetune_top > 0 and result.stop_reason != "interrupted":
        result.finetune_front(spec.finetune_top, spec.finetune_recovery(), key=spec.select)
    return result


def search(
    model: nn.Module | str,
    data: Dataset | str | None = None,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    strategy: str = "random",
    budget: int | None = 20,
    seconds: float | None = None,
    seed: int = 0,
    metric: str = "accuracy",
    reward: RewardConfig | None = None,
    latency: LatencyConfig | LatencyMeter | None = None,
    recovery: RecoveryConfig | None = None,
    max_ratio: float = 0.8,
    criterion: str = "l1",
    round_to: int = 8,
    keep: Sequence[str] = (),
    finetune_top: int = 0,
    finetune: RecoveryConfig | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    callbacks: Sequence[ProgressCallback] = (),
    stop: StopSignal = None,
    history: Iterable[Evaluation] = (),
) -> SearchResult:
    """Search per-group pruning ratios for ``model`` and return the result (front, best, ``materialize``).

    ``model`` is an ``nn.Module`` (give ``example_inputs`` unless it is a built-in architecture) or a built-in
    architecture name; ``data`` a :class:`~autoprune.data.Dataset` or a built-in name / file path. Without data,
    pass ``evaluate=fn(model) -> float`` (higher is better) to score candidates. Every candidate is pruned for
    real, recovered (BatchNorm re-estimation by default), evaluated and measured interleaved with the unpruned
    model; ``finetune_top=K`` fine-tunes the K best front points afterwards (``finetune`` sets the recipe).
    """
    from agents import Budget, check_strategy, run_search
    from autoprune.data import Dataset, load_dataset
    from autoprune.models.registry import build_model
    from autoprune.models.registry import example_inputs as make_example_inputs
    from autoprune.objective import Objective
    from autoprune.recovery import RecoveryConfig

    check_strategy(strategy)
    budget_ = Budget(evaluations=budget, seconds=seconds)
    if isinstance(data, str):
        data = load_dataset(data)
    elif data is not None and not isinstance(data, Dataset):
        raise InvalidConfigError("data must be a Dataset, a built-in dataset name or a file path")
    if isinstance(model, str):
        from autoprune.workloads import build_for_dataset

        model = build_for_dataset(model, data) if data is not None else build_model(model)
    if example_inputs is None:
        example_inputs = make_example_inputs(model)
    objective = Objective(
        model,
        example_inputs,
        data,
        metric=evaluate if evaluate is not None else metric,
        recovery=recovery,
        latency=latency,
        reward=reward,
        criterion=criterion,
        round_to=round_to,
        keep=keep,
    )
    result = run_search(
        objective,
        strategy,
        budget_,
        seed=seed,
        max_ratio=max_ratio,
        stop=stop,
        callbacks=callbacks,
        history=history,
        options=dict(strategy_options or {}),
    )
    if finetune_top > 0 and result.stop_reason != "interrupted":
        tuned = finetune or RecoveryConfig(finetune_steps=200, distill=True, finetune_lr=2e-3, seed=seed)
        result.finetune_front(finetune_top, tuned)
    return result


def write_outputs(result: SearchResult, out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """Write a search's evaluations, front, plot, report and best model under ``out_dir`` (see ``agents.report``)."""
    from agents.report import write_search_outputs

    return write_search_outputs(result, out_dir, **kwargs)


def strategy_summaries() -> list[tuple[str, str]]:
    """(name, summary) of every registered search strategy."""
    from agents import list_strategies

    return [(info.name, info.summary) for info in list_strategies()]
