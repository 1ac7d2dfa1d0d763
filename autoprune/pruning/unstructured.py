"""Unstructured (weight) sparsity made permanent with ``torch.nn.utils.prune``.

Weights are zeroed by magnitude, per layer or globally, and the masks are folded in (``prune.remove``), so no
mask, hook or extra parameter is left behind. Dense kernels do not run faster on zeros: such a plan is reported
as sparsity and compressed size, and its latency is measured like any other (it will match the base model).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from autoprune.errors import InvalidPlanError
from autoprune.plan import Plan

GLOBAL = "*"
"""Plan key meaning "one magnitude threshold across every prunable layer" (global sparsity)."""

_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def sparsifiable_layers(model: nn.Module, kept: tuple[str, ...] = ()) -> list[str]:
    """Conv and linear layers whose weights can be sparsified, in definition order (kept layers excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, _TYPES) and n not in kept]


def apply_unstructured(model: nn.Module, plan: Plan, *, kept: tuple[str, ...] = ()) -> nn.Module:
    """Return a copy of ``model`` with weights zeroed as the plan says; the base is not modified."""
    if plan.criterion not in ("l1", "l2", "random"):
        raise InvalidPlanError(
            f"criterion {plan.criterion!r} is for structured pruning; unstructured takes l1, l2 or random"
        )
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    layers = sparsifiable_layers(work, kept)
    ratios = plan.as_dict()
    if GLOBAL in ratios:
        if len(ratios) > 1:
            raise InvalidPlanError(f"a global unstructured plan ({GLOBAL!r}) cannot also name layers")
        plan.validate_against([GLOBAL])
    else:
        plan.validate_against(layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        if GLOBAL in ratios:
            params = [(modules[n], "weight") for n in layers]
            method = torch_prune.RandomUnstructured if plan.criterion == "random" else torch_prune.L1Unstructured
            torch_prune.global_unstructured(params, pruning_method=method, amount=ratios[GLOBAL])
            touched = layers
        else:
            touched = [n for n in layers if ratios.get(n, 0.0) > 0.0]
            for name in touched:
                if plan.criterion == "random":
                    torch_prune.random_unstructured(modules[name], "weight", amount=ratios[name])
                else:
                    torch_prune.l1_unstructured(modules[name], "weight", amount=ratios[name])
    for name in touched:
        torch_prune.remove(modules[name], "weight")
    return work
