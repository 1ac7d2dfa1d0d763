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
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidConfigError
from autoprune.names import (
    CRITERIA,
    EXPORT_FORMATS,
    FORMS,
    ITERATIVE_SCHEDULES,
    LR_SCHEDULES,
    MAX_RATIO,
    METHODS,
    METRICS,
    OPTIMIZERS,
    RUNTIMES,
    SELECTIONS,
    SHARED_STRATEGIES,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from agents.base import ProgressCallback, SearchCallback, StopSignal, Strategy
    from agents.result import SearchResult, Selection
    from autoprune.data import Dataset
    from autoprune.inputs import Inputs
    from autoprune.latency import LatencyConfig, LatencyMeter
    from autoprune.objective import Evaluation, Objective
    from autoprune.recovery import RecoveryConfig, TrainStep
    from autoprune.reward import RewardConfig


@dataclass(frozen=True)
class Knob:
    """One setting of a job as every surface shows it: the spec key, the CLI flag (``--finetune-top``), the API
    field (``finetune_top``), their help text, default and the bounds :meth:`JobSpec.validate` enforces."""

    name: str
    doc: str
    kind: type
    """``int``, ``float``, ``str``, ``bool``, ``tuple`` (of strings) or ``dict``."""
    optional: bool
    """Whether ``None`` is allowed."""
    default: Any
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    """Whether ``lo`` itself is excluded."""
    choices: tuple[str, ...] | None = None
    label: str = ""
    """How errors name the setting's choices (``unknown quality metric 'x'``)."""
    short: str | None = None
    """A one-letter CLI alias (``-s``)."""
    flag: str | None = None
    """The CLI flag when it is not ``--`` + the name with dashes; ``""`` for a setting with its own flags."""

    @property
    def cli_flag(self) -> str:
        return self.flag if self.flag is not None else "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        """:class:`InvalidConfigError` unless ``value`` is allowed."""
        if value is None:
            if self.optional:
                return
            raise InvalidConfigError(f"{self.name} must be set")
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConfigError(f"{self.name} must be an integer, got {value!r}")
            if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
                upper = f" and <= {int(self.hi)}" if self.hi is not None else ""
                lower = f" >= {int(self.lo)}" if self.lo is not None else ""
                raise InvalidConfigError(f"{self.name} must be an integer{lower}{upper}, got {value!r}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidConfigError(f"{self.name} must be a number, got {value!r}")
            below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            if below or (self.hi is not None and value > self.hi):
                lo = "-inf" if self.lo is None else f"{self.lo:g}"
                hi = "inf" if self.hi is None else f"{self.hi:g}"
                raise InvalidConfigError(
                    f"{self.name} must be in {'(' if self.lo_open else '['}{lo}, {hi}], got {value!r}"
                )
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidConfigError(f"{self.name} must be true or false, got {value!r}")
        elif self.kind is str:
            if not isinstance(value, str):
                raise InvalidConfigError(f"{self.name} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise InvalidConfigError(
                    f"unknown {self.label or self.name} {value!r}; choose one of {', '.join(self.choices)}"
                )
        elif self.kind is tuple:
            bad = [v for v in value if self.choices is not None and v not in self.choices]
            if isinstance(value, str) or not isinstance(value, tuple | list) or not value or bad:
                raise InvalidConfigError(
                    f"{self.name} must be a non-empty list among {', '.join(self.choices or ())}; got {value!r}"
                )
        elif self.kind is dict and not isinstance(value, Mapping):
            raise InvalidConfigError(f"{self.name} must be a mapping, got {value!r}")


def _knob(
    default: Any,
    doc: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: tuple[str, ...] | None = None,
    label: str = "",
    short: str | None = None,
    flag: str | None = None,
) -> Any:
    meta = {
        "doc": doc,
        "lo": lo,
        "hi": hi,
        "lo_open": lo_open,
        "choices": choices,
        "label": label,
        "short": short,
        "flag": flag,
    }
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class JobSpec:
    """A search job as the CLI's flags, a JSON/YAML spec file or the service's job body describe it.

    ``model``, ``data``, ``kwargs`` and ``weights`` name the inputs; every other field is a :class:`Knob`
    (:meth:`knobs`): the CLI's ``search`` and ``submit`` flags and the API's job body are made from them, with
    their help text, defaults and bounds, so the four surfaces cannot drift apart.
    """

    model: str
    """Built-in architecture name (``autoprune architectures``) or a ``.pt2`` file."""
    data: str | None = None
    """Built-in dataset name (``digits``, ``mnist1d``) or a ``.npz`` / ``.safetensors`` file."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Architecture keyword arguments."""
    weights: str | None = None
    """Weights for the architecture (``.safetensors``); without them the shipped reference weights are used
    when there are some for (model, data), else the model is trained for ``train_epochs``."""
    train_epochs: int = _knob(0, "Train the model first when it has no weights (0: off).", lo=0, hi=10_000)
    strategy: str = _knob(
        "knapsack",
        "Search strategy (see `autoprune strategies`); knapsack probes each group first (not counted in the budget).",
        short="-s",
    )
    strategy_options: Mapping[str, Any] = _knob(
        {},
        "Options of the strategy (`autoprune strategies`); `storage` and `study_name` are the operator's.",
        flag="",
    )
    budget: int | None = _knob(20, "Number of candidate evaluations.", lo=1, hi=1_000_000, short="-n")
    seconds: float | None = _knob(
        None, "Wall-clock limit in seconds (checked between evaluations).", lo=0, hi=1e9, lo_open=True
    )
    seed: int = _knob(0, "Seed of the strategy, the splits and the fine-tune.", lo=0, hi=2**32 - 1)
    metric: str = _knob(
        "accuracy",
        "Quality metric: accuracy (needs labels), or the label-free agreement, kl, cosine.",
        choices=METRICS,
        label="quality metric",
    )
    objective: str = _knob(
        "mnasnet",
        "Reward: mnasnet (quality x (latency/target)^w), budget (hard latency target) or weighted.",
        choices=FORMS,
        label="reward form",
    )
    target: float = _knob(0.5, "Target latency as a fraction of the unpruned model's.", lo=0, hi=2, lo_open=True)
    select: str = _knob(
        "reward",
        "Best point: reward, latency (fastest within max quality drop) or quality (best within max latency ratio).",
        choices=SELECTIONS,
        label="selection",
    )
    max_quality_drop: float = _knob(0.01, "Relative quality loss allowed by select=latency.", lo=0, hi=1)
    max_latency_ratio: float = _knob(0.5, "Latency ratio allowed by select=quality.", lo=0, hi=10, lo_open=True)
    max_ratio: float = _knob(
        0.8, "Largest pruning ratio a strategy may give a group.", lo=0, hi=MAX_RATIO, lo_open=True
    )
    method: str = _knob("structured", "Pruning method (a search needs structured).", choices=METHODS, label="method")
    criterion: str = _knob("l1", "Importance criterion.", choices=CRITERIA, label="criterion")
    round_to: int = _knob(8, "Round kept widths to a multiple of this.", lo=1, hi=4096)
    bn_batches: int = _knob(
        8, "BatchNorm re-estimation batches after pruning each candidate (0: off).", lo=0, hi=10_000
    )
    val_samples: int | None = _knob(
        None, "Evaluate candidates on this many validation samples (all when unset).", lo=1, hi=10**9
    )
    runtime: str = _knob("torch", "Latency runtime.", choices=RUNTIMES, label="runtime")
    threads: int = _knob(1, "Threads pinned while timing.", lo=1, hi=1024)
    batch_size: int = _knob(1, "Batch size of the timed input.", lo=1, hi=65536)
    finetune_top: int = _knob(
        0, "After the search, fine-tune the top K front points and re-measure them (0: off).", lo=0, hi=10_000
    )
    finetune_steps: int = _knob(
        200, "Optimizer steps of that fine-tune (unless finetune epochs are set).", lo=1, hi=10**7
    )
    finetune_epochs: float = _knob(
        0.0, "Fine-tune for this many epochs instead of finetune steps (0: use steps).", lo=0, hi=10_000
    )
    finetune_lr: float = _knob(2e-3, "Peak fine-tuning learning rate.", lo=0, hi=10, lo_open=True)
    optimizer: str = _knob("adamw", "Fine-tuning optimizer.", choices=OPTIMIZERS, label="optimizer")
    lr_schedule: str = _knob(
        "constant", "Fine-tuning learning-rate schedule (after the warm-up).", choices=LR_SCHEDULES, label="lr_schedule"
    )
    warmup_steps: int = _knob(0, "Linear learning-rate warm-up steps of the fine-tune.", lo=0, hi=10**7)
    early_stopping: int = _knob(
        0,
        "Stop a fine-tune after this many validation checks without improvement, keeping the best (0: off).",
        lo=0,
        hi=10_000,
    )
    distill: bool = _knob(True, "Distil from the unpruned model while fine-tuning.")
    prune_steps: int = _knob(
        1,
        "Reach each fine-tuned point in this many prune + fine-tune increments, the fine-tune split over them "
        "(1: prune once, then fine-tune; needs finetune top).",
        lo=1,
        hi=100,
    )
    prune_schedule: str = _knob(
        "linear",
        "How the prune steps spread the cut: linear, or cubic (large cuts first).",
        choices=ITERATIVE_SCHEDULES,
        label="prune schedule",
    )
    export_formats: tuple[str, ...] = _knob(
        EXPORT_FORMATS,
        "Formats the best model (the service: every front point) is exported in.",
        choices=EXPORT_FORMATS,
        flag="--export",
    )
    workers: int = _knob(
        1,
        "Workers that may run this job at once, sharing one Optuna study (optuna-tpe / optuna-nsga2; the service "
        "on PostgreSQL or AUTOPRUNE_STUDY_STORAGE). A local run ignores it.",
        lo=1,
        hi=64,
    )

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        """Every setting but the inputs, in declaration order (the order of ``--help`` and of the API schema)."""
        return _knobs(cls)

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

        if not isinstance(self.model, str) or not self.model:
            raise InvalidConfigError("model must be an architecture name or a .pt2 path")
        if not isinstance(self.kwargs, Mapping):
            raise InvalidConfigError("kwargs must be a mapping")
        for knob in self.knobs():
            knob.check(getattr(self, knob.name))
        check_options(self.strategy, self.strategy_options)
        if self.budget is None and self.seconds is None:
            raise InvalidConfigError("give a budget (evaluations) and/or seconds")
        if self.method == "unstructured":
            raise InvalidConfigError("search over unstructured plans is not supported: sparsity does not cut latency")
        from autoprune.reward import RewardConfig

        RewardConfig(form=self.objective, target=self.target)
        if self.prune_steps > 1 and self.finetune_top == 0:
            raise InvalidConfigError(
                "prune_steps > 1 reaches the fine-tuned points in increments: set finetune_top (points to fine-tune)"
            )
        if self.workers > 1 and self.strategy not in SHARED_STRATEGIES:
            raise InvalidConfigError(
                f"workers > 1 needs a strategy that shares its state across workers ({', '.join(SHARED_STRATEGIES)}); "
                f"{self.strategy!r} runs on one worker (workers=1)"
            )

    # -- building the job ---------------------------------------------------------------------------------
    def latency_config(self, **host: Any) -> LatencyConfig:
        """How this job times models; ``host`` adds this machine's settings that are not the job's (the
        measurement lock: ``lock_dir``, ``lock_timeout_s``)."""
        from autoprune.latency import LatencyConfig

        return LatencyConfig(runtime=self.runtime, threads=self.threads, batch_size=self.batch_size, **host)

    def selection(self) -> Selection:
        """The job's rule for its best point (``select`` and its thresholds): the one the CLI, the service's
        worker and the facade apply (:class:`agents.result.Selection`)."""
        from agents.result import Selection

        return Selection(self.select, self.max_quality_drop, self.max_latency_ratio)

    def reward_config(self) -> RewardConfig:
        from autoprune.reward import RewardConfig

        return RewardConfig(form=self.objective, target=self.target)

    def finetune_recovery(self) -> RecoveryConfig:
        """The recipe of the final fine-tune (``finetune_top``) as a :class:`~autoprune.recovery.RecoveryConfig`."""
        from autoprune.recovery import RecoveryConfig

        return RecoveryConfig(
            bn_recalibration_batches=self.bn_batches,
            finetune_steps=0 if self.finetune_epochs > 0 else self.finetune_steps,
            finetune_epochs=self.finetune_epochs,
            finetune_lr=self.finetune_lr,
            optimizer=self.optimizer,
            lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            early_stopping_patience=self.early_stopping,
            distill=self.distill,
            seed=self.seed,
            prune_steps=self.prune_steps,
            prune_schedule=self.prune_schedule,
        )

    def build_objective(
        self, *, log: Callable[[str], None] | None = None, latency: LatencyConfig | None = None
    ) -> Objective:
        """Load the model and data and build the Objective (this measures the unpruned model); ``latency``
        replaces :meth:`latency_config` (e.g. with the host's measurement lock)."""
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
            latency=latency or self.latency_config(),
            reward=self.reward_config(),
            method=self.method,
            criterion=self.criterion,
            round_to=self.round_to,
        )


