"""Cheap quality recovery after pruning: BatchNorm recalibration and a short (optionally distilled) fine-tune.

:func:`recover` is the single entry point: it recalibrates BatchNorm statistics on a few training batches
(adaptive BN), then fine-tunes for ``finetune_steps`` steps if asked. Same model, data and config give
bit-identical weights: batches come from a generator seeded with ``config.seed`` and any other randomness
(dropout) draws from a forked, seeded global RNG, so the caller's RNG state is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.cost import eval_mode
from autoprune.data import Batch, Dataset, as_output_tensor, model_device
from autoprune.errors import DatasetError, InvalidConfigError

__all__ = ["RecoveryConfig", "finetune", "recalibrate_batchnorm", "recalibration_batches", "recover"]


@dataclass(frozen=True)
class RecoveryConfig:
    """How to recover a pruned model's quality. The defaults only recalibrate BatchNorm (no training)."""

    bn_recalibration_batches: int = 8
    """Training batches forwarded to re-estimate BatchNorm running statistics (adaptive BN); 0 disables."""
    finetune_steps: int = 0
    """Optimizer steps of fine-tuning after recalibration; 0 disables fine-tuning."""
    finetune_lr: float = 1e-3
    """AdamW learning rate for fine-tuning."""
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
                x = batch if isinstance(batch, torch.Tensor) else batch[0]
                model(x.to(device))
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


def finetune(
    model: nn.Module, dataset: Dataset, config: RecoveryConfig, *, teacher: nn.Module | None = None
) -> nn.Module:
    """Fine-tune ``model`` in place for ``config.finetune_steps`` AdamW steps on shuffled training batches.

    Loss: cross-entropy on labels; with ``config.distill`` (needs ``teacher``) ``alpha * KD + (1 - alpha) *
    CE``; on a label-free dataset pure distillation from ``teacher``. KD is the ``T**2``-scaled KL divergence
    between softened teacher and student distributions (mean-squared error for outputs that are not
    ``(B, K)``). Training stops early if the loss becomes non-finite. Returns ``model`` in eval mode; the
    teacher's modes are restored.
    """
    if config.finetune_steps == 0:
        return model.eval()
    labelled = dataset.has_labels
    if not labelled and teacher is None:
        raise DatasetError(
            f"dataset {dataset.name!r} has no labels: fine-tuning it needs a teacher model to distil from"
        )
    if labelled and config.distill and teacher is None:
        raise InvalidConfigError("distill=True needs a teacher model")
    use_kd = teacher is not None and (config.distill or not labelled)
    alpha = config.distill_alpha if labelled else 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return model.eval()
    device = model_device(model)
    teacher_modes = {m: m.training for m in teacher.modules()} if teacher is not None else {}
    optimizer = torch.optim.AdamW(params, lr=config.finetune_lr, weight_decay=config.weight_decay)
    batches = dataset.train_batches(
        config.batch_size,
        seed=config.seed,
        max_batches=config.finetune_steps,
        drop_last=dataset.num_train > config.batch_size,
    )
    # fork every CUDA generator too (torch.manual_seed seeds them all); none on a CPU-only machine
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            if teacher is not None:
                teacher.eval()
            model.train()
            for x, y in batches:
                x = x.to(device)
                out = as_output_tensor(model(x))
                if use_kd:
                    assert teacher is not None
                    with torch.no_grad():
                        t_out = as_output_tensor(teacher(x.to(model_device(teacher)))).to(device)
                    loss = alpha * _kd_loss(out, t_out, config.distill_temperature)
                    if labelled and alpha < 1.0:
                        assert y is not None
                        loss = loss + (1.0 - alpha) * F.cross_entropy(out, y.to(device))
                else:
                    assert y is not None
                    loss = F.cross_entropy(out, y.to(device))
                if not bool(torch.isfinite(loss)):
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for m, mode in teacher_modes.items():
            m.training = mode
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
) -> nn.Module:
    """Recover a pruned model in place: BatchNorm recalibration on ``config.bn_recalibration_batches``
    training batches, then ``config.finetune_steps`` steps of fine-tuning (see :func:`finetune`).
    Deterministic: the same inputs and seed give identical weights. Returns ``model`` in eval mode.

    ``bn_batches``: the recalibration batches, if already drawn with :func:`recalibration_batches` for this
    dataset and config (drawn here otherwise)."""
    config = config or RecoveryConfig()
    if config.bn_recalibration_batches > 0:
        recalibrate_batchnorm(model, recalibration_batches(dataset, config) if bn_batches is None else bn_batches)
    if config.finetune_steps > 0:
        return finetune(model, dataset, config, teacher=teacher)
    return model.eval()
