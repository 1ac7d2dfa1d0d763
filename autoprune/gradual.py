"""Training-time pruning: the polynomial sparsity schedule, gradual magnitude pruning, iterative structured pruning.

* :class:`PolynomialDecay` is TF-MOT's schedule (Zhu & Gupta 2017, "To prune, or not to prune"): between
  ``begin_step`` and ``end_step`` the target sparsity rises from ``initial_sparsity`` to ``final_sparsity`` as
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power``, and masks are only updated on the steps where
  ``(step - begin_step) % frequency == 0`` inside ``[begin_step, end_step]``.
* :func:`gradual_magnitude_prune` trains a model while the schedule raises its unstructured sparsity: at every
  pruning step one global L1 threshold over all conv/linear weights (the selection of
  ``torch.nn.utils.prune.global_unstructured``, on the weights' current values, masks held by ``torch.nn.utils.prune``)
  zeroes the smallest weights still alive; pruned weights stay pruned (their masks only grow). :func:`strip`
  folds the masks in (``prune.remove``) and leaves a plain model; :func:`sparsity` reports the zeros.
* :func:`iterative_prune` reaches a structured plan in ``steps`` increments (prune a fraction, recover with
  :func:`autoprune.recovery.recover`, repeat), on a linear or cubic schedule. Each increment is re-expressed
  relative to the current (already pruned) widths so that the final widths are exactly those of the one-shot plan.

Sparse weights do not make dense kernels faster: a stripped, 50% sparse model runs at the dense model's speed in
torch eager and ONNX Runtime (``benchmarks/seed_example.py`` measures it). Its value is compressed size, or a
sparse runtime; for speed on dense hardware prune structurally.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

from autoprune.cost import eval_mode
from autoprune.data import Dataset, as_output_tensor, model_device
from autoprune.errors import DatasetError, InvalidConfigError, PruningError
from autoprune.inputs import Inputs, call_model, to_device
from autoprune.names import ITERATIVE_SCHEDULES
from autoprune.plan import Plan
from autoprune.pruning import PruningContext, analyze
from autoprune.pruning.structured import AfterPrune
from autoprune.pruning.unstructured import sparsifiable_layers
from autoprune.recovery import FinetuneReport, RecoveryConfig, TrainStep, make_optimizer, recover

__all__ = [
    "ITERATIVE_SCHEDULES",
    "GradualProgress",
    "GradualReport",
    "IterativeResult",
    "IterativeStep",
    "PolynomialDecay",
    "gradual_magnitude_prune",
    "iterative_prune",
    "prunable_weights",
    "sparsity",
    "strip",
    "train",
]


# ---------------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolynomialDecay:
    """TF-MOT's ``PolynomialDecay`` sparsity schedule (Zhu & Gupta 2017), step-for-step.

    Steps count optimizer steps from 0. Masks are updated before the optimizer steps for which
    :meth:`should_prune` is true, to the sparsity :meth:`sparsity_at` gives. As in TF-MOT, when
    ``end_step - begin_step`` is not a multiple of ``frequency`` the last update happens before ``end_step``,
    at a sparsity below ``final_sparsity`` (:attr:`last_pruning_step`, :meth:`reached_sparsity`).
    """

    initial_sparsity: float
    """Sparsity at ``begin_step``, in [0, 1)."""
    final_sparsity: float
    """Sparsity at ``end_step`` and after, in [0, 1) and >= ``initial_sparsity``."""
    begin_step: int
    """First step at which masks are updated (>= 0)."""
    end_step: int
    """Last step at which masks may be updated (>= ``begin_step``)."""
    power: float = 3.0
    """Exponent of the decay; 3 is Zhu & Gupta's cubic schedule, 1 is linear."""
    frequency: int = 100
    """Masks are updated every ``frequency`` steps from ``begin_step`` on."""

    def __post_init__(self) -> None:
        for name in ("begin_step", "end_step", "frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConfigError(f"{name} must be an integer, got {value!r}")
        if self.begin_step < 0:
            raise InvalidConfigError(f"begin_step must be >= 0, got {self.begin_step}")
        if self.end_step < self.begin_step:
            raise InvalidConfigError(
                f"end_step ({self.end_step}) precedes begin_step ({self.begin_step}); the schedule must end after it begins"
            )
        if self.frequency < 1:
            raise InvalidConfigError(f"frequency must be >= 1 step, got {self.frequency}")
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise InvalidConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.final_sparsity < self.initial_sparsity:
            raise InvalidConfigError(
                f"final_sparsity ({self.final_sparsity}) is below initial_sparsity ({self.initial_sparsity}); "
                "sparsity only grows"
            )
        if isinstance(self.power, bool) or not isinstance(self.power, int | float) or not self.power > 0:
            raise InvalidConfigError(f"power must be a number > 0, got {self.power!r}")
        if not math.isfinite(self.power):
            raise InvalidConfigError(f"power must be finite, got {self.power!r}")

    def sparsity_at(self, step: int) -> float:
        """Target sparsity at ``step`` (clamped: ``initial_sparsity`` before the begin, ``final_sparsity`` after
        the end)."""
        span = self.end_step - self.begin_step
        progress = 1.0 if span == 0 else min(1.0, max(0.0, (step - self.begin_step) / span))
        if span == 0 and step < self.begin_step:
            progress = 0.0
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power

    def should_prune(self, step: int) -> bool:
        """Whether masks are updated at ``step``: inside ``[begin_step, end_step]`` and on the frequency grid."""
        return self.begin_step <= step <= self.end_step and (step - self.begin_step) % self.frequency == 0

    @property
    def last_pruning_step(self) -> int:
        """The last step at which masks are updated."""
        return self.begin_step + (self.end_step - self.begin_step) // self.frequency * self.frequency

    def pruning_steps(self) -> list[int]:
        """Every step at which masks are updated, in order."""
        return list(range(self.begin_step, self.end_step + 1, self.frequency))

    def reached_sparsity(self) -> float:
        """The sparsity of the last mask update (``final_sparsity`` when the grid lands on ``end_step``)."""
        return self.sparsity_at(self.last_pruning_step)


# ---------------------------------------------------------------------------------------------------------
# masks: what is prunable, how sparse it is, stripping
# ---------------------------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module, keep: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every conv/linear layer whose weight unstructured pruning may zero, in definition
    order, without the layers named in ``keep`` (each must name a submodule: a typo would silently prune the
    layer it meant to keep, so it raises :class:`InvalidConfigError`)."""
    modules = dict(model.named_modules())
    unknown = [name for name in keep if name not in modules]
    if unknown:
        raise InvalidConfigError(f"keep names layers the model does not have: {', '.join(map(repr, unknown))}")
    return [(name, modules[name]) for name in sparsifiable_layers(model, tuple(keep))]


def _mask_of(module: nn.Module, name: str) -> torch.Tensor | None:
    mask = getattr(module, f"{name}_mask", None)
    return mask if isinstance(mask, torch.Tensor) else None


def _current(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor the next forward uses. While a reparametrisation is installed that is ``orig * mask``:
    ``module.<name>`` itself is only refreshed by the forward pre-hook, so after an optimizer step it still holds
    the previous step's values (pruning by it would rank stale magnitudes)."""
    orig, mask = getattr(module, f"{name}_orig", None), _mask_of(module, name)
    if isinstance(orig, torch.Tensor) and mask is not None:
        return orig * mask
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise InvalidConfigError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def sparsity(model: nn.Module, keep: Sequence[str] = ()) -> float:
    """Fraction of exactly-zero entries over the weights of the conv/linear layers (masked or stripped alike;
    biases and normalisation layers are not counted)."""
    zeros, total = 0, 0
    with torch.no_grad():
        for _, module in prunable_weights(model, keep):
            weight = _current(module, "weight")  # the masked weight while a pruning reparametrisation is installed
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0


def strip(model: nn.Module) -> nn.Module:
    """Remove every ``torch.nn.utils.prune`` reparametrisation in place (``prune.remove``): each pruned tensor
    becomes a plain parameter holding its masked values, so the zeros stay and no ``*_orig`` / ``*_mask`` entry,
    forward pre-hook or container is left. Returns ``model``."""
    for module in model.modules():
        names = [
            hook._tensor_name
            for hook in list(module._forward_pre_hooks.values())
            if isinstance(hook, torch_prune.BasePruningMethod)
        ]
        for name in names:
            torch_prune.remove(module, name)
    return model


def _sync(module: nn.Module, name: str) -> None:
    """Set ``module.<name>`` to ``<name>_orig * <name>_mask`` as a plain tensor outside autograd: what the forward
    pre-hook computes (it recomputes it, with gradients, before every forward), current rather than one optimizer
    step old, and without the graph that makes ``copy.deepcopy`` of the model fail."""
    with torch.no_grad():
        setattr(module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask"))


def _sync_all(model: nn.Module) -> None:
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                _sync(module, hook._tensor_name)


def _masked_count(params: Sequence[tuple[nn.Module, str]]) -> int:
    return sum(int((mask == 0).sum()) for m, name in params if (mask := _mask_of(m, name)) is not None)


def prune_to(params: Sequence[tuple[nn.Module, str]], target: float) -> int:
    """Raise the global sparsity of ``params`` to ``target`` by masking the smallest surviving weights: one L1
    threshold across all of them, ranked on their current values (the selection of
    ``prune.global_unstructured``); already pruned weights stay pruned. The first call installs a
    ``torch.nn.utils.prune`` mask on each tensor (``prune.custom_from_mask``); later calls update that mask in place
    rather than stacking one more pruning method (and mask copy) per update in a ``PruningContainer``. Returns how
    many weights were newly masked (0 when the masks already reach ``target``)."""
    if not params:
        return 0
    total = sum(_current(m, name).numel() for m, name in params)
    extra = round(target * total) - _masked_count(params)
    if extra <= 0:
        return 0
    with torch.no_grad():
        current = [_current(m, name) for m, name in params]
        masks = [_mask_of(m, name) for m, name in params]
        alive = torch.cat(
            [(torch.ones_like(c) if k is None else k).flatten() != 0 for c, k in zip(current, masks, strict=True)]
        )
        scores = torch.cat([c.detach().abs().flatten() for c in current]).masked_fill(~alive, math.inf)
        extra = min(extra, int(alive.sum()))
        alive[torch.topk(scores, extra, largest=False).indices] = False
    pointer = 0
    for (module, name), value, mask in zip(params, current, masks, strict=True):
        new = alive[pointer : pointer + value.numel()].view_as(value).to(value.dtype)
        pointer += value.numel()
        if mask is None:
            torch_prune.custom_from_mask(module, name, mask=new)
        else:
            with torch.no_grad():
                mask.copy_(new)
        _sync(module, name)
    return extra


# ---------------------------------------------------------------------------------------------------------
# the training loop shared by gradual pruning and the lottery ticket
# ---------------------------------------------------------------------------------------------------------
def _check_recipe(config: RecoveryConfig, dataset: Dataset) -> None:
    if not dataset.has_labels:
        raise DatasetError(f"dataset {dataset.name!r} has no labels: training-time pruning needs labelled data")
    if not config.finetunes:
        raise InvalidConfigError("training-time pruning needs a training recipe: set finetune_steps or finetune_epochs")
    if config.early_stopping_patience > 0:
        raise InvalidConfigError(
            "early stopping is not available while pruning during training (restoring a checkpoint would undo masks)"
        )
    if config.distill:
        raise InvalidConfigError("distillation is not available while pruning during training; use recover() after")
    if config.time_budget_s is not None:
        raise InvalidConfigError("a time budget is not available while pruning during training: set steps or epochs")


def train(
    model: nn.Module,
    dataset: Dataset,
    config: RecoveryConfig,
    *,
    start_step: int = 0,
    before_step: Callable[[int], None] | None = None,
) -> float:
    """Train ``model`` in place with cross-entropy under ``config``'s recipe (steps or epochs, AdamW or SGD, LR
    schedule with warm-up, weight decay, batch size, seed), from optimizer step ``start_step`` to the recipe's last
    step; the learning rate follows the schedule of the whole run, so a run resumed at ``start_step`` (weight
    rewinding) continues it. ``before_step(step)`` runs before each optimizer step (mask updates, snapshots).

    Pruning reparametrisations installed on the model stay valid: ``prune`` keeps the parameter object (renamed
    ``*_orig``), so the optimizer keeps updating it and masked entries stay masked; at the end each masked tensor
    is refreshed from its ``*_orig`` and mask outside autograd (current, and the model can be deep-copied). Batches and any randomness
    come from ``config.seed`` and ``start_step``; the caller's RNG state is left untouched. Returns the mean
    training loss of the last 20 steps (NaN when no step ran); raises :class:`InvalidConfigError` on a
    non-finite loss. The model is left in eval mode.
    """
    _check_recipe(config, dataset)
    total = config.total_steps(dataset.num_train)
    if not 0 <= start_step <= total:
        raise InvalidConfigError(f"start_step must be in [0, {total}], got {start_step}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, config.lr_at(start_step, total))
    batches = dataset.train_batches(
        config.batch_size,
        seed=config.seed + start_step,
        max_batches=total - start_step,
        drop_last=dataset.num_train > config.batch_size,
    )
    device = model_device(model)
    recent: list[float] = []
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed + start_step)
        model.train()
        for step, (x, y) in zip(range(start_step, total), batches, strict=True):
            if before_step is not None:
                before_step(step)
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step, total)
            assert y is not None
            loss = F.cross_entropy(as_output_tensor(call_model(model, to_device(x, device))), y.to(device))
            if not bool(torch.isfinite(loss)):
                _sync_all(model)
                model.eval()
                raise InvalidConfigError(f"the training loss became non-finite at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent = [*recent[-19:], float(loss.detach())]
    _sync_all(model)
    model.eval()
    return sum(recent) / len(recent) if recent else math.nan


# ---------------------------------------------------------------------------------------------------------
# gradual magnitude pruning
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradualProgress:
    """One mask update of :func:`gradual_magnitude_prune` (passed to ``on_progress``)."""

    step: int
    """Optimizer step before which the masks were updated."""
    total_steps: int
    """Steps of the whole run."""
    target: float
    """The schedule's sparsity at this step."""
    sparsity: float
    """Sparsity of the prunable weights after the update."""


@dataclass(frozen=True)
class GradualReport:
    """What :func:`gradual_magnitude_prune` did."""

    steps: int
    """Optimizer steps trained."""
    updates: tuple[tuple[int, float], ...]
    """``(step, target sparsity)`` of every mask update."""
    target_sparsity: float
    """The schedule's sparsity at its last update."""
    sparsity: float
    """Achieved sparsity of the prunable weights (fraction of zeros) at the end of training."""
    train_loss: float
    """Mean training loss of the last steps."""
    layers: tuple[str, ...] = field(default=())
    """The layers whose weights were pruned."""


def gradual_magnitude_prune(
    model: nn.Module,
    dataset: Dataset,
    schedule: PolynomialDecay,
    config: RecoveryConfig,
    *,
    keep: Sequence[str] = (),
    on_progress: Callable[[GradualProgress], None] | None = None,
) -> GradualReport:
    """Train ``model`` in place while ``schedule`` raises its unstructured sparsity (Zhu & Gupta 2017).

    Before every step where ``schedule.should_prune(step)``, one global L1 magnitude threshold over the weights
    of all conv/linear layers (except ``keep``) masks the smallest surviving weights until the sparsity is
    ``schedule.sparsity_at(step)`` (:func:`prune_to`); masked weights stay masked
    while training goes on. ``config`` gives the recipe (:func:`train`); its run must be long enough for the
    schedule's last update. The model keeps its pruning reparametrisations (training can continue): call
    :func:`strip` for a plain model. Returns a :class:`GradualReport` with the achieved sparsity.
    """
    _check_recipe(config, dataset)
    total = config.total_steps(dataset.num_train)
    last = schedule.last_pruning_step
    if last >= total:
        raise InvalidConfigError(
            f"the schedule updates masks until step {last} but training runs {total} steps (0..{total - 1}); "
            "end the schedule earlier or train longer"
        )
    layers = prunable_weights(model, keep)
    if not layers:
        raise InvalidConfigError("the model has no conv or linear weights to prune")
    params = [(module, "weight") for _, module in layers]
    updates: list[tuple[int, float]] = []

    def before_step(step: int) -> None:
        if not schedule.should_prune(step):
            return
        target = schedule.sparsity_at(step)
        prune_to(params, target)
        updates.append((step, target))
        if on_progress is not None:
            on_progress(GradualProgress(step, total, target, sparsity(model, keep)))

    loss = train(model, dataset, config, before_step=before_step)
    return GradualReport(
        steps=total,
        updates=tuple(updates),
        target_sparsity=updates[-1][1] if updates else 0.0,
        sparsity=sparsity(model, keep),
        train_loss=loss,
        layers=tuple(name for name, _ in layers),
    )


# ---------------------------------------------------------------------------------------------------------
# iterative structured pruning
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IterativeStep:
    """One increment of :func:`iterative_prune`."""

    step: int
    """1-based increment."""
    fraction: float
    """Fraction of the plan reached after this increment (1.0 at the last)."""
    widths: tuple[tuple[str, int], ...]
    """Units per pruned group after this increment."""
    params: int
    """Parameters of the model after this increment."""
    output_shape: tuple[int, ...]
    """Output shape of the forward run after pruning (the pruned model runs)."""
    finetune: FinetuneReport | None
    """The recovery's last fine-tune report, if it fine-tuned."""


@dataclass(frozen=True, eq=False)
class IterativeResult:
    """The pruned, recovered model of :func:`iterative_prune` and what each increment did."""

    model: nn.Module
    """The pruned, recovered model (in eval mode); the base model is left as it was."""
    plan: Plan
    """The one-shot plan the increments reach."""
    steps: tuple[IterativeStep, ...]
    widths: tuple[tuple[str, int], ...]
    """Final units per pruned group: those of a one-shot application of :attr:`plan`."""


def _report(
    reports: list[FinetuneReport], forward: Callable[[FinetuneReport], None] | None, report: FinetuneReport
) -> None:
    reports.append(report)
    if forward is not None:
        forward(report)


def _fraction(i: int, steps: int, schedule: str) -> float:
    t = i / steps
    return t if schedule == "linear" else 1.0 - (1.0 - t) ** 3


def _widths(model: nn.Module, example_inputs: Inputs, names: Sequence[str], keep: Sequence[str]) -> dict[str, int]:
    structure = analyze(model, example_inputs, keep=keep)
    return {name: structure.group(name).units for name in names}


def _as_plan(
    model: nn.Module, example_inputs: Inputs, ratios: Plan | Mapping[str, float] | float, keep: Sequence[str]
) -> Plan:
    if isinstance(ratios, Plan):
        plan = ratios
    elif isinstance(ratios, Mapping):
        plan = Plan(ratios=tuple(ratios.items()))
    else:
        plan = Plan.uniform(analyze(model, example_inputs, keep=keep).names, float(ratios))
    if plan.method != "structured":
        raise InvalidConfigError("iterative_prune takes a structured plan; use gradual_magnitude_prune for sparsity")
    return plan


def iterative_prune(
    model: nn.Module,
    example_inputs: Inputs,
    dataset: Dataset,
    ratios: Plan | Mapping[str, float] | float,
    *,
    steps: int = 3,
    recovery: RecoveryConfig | None = None,
    schedule: str = "linear",
    keep: Sequence[str] = (),
    teacher: nn.Module | None = None,
    on_step: Callable[[IterativeStep], None] | None = None,
    on_finetune: Callable[[FinetuneReport], None] | None = None,
    train_step: TrainStep | None = None,
    after_prune: AfterPrune | None = None,
) -> IterativeResult:
    """Reach a structured plan in ``steps`` increments: prune a fraction, recover, repeat (the base model is not
    modified).

    ``ratios``: a :class:`Plan`, a ``{group: ratio}`` mapping, or one ratio for every group. After increment ``i``
    the model has the widths of the plan scaled by ``i / steps`` (``linear``) or ``1 - (1 - i / steps) ** 3``
    (``cubic``: large cuts first, small ones last, Zhu & Gupta's shape) applied once to the base model. Each
    increment prunes the *current* model (channels chosen by ``plan.criterion`` on its recovered weights) with
    ratios re-expressed relative to its current widths, so the last increment ends exactly at the one-shot plan's
    widths (checked). Every pruned model runs a forward before it is recovered with
    :func:`autoprune.recovery.recover` under ``recovery`` (BatchNorm re-estimation, then fine-tuning if the recipe
    asks); with distillation or label-free data the teacher defaults to the unpruned base model. ``recovery``
    is the recipe of *each* increment (:meth:`RecoveryConfig.per_increment` splits a whole budget over them).
    ``on_finetune`` receives every increment's fine-tune progress; ``train_step`` replaces the built-in loss;
    ``after_prune(model, plan)`` fixes up every increment's pruned model (as in :class:`PruningContext`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if schedule not in ITERATIVE_SCHEDULES:
        raise InvalidConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(ITERATIVE_SCHEDULES)}")
    recovery = recovery or RecoveryConfig()
    plan = _as_plan(model, example_inputs, ratios, keep)
    if recovery.finetunes and teacher is None and (recovery.distill or not dataset.has_labels):
        teacher = model
    calibration = (
        list(dataset.train_batches(recovery.batch_size, seed=recovery.seed, max_batches=4))
        if plan.criterion == "taylor"
        else None
    )
    base = PruningContext(model, example_inputs, keep=keep, calibration=calibration, after_prune=after_prune)
    ratios_full = {name: r for name, r in plan.ratios if r > 0}
    names = list(ratios_full)
    current = model
    width = {g.name: g.units for g in base.structure.groups if g.name in ratios_full}
    done: list[IterativeStep] = []
    for i in range(1, steps + 1):
        fraction = _fraction(i, steps, schedule)
        reached = base.apply(plan.with_ratios({n: r * fraction for n, r in ratios_full.items()}))
        target = _widths(reached, example_inputs, names, keep)
        relative = {n: (width[n] - target[n]) / width[n] for n in names if target[n] < width[n]}
        if i == 1:  # the current model is still the base: the first increment is the base's own pruning
            current, width = reached, dict(target)
        elif relative:
            step_plan = Plan(ratios=tuple(relative.items()), criterion=plan.criterion, round_to=1, seed=plan.seed)
            if plan.criterion == "taylor":
                calibration = list(dataset.train_batches(recovery.batch_size, seed=recovery.seed + i, max_batches=4))
            current = PruningContext(
                current, example_inputs, keep=keep, calibration=calibration, after_prune=after_prune
            ).apply(step_plan)
            width = _widths(current, example_inputs, names, keep)
        if width != target:
            raise PruningError(f"increment {i} reached widths {width}, expected {target}")
        with eval_mode(current), torch.no_grad():
            out = as_output_tensor(call_model(current, example_inputs))
        reports: list[FinetuneReport] = []
        recover(
            current,
            dataset,
            recovery,
            teacher=teacher,
            on_progress=functools.partial(_report, reports, on_finetune),
            train_step=train_step,
        )
        record = IterativeStep(
            step=i,
            fraction=fraction,
            widths=tuple(width.items()),
            params=sum(p.numel() for p in current.parameters()),
            output_shape=tuple(out.shape),
            finetune=reports[-1] if reports else None,
        )
        done.append(record)
        if on_step is not None:
            on_step(record)
    return IterativeResult(model=current.eval(), plan=plan, steps=tuple(done), widths=tuple(width.items()))


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy (convenience for benchmarks that prune several variants of one trained model)."""
    return copy.deepcopy(model)