def _knobs(cls: type[JobSpec]) -> tuple[Knob, ...]:
    hints = typing.get_type_hints(cls)
    knobs = []
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata:
            continue
        args = typing.get_args(hints[f.name])
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hints[f.name]) if optional else hints[f.name]
        origin = typing.get_origin(base) or base
        kind = dict if origin is Mapping or origin is dict else origin
        default = {} if f.default is dataclasses.MISSING else f.default
        knobs.append(Knob(name=f.name, kind=kind, optional=optional, default=default, **f.metadata))
    return tuple(knobs)


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
    from autoprune.data import load_dataset

    dataset = load_dataset(data) if data else None
    if model.endswith(".pt2"):
        from autoprune.models.pt2 import load_pt2

        program, ex = load_pt2(Path(model))
        return program, ex[0] if len(ex) == 1 else ex, dataset, ""
    net, inputs, note = build_named_model(model, kwargs, weights, dataset, train_epochs)
    return net, inputs, dataset, note


def build_named_model(
    model: str, kwargs: dict[str, Any], weights: str | Path | None, dataset: Dataset | None, train_epochs: int = 0
) -> tuple[nn.Module, torch.Tensor | tuple[torch.Tensor, ...], str]:
    """(model, example inputs, note) for a built-in architecture: the shipped reference weights when there are
    some for (architecture, dataset) and none were given, else ``weights``, else trained for ``train_epochs``,
    else randomly initialised (the note says which)."""
    import torch

    from autoprune.models.registry import example_inputs
    from autoprune.models.weights import load_weights
    from autoprune.workloads import WORKLOADS, build_for_dataset, load_workload, shipped_workload_for, train_classifier

    if weights is None and train_epochs == 0 and dataset is not None:
        shipped = shipped_workload_for(model, dataset.name, kwargs)
        if shipped is not None:
            wl = load_workload(shipped)
            return wl.model, wl.example_inputs, f"using the shipped {shipped} reference weights"
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
    return net.eval(), example_inputs(net), note


