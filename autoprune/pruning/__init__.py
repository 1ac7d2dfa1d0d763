"""Pruning: the only package that imports Torch-Pruning.

``analyze`` finds what can be pruned (one decision per dependency group); ``apply_plan`` returns a pruned copy
of a base model for a :class:`~autoprune.plan.Plan`. Applying the same plan to the same base model always gives
identical weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from autoprune.cost import count_macs
from autoprune.plan import Plan
from autoprune.pruning.structured import (
    AfterPrune,
    Batches,
    Inputs,
    PrunableGroup,
    PruningContext,
    Structure,
    analyze,
    apply_structured,
    find_output_layers,
    kept_units,
)
from autoprune.pruning.unstructured import GLOBAL, apply_unstructured, sparsifiable_layers

__all__ = [
    "GLOBAL",
    "AfterPrune",
    "PrunableGroup",
    "PruningContext",
    "Structure",
    "analyze",
    "analyze_unstructured",
    "apply_plan",
    "find_output_layers",
    "kept_units",
]


def analyze_unstructured(model: nn.Module, example_inputs: Inputs, *, keep: Sequence[str] = ()) -> Structure:
    """One group per conv/linear layer (its weights), for unstructured sparsity plans."""
    kept = tuple(dict.fromkeys([*find_output_layers(model, example_inputs), *keep]))
    total, per_module = count_macs(model, example_inputs)
    modules = dict(model.named_modules())
    groups = []
    for index, name in enumerate(sparsifiable_layers(model, kept)):
        m = modules[name]
        weight = m.weight
        kernel = int(weight.shape[2]) if weight.dim() > 2 else 1
        stride = int(m.stride[0]) if isinstance(m, nn.modules.conv._ConvNd) else 1
        groups.append(
            PrunableGroup(
                name=name,
                index=index,
                kind="conv" if weight.dim() > 2 else "linear",
                units=int(weight.numel()),
                unit_width=1,
                in_channels=int(weight.shape[1]),
                kernel=kernel,
                stride=stride,
                macs=per_module.get(name, 0),
                members=(name,),
            )
        )
    return Structure(groups=tuple(groups), kept=kept, total_macs=total, method="unstructured")


def apply_plan(
    model: nn.Module,
    plan: Plan,
    example_inputs: Inputs,
    *,
    keep: Sequence[str] = (),
    calibration: Batches | None = None,
    after_prune: AfterPrune | None = None,
) -> nn.Module:
    """Apply ``plan`` to a copy of ``model`` and return the copy (in eval mode); ``after_prune(copy, plan)``
    runs on it (see :data:`~autoprune.pruning.structured.AfterPrune`)."""
    if plan.method == "structured" and plan.ratios:
        return apply_structured(
            model, plan, example_inputs, keep=keep, calibration=calibration, after_prune=after_prune
        ).eval()
    if not plan.ratios:
        pruned = copy.deepcopy(model).eval()
    else:
        kept = tuple(dict.fromkeys([*find_output_layers(model, example_inputs), *keep]))
        pruned = apply_unstructured(model, plan, kept=kept).eval()
    returned = after_prune(pruned, plan) if after_prune is not None else None
    return (returned if isinstance(returned, nn.Module) else pruned).eval()
