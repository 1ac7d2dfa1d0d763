"""Lottery tickets: iterative magnitude pruning with weight rewinding.

:func:`find_ticket` is the procedure of Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis"), with the weight
rewinding of Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis"):

1. train the dense model under the recipe, keeping a snapshot of every parameter and buffer as they were after
   ``rewind_step`` optimizer steps (``rewind_step=0``: the initialisation, the original hypothesis);
2. mask the smallest surviving weights, one global magnitude threshold over every conv/linear layer, so that
   each round keeps the same fraction ``(1 - sparsity) ** (1 / rounds)`` of the survivors and round ``r`` ends at
   sparsity ``1 - (1 - sparsity) ** (r / rounds)``;
3. rewind the survivors (and biases, normalisation parameters and buffers) to the snapshot, masks kept;
4. retrain from ``rewind_step`` to the end of the recipe (the learning-rate schedule resumes where it was) and
   go back to 2 until ``rounds`` rounds are done; the last retraining gives the ticket.

:func:`random_reinit` is the paper's control: the same masks on freshly initialised weights, trained the same
way. A ticket is a ticket when it beats it (``benchmarks/lottery.py``). Training, masking and stripping are those
of :mod:`autoprune.gradual` (:func:`~autoprune.gradual.train`, :func:`~autoprune.gradual.prune_to`,
:func:`~autoprune.gradual.strip`); the returned model keeps its ``torch.nn.utils.prune`` masks (training can
continue, and masked weights stay zero): :func:`~autoprune.gradual.strip` leaves a plain model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from autoprune.data import Dataset
from autoprune.errors import InvalidConfigError, InvalidModelError
from autoprune.gradual import _check_recipe, _sync, prunable_weights, prune_to, strip, train
from autoprune.gradual import sparsity as zero_fraction  # find_ticket's `sparsity` argument shadows the name
from autoprune.recovery import RecoveryConfig

__all__ = ["TicketResult", "TicketRound", "find_ticket", "random_reinit", "rewind", "round_targets"]


@dataclass(frozen=True)
class TicketRound:
    """One pruning round of :func:`find_ticket` (passed to ``on_round`` once its weights are rewound)."""

    round: int
    """1-based round."""
    target: float
    """Sparsity the round prunes to: ``1 - (1 - sparsity) ** (round / rounds)``."""
    sparsity: float
    """Fraction of the prunable weights masked after the round (the target, to within one weight)."""
    pruned: int
    """Weights newly masked in this round."""
    train_loss: float
    """Mean training loss at the end of the training that preceded this round's pruning (the dense training in
    round 1; NaN when that training ran no step, i.e. ``rewind_step`` is the recipe's last step)."""


@dataclass(frozen=True, eq=False)
class TicketResult:
    """The winning ticket of :func:`find_ticket`: the retrained, masked model and how it was found."""

    model: nn.Module
    """The ticket after its last retraining, in eval mode, with its ``torch.nn.utils.prune`` masks installed
    (:func:`~autoprune.gradual.strip` folds them in)."""
    masks: Mapping[str, torch.Tensor]
    """Layer name → boolean mask of its weight (True: the weight survives)."""
    rewind_step: int
    """Optimizer step the survivors were rewound to, and retraining resumed from."""
    rewind_state: Mapping[str, torch.Tensor]
    """Every parameter and buffer of the dense model after ``rewind_step`` steps (plain state-dict keys)."""
    rounds: tuple[TicketRound, ...]
    """What each pruning round did."""
    sparsity: float
    """Achieved sparsity of the prunable weights (fraction of zeros) of the final ticket."""
    train_loss: float
    """Mean training loss at the end of the ticket's last retraining (NaN when it ran no step)."""
    keep: tuple[str, ...] = ()
    """Layers left unpruned."""


def round_targets(sparsity: float, rounds: int) -> tuple[float, ...]:
    """Sparsity after each round when every round keeps the same fraction ``(1 - sparsity) ** (1 / rounds)`` of
    the surviving weights: ``1 - (1 - sparsity) ** (r / rounds)`` for ``r = 1 .. rounds`` (the last is
    ``sparsity``)."""
    _check_schedule(sparsity, rounds)
    keep = (1.0 - sparsity) ** (1.0 / rounds)
    return (*(1.0 - keep**r for r in range(1, rounds)), float(sparsity))