def run_job(
    spec: JobSpec,
    *,
    objective: Objective | None = None,
    callback: SearchCallback | Sequence[SearchCallback] | None = None,
    callbacks: Sequence[ProgressCallback] = (),
    stop: StopSignal = None,
    history: Iterable[Evaluation] = (),
    log: Callable[[str], None] | None = None,
    strategy: Strategy | None = None,
) -> SearchResult:
    """Run a validated job spec: build the objective (unless given), search, then the final fine-tuning stage.

    ``strategy``: a strategy object to use instead of building ``spec.strategy`` from ``spec.strategy_options``
    (a service worker sharing a study configures its own); ``callback``, ``callbacks`` and ``stop`` watch and
    steer the search and the fine-tuning stage (:func:`agents.base.run_search`,
    :meth:`agents.result.SearchResult.finetune_front`); fine-tuned points recorded in ``history`` are reused."""
    from agents import Budget
    from agents.base import as_callback

    spec.validate()
    return run_objective(
        objective or spec.build_objective(log=log),
        spec.strategy if strategy is None else strategy,
        Budget(evaluations=spec.budget, seconds=spec.seconds),
        seed=spec.seed,
        max_ratio=spec.max_ratio,
        options=dict(spec.strategy_options) if strategy is None else None,
        selection=spec.selection(),
        finetune_top=spec.finetune_top,
        finetune=spec.finetune_recovery(),
        callback=as_callback(callback, stop=stop, callbacks=callbacks),
        history=history,
    )


