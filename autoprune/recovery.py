"""Quality recovery after pruning: BatchNorm recalibration, then a real fine-tuning stage.

:func:`recover` is the single entry point: it recalibrates BatchNorm statistics on a few training batches
(adaptive BN), then fine-tunes if asked: for ``finetune_steps`` steps or ``finetune_epochs`` epochs (capped by
``time_budget_s``), AdamW or SGD with Nesterov momentum, a constant, cosine or one-cycle learning rate after a
linear warm-up, knowledge distillation from the unpruned model (logits, or outputs for non-classifiers;
label-free data distils from inputs alone), and early stopping on the validation loss with the best checkpoint
restored. Unstructured sparsity survives: with ``keep_sparsity`` the zeros of every weight stay zero. Same model, data and config give
bit-identical weights: batches come from a generator seeded with ``config.seed`` and any other randomness
(dropout) draws from a forked, seeded global RNG, so the caller's RNG state is left untouched.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.cost import eval_mode
from autoprune.data import Batch, Dataset, as_output_tensor, model_device
from autoprune.errors import DatasetError, InvalidConfigError
from autoprune.inputs import Inputs, batch_len, call_model, split_batch, to_device
from autoprune.names import ITERATIVE_SCHEDULES, LR_SCHEDULES, OPTIMIZERS

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "FinetuneReport",
    "RecoveryConfig",
    "finetune",
    "recalibrate_batchnorm",
    "recalibration_batches",
    "recover",
]

SCHEDULES = LR_SCHEDULES


@dataclass(frozen=True)
class RecoveryConfig:
    """How to recover a pruned model's quality. The defaults only recalibrate BatchNorm (no training)."""

    bn_recalibration_batches: int = 8
    """Training batches forwarded to re-estimate BatchNorm running statistics (adaptive BN); 0 disables."""
    finetune_steps: int = 0
    """Optimizer steps of fine-tuning after recalibration; 0 disables fine-tuning."""
    finetune_lr: float = 1e-3
    """Peak learning rate for fine-tuning."""
    finetune_epochs: float = 0.0
    """Fine-tune for this many passes over the training split instead of ``finetune_steps`` (set one, not
    both)."""
    optimizer: str = "adamw"
    """``adamw`` or ``sgd`` (Nesterov momentum :attr:`momentum`)."""
    momentum: float = 0.9
    """SGD momentum."""
    lr_schedule: str = "constant"
    """``constant``, ``cosine`` (decay to 0 after warm-up) or ``onecycle`` (warm-up to the peak over 30% of the
    steps when ``warmup_steps`` is 0, then cosine decay)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``finetune_lr``."""
    early_stopping_patience: int = 0
    """Stop after this many validation checks without a lower validation loss and restore the best checkpoint;
    0 disables (the last weights are kept)."""
    eval_every: int = 0
    """Steps between validation checks for early stopping; 0: once per epoch."""
    time_budget_s: float | None = None
    """Stop fine-tuning after this many seconds (wall clock: runs stop at different steps; None: no limit)."""
    keep_sparsity: bool = False
    """Keep every weight that is exactly zero when fine-tuning starts at zero (unstructured pruning: without it
    the optimizer refills the pruned weights)."""
    batch_size: int = 64
    """Batch size for both recalibration and fine-tuning."""
    distill: bool = False
    """Add knowledge distillation from the teacher (the unpruned model) to the labelled loss. Label-free
    datasets always use pure distillation and need a teacher regardless of this flag."""
    distill_temperature: float = 4.0
    """Softmax temperature of the distillation loss (the loss is scaled by ``T**2``)."""
    distill_alpha: float = 0.5
    """Weight of the distillation loss against cross-entropy: ``alpha * KD + (1 - alpha) * CE``."""
    weight_decay: float = 0.0
    """AdamW weight decay for fine-tuning."""
    seed: int = 0
    """Seed of batch order and of any randomness in the model during recovery (dropout)."""
    prune_steps: int = 1
    """Reach a structured plan in this many prune + fine-tune increments (1: prune once, then fine-tune). The
    fine-tune budget (steps, epochs, time) is the whole recovery's, split evenly over the increments
    (:meth:`per_increment`); more than 1 needs a recipe that fine-tunes."""
    prune_schedule: str = "linear"
    """How the increments spread the plan: ``linear`` (even cuts) or ``cubic`` (large cuts first, small ones
    last: Zhu & Gupta's polynomial schedule)."""

    def __post_init__(self) -> None:
        if self.bn_recalibration_batches < 0:
            raise InvalidConfigError(f"bn_recalibration_batches must be >= 0, got {self.bn_recalibration_batches}")
        if self.finetune_steps < 0:
            raise InvalidConfigError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise InvalidConfigError(f"finetune_lr must be a positive number, got {self.finetune_lr}")
        if self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise InvalidConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise InvalidConfigError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.finetune_epochs) and self.finetune_epochs >= 0):
            raise InvalidConfigError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.finetune_epochs > 0 and self.finetune_steps > 0:
            raise InvalidConfigError("set finetune_steps or finetune_epochs, not both")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise InvalidConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise InvalidConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("warmup_steps", "early_stopping_patience", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if (
            isinstance(self.prune_steps, bool)
            or not isinstance(self.prune_steps, int)
            or not 1 <= self.prune_steps <= 100
        ):
            raise InvalidConfigError(f"prune_steps must be an integer in [1, 100], got {self.prune_steps!r}")
        if self.prune_schedule not in ITERATIVE_SCHEDULES:
            raise InvalidConfigError(
                f"unknown prune_schedule {self.prune_schedule!r}; choose one of {', '.join(ITERATIVE_SCHEDULES)}"
            )
        if self.prune_steps > 1 and not self.finetunes:
            raise InvalidConfigError(
                "prune_steps > 1 prunes and fine-tunes in increments: give finetune_steps or finetune_epochs"
            )
        if self.time_budget_s is not None and not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise InvalidConfigError(f"time_budget_s must be a positive number of seconds, got {self.time_budget_s}")

    @property
    def finetunes(self) -> bool:
        """Whether this recipe trains at all."""
        return self.finetune_steps > 0 or self.finetune_epochs > 0

    def per_increment(self) -> RecoveryConfig:
        """The recipe of one of :attr:`prune_steps` increments: the fine-tune's steps, epochs, warm-up and time
        budget divided by the number of increments (at least one step each); every increment restarts the
        learning-rate schedule; early stopping is unchanged."""
        if self.prune_steps == 1:
            return self
        k = self.prune_steps
        return dataclasses.replace(
            self,
            prune_steps=1,
            prune_schedule="linear",
            finetune_steps=max(1, self.finetune_steps // k) if self.finetune_steps else 0,
            finetune_epochs=self.finetune_epochs / k,
            warmup_steps=self.warmup_steps // k,
            time_budget_s=None if self.time_budget_s is None else self.time_budget_s / k,
        )

    def describe(self) -> str:
        """The fine-tuning recipe in a few words (``20 epochs, sgd lr 0.05 cosine, warm-up 20, distilled``)."""
        if not self.finetunes:
            return "no fine-tuning"
        length = f"{self.finetune_epochs:g} epochs" if self.finetune_epochs > 0 else f"{self.finetune_steps} steps"
        parts = [length, f"{self.optimizer} lr {self.finetune_lr:g} {self.lr_schedule}"]
        if self.warmup_steps:
            parts.append(f"warm-up {self.warmup_steps}")
        if self.early_stopping_patience:
            parts.append(f"early stopping {self.early_stopping_patience}")
        if self.distill:
            parts.append("distilled")
        if self.prune_steps > 1:
            parts.append(f"reached in {self.prune_steps} {self.prune_schedule} prune + fine-tune increments")
        return ", ".join(parts)

    def total_steps(self, num_train: int) -> int:
        """Optimizer steps this recipe takes on a training split of ``num_train`` samples (before early
        stopping or the time budget end it)."""
        if self.finetune_epochs > 0:
            per_epoch = max(1, num_train // min(self.batch_size, num_train))
            return max(1, math.ceil(self.finetune_epochs * per_epoch))
        return self.finetune_steps

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) out of ``total``."""
        warm = self.warmup_steps
        if self.lr_schedule == "onecycle" and warm == 0:
            warm = max(1, int(0.3 * total))
        if step < warm:
            return self.finetune_lr * (step + 1) / warm
        if self.lr_schedule == "constant":
            return self.finetune_lr
        span = max(1, total - warm)
        return self.finetune_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / span)))


@dataclass(frozen=True)
class FinetuneReport:
    """What one fine-tune did (``finetune(..., on_progress=...)`` also receives one per validation check)."""

    steps: int
    """Optimizer steps taken."""
    total_steps: int
    """Steps the recipe asked for."""
    best_step: int | None
    """Step of the restored checkpoint (early stopping), else None."""
    best_val_loss: float | None
    """Validation loss of that checkpoint (or of the last check), else None."""
    stopped: str
    """``done``, ``early_stopping``, ``time_budget`` or ``non_finite_loss``."""


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/variance from ``batches`` (adaptive BN), in place.

    Running statistics are reset and accumulated as an exact cumulative average (``momentum=None``) over the
    batches; each layer's momentum is restored afterwards. Only the BatchNorm layers run in train mode, so
    dropout stays off and the statistics match what BatchNorm sees at inference. Runs under ``no_grad`` and
    restores every module's previous mode. Batches are tensors or ``(x, y)`` tuples. A model without
    (tracking) BatchNorm, or an empty ``batches``, is left untouched and ``batches`` is not consumed for a
    model without BatchNorm. Returns ``model``.
    """
    bns = _batchnorms(model)
    if not bns:
        return model
    it = iter(batches)
    first = next(it, None)
    if first is None:  # resetting without data would wipe the statistics
        return model
    device = model_device(model)
    momenta = {bn: bn.momentum for bn in bns}
    try:
        with eval_mode(model), torch.no_grad():  # eval_mode restores every module's mode, the BatchNorms' too
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            batch: Any = first
            while batch is not None:
                x, _ = split_batch(batch)
                call_model(model, to_device(x, device))
                batch = next(it, None)
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    return model


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    if student.ndim != 2:  # not class scores (embeddings, feature maps): match the outputs directly
        return F.mse_loss(student, teacher)
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def _loss(
    model: nn.Module,
    teacher: nn.Module | None,
    x: Inputs,
    y: torch.Tensor | None,
    config: RecoveryConfig,
    use_kd: bool,
    alpha: float,
) -> torch.Tensor:
    device = model_device(model)
    out = as_output_tensor(call_model(model, to_device(x, device)))
    if not use_kd:
        assert y is not None
        return F.cross_entropy(out, y.to(device))
    assert teacher is not None
    with torch.no_grad():
        t_out = as_output_tensor(call_model(teacher, to_device(x, model_device(teacher)))).to(device)
    loss = alpha * _kd_loss(out, t_out, config.distill_temperature)
    if y is not None and alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(out, y.to(device))
    return loss


TrainStep = Callable[[nn.Module, tuple[Any, torch.Tensor | None]], torch.Tensor]
"""A user's loss: ``train_step(model, (x, y)) -> loss`` (``y`` is None on label-free data; ``x`` is a tensor or,
for keyword inputs, a dict of tensors); the fine-tune calls ``backward`` and steps the optimizer."""


def _val_loss(
    model: nn.Module, dataset: Dataset, config: RecoveryConfig, loss_of: Callable[[Any, Any], torch.Tensor]
) -> float:
    """Mean training loss on the validation split, in eval mode (the early-stopping signal)."""
    total, n = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for x, y in dataset.val_batches(max(config.batch_size, 256)):
            total += float(loss_of(x, y)) * batch_len(x)
            n += batch_len(x)
    return total / max(n, 1)


def make_optimizer(params: list[nn.Parameter], config: RecoveryConfig, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params`` at learning rate ``lr``: SGD (Nesterov when ``momentum`` > 0) or
    AdamW, with the recipe's weight decay."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def finetune(
    model: nn.Module,
    dataset: Dataset,
    config: RecoveryConfig,
    *,
    teacher: nn.Module | None = None,
    on_progress: Callable[[FinetuneReport], None] | None = None,
    train_step: TrainStep | None = None,
) -> nn.Module:
    """Fine-tune ``model`` in place under ``config`` (steps or epochs, optimizer, LR schedule, warm-up,
    distillation, early stopping on the validation loss, time budget, kept sparsity).

    ``train_step(model, (x, y)) -> loss`` replaces the built-in loss with the user's own (a detection loss, a
    masked-LM loss, ...): the recipe still sets the optimizer, schedule, batches, early stopping (on the same loss
    over the validation split) and kept sparsity. It cannot be combined with ``config.distill``.

    Loss: cross-entropy on labels; with ``config.distill`` (needs ``teacher``) ``alpha * KD + (1 - alpha) *
    CE``; on a label-free dataset pure distillation from ``teacher`` (inputs alone). KD is the ``T**2``-scaled
    KL divergence between softened teacher and student distributions (mean-squared error for outputs that are
    not ``(B, K)``). Training stops early if the loss becomes non-finite. ``on_progress`` receives a
    :class:`FinetuneReport` at every validation check and once at the end. Returns ``model`` in eval mode; the
    teacher's modes are restored. Without a time budget, the same inputs give identical weights.
    """
    if not config.finetunes:
        return model.eval()
    labelled = dataset.has_labels
    if train_step is not None and config.distill:
        raise InvalidConfigError("train_step is the loss: distil inside it, or drop distill")
    if train_step is not None:
        teacher = None  # the user's loss decides what it compares with
    elif not labelled and teacher is None:
        raise DatasetError(
            f"dataset {dataset.name!r} has no labels: fine-tuning it needs a teacher model to distil from"
        )
    if labelled and config.distill and teacher is None:
        raise InvalidConfigError("distill=True needs a teacher model")
    use_kd = teacher is not None and (config.distill or not labelled)
    alpha = config.distill_alpha if labelled else 1.0
    device = model_device(model)

    def loss_of(x: Inputs, y: torch.Tensor | None) -> torch.Tensor:
        if train_step is None:
            return _loss(model, teacher, x, y, config, use_kd, alpha)
        return train_step(model, (to_device(x, device), None if y is None else y.to(device)))

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return model.eval()
    total = config.total_steps(dataset.num_train)
    bs = min(config.batch_size, dataset.num_train)
    eval_every = config.eval_every or max(1, dataset.num_train // bs)
    teacher_modes = {m: m.training for m in teacher.modules()} if teacher is not None else {}
    optimizer = make_optimizer(params, config, config.lr_at(0, total))
    masks = (
        [(p, p.detach() != 0) for p in params if p.dim() > 1 and bool((p.detach() == 0).any())]
        if config.keep_sparsity
        else []
    )
    batches = dataset.train_batches(
        config.batch_size, seed=config.seed, max_batches=total, drop_last=dataset.num_train > config.batch_size
    )
    started = time.monotonic()
    step, stopped = 0, "done"
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    checks_since_best = 0
    last_val: float | None = None
    # fork every CUDA generator too (torch.manual_seed seeds them all); none on a CPU-only machine
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            if teacher is not None:
                teacher.eval()
            model.train()
            for x, y in batches:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(step, total)
                loss = loss_of(x, y)
                if not bool(torch.isfinite(loss)):
                    stopped = "non_finite_loss"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if masks:
                    with torch.no_grad():
                        for p, keep in masks:
                            p.mul_(keep)
                if config.early_stopping_patience > 0 and (step % eval_every == 0 or step == total):
                    last_val = _val_loss(model, dataset, config, loss_of)
                    if best is None or last_val < best[0]:
                        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        best, checks_since_best = (last_val, step, state), 0
                    else:
                        checks_since_best += 1
                    if on_progress is not None:
                        on_progress(FinetuneReport(step, total, best[1], best[0], "running"))
                    if checks_since_best >= config.early_stopping_patience:
                        stopped = "early_stopping"
                        break
                elif on_progress is not None and step % eval_every == 0:
                    on_progress(FinetuneReport(step, total, None, None, "running"))
                if config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s:
                    stopped = "time_budget"
                    break
    finally:
        for m, mode in teacher_modes.items():
            m.training = mode
    if best is not None:
        model.load_state_dict(best[2])
    if on_progress is not None:
        on_progress(
            FinetuneReport(
                step,
                total,
                None if best is None else best[1],
                last_val if best is None else best[0],
                stopped,
            )
        )
    return model.eval()


def recalibration_batches(dataset: Dataset, config: RecoveryConfig) -> list[Batch]:
    """The training batches :func:`recover` forwards to re-estimate BatchNorm statistics under ``config``
    (the same every time: drawn from ``config.seed``). Callers recovering many models draw them once."""
    if config.bn_recalibration_batches == 0:
        return []
    return list(
        dataset.train_batches(
            config.batch_size,
            seed=config.seed,
            max_batches=config.bn_recalibration_batches,
            drop_last=dataset.num_train > config.batch_size,
        )
    )


def recover(
    model: nn.Module,
    dataset: Dataset,
    config: RecoveryConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    bn_batches: Sequence[Batch] | None = None,
    on_progress: Callable[[FinetuneReport], None] | None = None,
    train_step: TrainStep | None = None,
) -> nn.Module:
    """Recover a pruned model in place: BatchNorm recalibration on ``config.bn_recalibration_batches``
    training batches, then fine-tuning when the recipe asks for it (see :func:`finetune`; ``train_step``: the
    user's own loss).
    Deterministic: the same inputs and seed give identical weights. Returns ``model`` in eval mode.

    ``bn_batches``: the recalibration batches, if already drawn with :func:`recalibration_batches` for this
    dataset and config (drawn here otherwise)."""
    config = config or RecoveryConfig()
    if config.bn_recalibration_batches > 0:
        recalibrate_batchnorm(model, recalibration_batches(dataset, config) if bn_batches is None else bn_batches)
    if config.finetunes:
        return finetune(model, dataset, config, teacher=teacher, on_progress=on_progress, train_step=train_step)
    return model.eval()