def _check_schedule(sparsity: float, rounds: int) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 < sparsity < 1.0:
        raise InvalidConfigError(f"sparsity must be a number in (0, 1), got {sparsity!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidConfigError(f"rounds must be an integer >= 1, got {rounds!r}")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def rewind(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` (plain state-dict keys, e.g. a :attr:`TicketResult.rewind_state`) into ``model`` in place,
    keeping its pruning masks: a masked tensor gets the value in its ``*_orig`` parameter, so the surviving
    weights become the state's values and the masked ones stay zero. Raises :class:`InvalidModelError` when a
    key fits no tensor of the model or a shape differs. Returns ``model``."""
    live = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in state.items():
            module_name, _, attr = key.rpartition(".")
            masked = f"{key}_orig" in live
            target = live.get(f"{key}_orig" if masked else key)
            if target is None:
                raise InvalidModelError(f"the state has {key!r}, which the model does not have")
            if target.shape != value.shape:
                raise InvalidModelError(f"{key!r} has shape {tuple(value.shape)}, the model's {tuple(target.shape)}")
            target.copy_(value)
            if masked:  # refresh the masked tensor the forward pre-hook would compute
                _sync(modules[module_name], attr)
    return model


def _masks(params: Sequence[tuple[nn.Module, str]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Layer name → boolean mask (True: kept); all True for a layer no round has masked yet."""
    out: dict[str, torch.Tensor] = {}
    for name, (module, attr) in zip(names, params, strict=True):
        mask = getattr(module, f"{attr}_mask", None)
        if isinstance(mask, torch.Tensor):
            out[name] = mask.detach() != 0
        else:
            out[name] = torch.ones(getattr(module, attr).shape, dtype=torch.bool)
    return out


def _masked_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0


def _has_pruning_hooks(model: nn.Module) -> bool:
    return any(
        isinstance(hook, torch_prune.BasePruningMethod)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
    )


def find_ticket(
    model: nn.Module,
    dataset: Dataset,
    config: RecoveryConfig,
    *,
    sparsity: float,
    rounds: int,
    rewind_step: int = 0,
    keep: Sequence[str] = (),
    on_round: Callable[[TicketRound], None] | None = None,
) -> TicketResult:
    """Find a lottery ticket of ``model`` at ``sparsity`` by ``rounds`` rounds of iterative magnitude pruning
    with rewinding to ``rewind_step`` (see the module docstring); ``model`` (the initialisation) is not modified.

    ``config`` is the training recipe of every training (:func:`autoprune.gradual.train`: steps or epochs,
    optimizer, LR schedule, seed; no early stopping, distillation or time budget). ``rewind_step`` is in
    ``[0, total steps]``: 0 rewinds to the initialisation; the total rewinds to the trained weights, so nothing is
    retrained (iterative magnitude pruning without retraining). Layers named in ``keep`` are neither pruned nor
    counted. ``on_round`` receives a :class:`TicketRound` after each round's pruning and rewinding. Raises
    :class:`InvalidConfigError` for a sparsity outside (0, 1), fewer than one round, a rewind step outside the
    recipe or a model that already carries pruning masks.
    """
    _check_schedule(sparsity, rounds)
    _check_recipe(config, dataset)
    total = config.total_steps(dataset.num_train)
    if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or not 0 <= rewind_step <= total:
        raise InvalidConfigError(
            f"rewind_step must be an integer in [0, {total}] (the recipe's steps), got {rewind_step!r}"
        )
    if _has_pruning_hooks(model):
        raise InvalidConfigError("the model already carries pruning masks: strip() it first")
    work = copy.deepcopy(model)
    layers = prunable_weights(work, keep)
    if not layers:
        raise InvalidConfigError("the model has no conv or linear weights to prune")
    params = [(module, "weight") for _, module in layers]
    names = [name for name, _ in layers]
    snapshot: dict[str, torch.Tensor] = {}

    def take_snapshot(step: int) -> None:
        if step == rewind_step:
            snapshot.update(_snapshot(work))

    done: list[TicketRound] = []
    loss = train(work, dataset, config, before_step=take_snapshot)
    if rewind_step == total:  # no step ran after it: the snapshot is the trained model
        snapshot.update(_snapshot(work))
    for index, target in enumerate(round_targets(sparsity, rounds), start=1):
        if index > 1:
            loss = train(work, dataset, config, start_step=rewind_step)
        pruned = prune_to(params, target)
        rewind(work, snapshot)
        record = TicketRound(
            round=index, target=target, sparsity=_masked_fraction(_masks(params, names)), pruned=pruned, train_loss=loss
        )
        done.append(record)
        if on_round is not None:
            on_round(record)
    loss = train(work, dataset, config, start_step=rewind_step)
    return TicketResult(
        model=work.eval(),
        masks=_masks(params, names),
        rewind_step=rewind_step,
        rewind_state=snapshot,
        rounds=tuple(done),
        sparsity=zero_fraction(work, keep),
        train_loss=loss,
        keep=tuple(keep),
    )


def random_reinit(
    ticket: TicketResult,
    dataset: Dataset | None = None,
    config: RecoveryConfig | None = None,
    *,
    seed: int = 0,
) -> nn.Module:
    """The random re-initialisation control of a ticket: a copy of its model with the ticket's masks on fresh
    weights.

    The copy starts from the ticket's rewind state, then every submodule with ``reset_parameters`` (conv, linear,
    normalisation layers: PyTorch's default initialisation, drawn from ``seed`` without touching the caller's RNG)
    is re-initialised and the ticket's masks are applied (parameters of modules without ``reset_parameters`` keep
    the rewind state's values). With ``dataset`` and ``config`` it is then trained exactly as the ticket was
    (:func:`~autoprune.gradual.train` from ``ticket.rewind_step``), otherwise returned untrained. The ticket is not
    modified. Returns the model in eval mode, masks installed.
    """
    if (dataset is None) != (config is None):
        raise InvalidConfigError("random_reinit trains with both dataset and config, or with neither")
    control = strip(copy.deepcopy(ticket.model))
    rewind(control, ticket.rewind_state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in control.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    modules = dict(control.named_modules())
    for name, mask in ticket.masks.items():
        weight = modules[name].weight
        torch_prune.custom_from_mask(modules[name], "weight", mask=mask.to(weight.dtype))
    if dataset is not None and config is not None:
        train(control, dataset, config, start_step=ticket.rewind_step)
    return control.eval()