def probes_in_file(
    spec: JobSpec, path: Path, *, resume: bool, note: Callable[[str], None] = lambda _m: None
) -> tuple[Strategy, SearchCallback]:
    """The strategy of ``spec`` and a callback keeping its probe table (knapsack, warm starts) in ``path``: saved
    once probing has ended; with ``resume`` a table saved there by an earlier run is used instead of probing again
    (:class:`agents.knapsack.KeepProbes`; the service keeps it as a job event instead)."""
    from agents import make_strategy
    from agents.knapsack import KeepProbes

    strategy = make_strategy(spec.strategy, **dict(spec.strategy_options))
    previous = None
    if resume and path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            note(f"{path} is not a probe table ({exc}); probing again")

    def save(table: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table), encoding="utf-8")
        if keeper.restored:  # handed back, but it did not fit (an unusable one was noted already)
            note(f"the probe table in {path} did not fit this search; probed again")

    keeper = KeepProbes(strategy, previous, save, lambda why: note(f"{path}: {why}; probing again"))
    if keeper.restored:
        note(f"resuming: the probe table in {path} is used, not measured again")
    return strategy, keeper


def run_objective(
    objective: Objective,
    strategy: str | Strategy,
    budget: Any,
    *,
    seed: int,
    max_ratio: float,
    options: dict[str, Any] | None,
    selection: Selection,
    finetune_top: int,
    finetune: RecoveryConfig,
    callback: SearchCallback,
    history: Iterable[Evaluation] = (),
    progress: Callable[[int, int, Evaluation], None] | None = None,
) -> SearchResult:
    """The one path of a job once its objective is built, for the CLI, the facade and the worker alike: search
    (:func:`agents.base.run_search`), the selection rule, then the final fine-tuning stage
    (:meth:`agents.result.SearchResult.finetune_front`; fine-tuned points recorded in ``history`` are reused)."""
    from agents import run_search

    history = list(history)
    result = run_search(
        objective,
        strategy,
        budget,
        seed=seed,
        max_ratio=max_ratio,
        callback=callback,
        history=history,
        options=options,
    )
    result.selection = selection
    if finetune_top > 0 and result.stop_reason != "interrupted":
        result.finetune_front(
            finetune_top,
            finetune,
            progress=progress,
            callback=callback,
            stored={e.index: e for e in history if e.stage == "finetuned"},
        )
    return result


def search(
    model: nn.Module | str,
    data: Any = None,
    *,
    evaluate: Callable[[nn.Module], Any] | None = None,
    example_inputs: Inputs | None = None,
    strategy: str = "knapsack",
    budget: int | None = 20,
    seconds: float | None = None,
    seed: int = 0,
    metric: str | None = None,
    reward: RewardConfig | None = None,
    latency: LatencyConfig | LatencyMeter | None = None,
    recovery: RecoveryConfig | None = None,
    max_ratio: float = 0.8,
    criterion: str = "l1",
    round_to: int = 8,
    keep: Sequence[str | nn.Module] = (),
    finetune_top: int = 0,
    finetune: RecoveryConfig | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    train_step: TrainStep | None = None,
    base_quality: float | None = None,
    after_prune: Callable[[nn.Module, Any], nn.Module | None] | None = None,
    calibration: Iterable[Any] | None = None,
    select: str = "reward",
    max_quality_drop: float = 0.01,
    max_latency_ratio: float = 0.5,
    progress: bool | Callable[[str], None] = True,
    callback: SearchCallback | Sequence[SearchCallback] | None = None,
    callbacks: Sequence[ProgressCallback] = (),
    stop: StopSignal = None,
    history: Iterable[Evaluation] = (),
) -> SearchResult:
    """Search per-group pruning ratios for ``model`` and return the result (front, best, ``materialize``).

    ``model`` is an ``nn.Module`` or a built-in architecture name; ``data`` anything
    :func:`~autoprune.data.as_dataset` takes: a :class:`~autoprune.data.Dataset`, a built-in name or file path,
    a tensor, a dict of tensors / ``BatchEncoding`` (keyword inputs), an ``(x, y)`` pair or a DataLoader (one
    split: a seeded 20% is held out, half of it as the test split). ``example_inputs`` (a tensor, a tuple or a
    dict of tensors) defaults to the model's own (built-in architectures) or the data's first validation sample.
    Without data, pass ``evaluate=fn(model) -> float`` (higher is better) to score candidates; it may return a
    dict of metrics, ``metric=`` naming the one to optimise (the others are recorded in ``extra["metrics"]``);
    with data ``metric`` is a built-in metric (default ``accuracy``). ``after_prune(model, plan)`` fixes up every
    pruned copy; ``calibration`` batches re-estimate BatchNorm without a dataset (a ``recovery`` that needs data
    without either is a :class:`~autoprune.errors.DataRequiredError`, as is ``finetune_top`` without data). Every candidate is pruned for
    real, recovered (BatchNorm re-estimation by default), evaluated and measured interleaved with the unpruned
    model; ``finetune_top=K`` fine-tunes the K best front points afterwards (``finetune`` sets the recipe;
    ``train_step(model, (x, y)) -> loss`` plugs in your own loss for every fine-tune; ``base_quality``: the
    unpruned model's known score, so an expensive ``evaluate`` is not run on it).

    ``select`` (``reward``, ``latency`` within ``max_quality_drop``, ``quality`` within ``max_latency_ratio``)
    is the job's rule for its best point, as the CLI's ``--select`` and the service's ``select``: one function
    (:class:`agents.result.Selection`), so the same evaluations give the same ``result.best()`` from every
    front-end; ``finetune_top`` fine-tunes the points first under it. ``progress=True`` prints one line on
    stderr for the unpruned model, each evaluation (:meth:`agents.base.Progress.line`), each fine-tuned point
    and the end (rewritten in place on a terminal; plain lines, no control characters, in a notebook, a pipe
    or a log); ``False`` is quiet; a function of one string (``print``, ``logging.info``) gets the lines
    instead. ``callbacks`` get every :class:`~agents.base.Progress` either way; ``callback`` (an
    :class:`agents.SearchCallback` or several) watches and steers the search and the fine-tuning stage
    (``on_step`` / ``on_evaluation`` returning False stops it); ``stop`` (an Event or ``() -> bool``) stops it.
    """
    from agents import Budget, check_strategy
    from agents.base import as_callback
    from agents.result import Selection
    from autoprune.data import as_dataset
    from autoprune.errors import DataRequiredError, InvalidModelError
    from autoprune.models.registry import example_inputs as make_example_inputs
    from autoprune.objective import Objective
    from autoprune.recovery import RecoveryConfig

    check_strategy(strategy)
    selection = Selection(select, max_quality_drop, max_latency_ratio)
    printer = _ProgressLines(progress)
    hooks = as_callback(
        callback, stop=stop, callbacks=[*callbacks, printer.evaluation] if printer.on else list(callbacks)
    )
    budget_ = Budget(evaluations=budget, seconds=seconds)
    if data is None and evaluate is None:
        raise DataRequiredError("give data (to score candidates with a metric) or evaluate=<fn(model) -> float>")
    if data is None and finetune_top > 0:
        raise DataRequiredError("finetune_top fine-tunes on data: give data, or finetune_top=0 with evaluate=")
    # split seed 0, as the CLI and the service split a file: the splits do not move with the search's seed
    data = None if data is None else as_dataset(data)
    if isinstance(model, str):  # a built-in name: the same weights the CLI would use, and the same note
        import warnings

        model, named_inputs, note = build_named_model(model, {}, None, data)
        example_inputs = named_inputs if example_inputs is None else example_inputs
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
    if example_inputs is None:
        try:
            example_inputs = make_example_inputs(model)
        except InvalidModelError:
            if data is None:
                raise InvalidConfigError(
                    f"give example_inputs=: {type(model).__name__} has no example_input_shape and no data was "
                    "given to take a sample from"
                ) from None
            example_inputs = data.example_inputs()
    objective = Objective(
        model,
        example_inputs,
        data,
        metric=evaluate if evaluate is not None else (metric or "accuracy"),
        metric_name=metric if evaluate is not None else None,
        recovery=recovery,
        latency=latency,
        reward=reward,
        criterion=criterion,
        round_to=round_to,
        keep=keep,
        train_step=train_step,
        base_quality=base_quality,
        after_prune=after_prune,
        calibration=calibration,
    )
    printer.start(objective, strategy, budget_)
    try:
        result = run_objective(
            objective,
            strategy,
            budget_,
            seed=seed,
            max_ratio=max_ratio,
            options=dict(strategy_options or {}),
            selection=selection,
            finetune_top=finetune_top,
            finetune=finetune or RecoveryConfig(finetune_steps=200, distill=True, finetune_lr=2e-3, seed=seed),
            callback=hooks,
            history=history,
            progress=printer.finetuned if printer.on else None,
        )
    finally:
        printer.close()
    printer.end(result)
    return result


class _ProgressLines:
    """The facade's progress (``search(progress=...)``): compact lines on stderr, or to the user's function.

    On a terminal the per-evaluation line is rewritten in place (``\\r``, clear to the end of the line);
    anywhere else (a notebook, a pipe, a log file) each line is written whole with no control characters."""

    def __init__(self, progress: bool | Callable[[str], None]) -> None:
        import sys

        if not (isinstance(progress, bool) or callable(progress)):
            raise InvalidConfigError(f"progress must be True, False or a function of one string, got {progress!r}")
        self.on = progress is not False
        self._sink: Callable[[str], None] | None = None if isinstance(progress, bool) else progress
        self._stream = sys.stderr  # resolved now: a notebook or pytest may have replaced it
        isatty = getattr(self._stream, "isatty", None)
        self._tty = self._sink is None and callable(isatty) and bool(isatty())
        self._open = False  # a line rewritten in place is on the terminal, not yet ended

    def _write(self, text: str, *, in_place: bool = False) -> None:
        if not self.on:
            return
        text = "autoprune: " + text
        if self._sink is not None:
            self._sink(text)
            return
        if in_place and self._tty:
            self._stream.write("\r" + text + "\x1b[K")
            self._open = True
        else:
            self.close()
            self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End a line left open in place."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False

    def start(self, objective: Objective, strategy: str, budget: Any) -> None:
        b = objective.baseline
        p = b.latency.protocol
        limits = [f"{budget.evaluations} evaluations"] if budget.evaluations is not None else []
        limits += [f"{budget.seconds:g} s"] if budget.seconds is not None else []
        self._write(
            f"unpruned {b.metric} {b.quality:.4f}, {b.latency_ms:.4g} ms ({p.runtime}, {p.threads} thread"
            f"{'s' if p.threads != 1 else ''}, batch {p.batch_size}); {len(objective.group_names)} prunable groups; "
            f"{strategy} search, {' / '.join(limits) or 'no limit'}"
        )

    def evaluation(self, p: Any) -> None:
        self._write(p.line(), in_place=True)

    def finetuned(self, done: int, total: int, e: Evaluation) -> None:
        search_q = e.extra.get("search_quality")
        was = "" if search_q is None else f" (search {search_q:.4f})"
        self._write(f"fine-tuned {done}/{total}: #{e.index} {e.metric} {e.quality:.4f}{was}, {e.speedup:.2f}x")

    def end(self, result: SearchResult) -> None:
        best = result.best()
        which = (
            "the unpruned model"
            if best.index == 0
            else f"#{best.index}{' (fine-tuned)' if best.stage == 'finetuned' else ''}"
        )
        note = f"; {result.failures_note()}" if result.failures else ""
        self._write(
            f"done ({result.stop_reason}): {len(result.evaluations)} evaluations in {result.wall_s:.1f} s, front "
            f"{len(result.front())}; best by {result.selection.key}: {which}, {best.metric} {best.quality:.4f}, "
            f"{best.speedup:.2f}x{note}"
        )


def write_outputs(result: SearchResult, out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """Write a search's evaluations, front, plot, report and best model under ``out_dir`` (see ``agents.report``)."""
    from agents.report import write_search_outputs

    return write_search_outputs(result, out_dir, **kwargs)


def strategy_summaries() -> list[tuple[str, str]]:
    """(name, summary) of every registered search strategy."""
    from agents import list_strategies

    return [(info.name, info.summary) for info in list_strategies()]
