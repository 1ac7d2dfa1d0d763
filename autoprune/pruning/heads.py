"""Attention heads outside ``nn.MultiheadAttention``: HuggingFace BERT-style self-attention and look-alikes.

HuggingFace attention modules are plain modules holding three ``nn.Linear`` projections and a head count:
``query``/``key``/``value`` with ``num_attention_heads`` (BERT, RoBERTa, ALBERT, ELECTRA, ViT...) or
``q_lin``/``k_lin``/``v_lin`` with ``n_heads`` (DistilBERT). Their forward reshapes each projection to
``(..., -1, head_size)``, so the projections may only lose whole heads: cut channel by channel, a layer ends
with a width that is not a multiple of the head size and the ``view`` fails (``shape '[1, 11, -1, 32]' is
invalid``), or worse, runs with heads made of mixed halves.

:func:`attention_heads` finds those modules and builds Torch-Pruning's ``num_heads`` mapping (``{q/k/v linear:
heads}``, the argument its pruners take with ``prune_num_heads=True, prune_head_dims=False``), from which the
structured pruning groups those projections by head. After pruning, :func:`set_heads` rewrites the head counts
the forward reads (``num_attention_heads`` and ``all_head_size``, or ``n_heads``); the head size stays.

A HuggingFace config holds one ``num_attention_heads`` and one ``intermediate_size`` for every layer, so it
cannot describe a model whose layers lost different heads or FFN units. :func:`record_layout` writes what each
layer kept into ``model.config.autoprune_layout`` (saved by ``save_pretrained`` into ``config.json``), which
:func:`autoprune.export.load_pretrained_pruned` reads to rebuild the pruned shapes before loading the weights.

Nothing here imports ``transformers``: modules are recognised by their attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

_PROJECTIONS: tuple[tuple[tuple[str, str, str], str], ...] = (
    (("query", "key", "value"), "num_attention_heads"),
    (("q_lin", "k_lin", "v_lin"), "n_heads"),
)
"""(q, k, v attribute names), head-count attribute name, for each family of attention modules recognised."""

LAYOUT_KEY = "autoprune_layout"
"""The config attribute (and ``config.json`` key) holding a pruned model's per-layer heads and widths."""


@dataclass(frozen=True)
class AttentionHeads:
    """One recognised attention module: its projections and head layout."""

    module: nn.Module
    projections: tuple[nn.Linear, nn.Linear, nn.Linear]
    heads_attr: str
    heads: int
    head_dim: int


def _heads_of(module: nn.Module) -> AttentionHeads | None:
    if isinstance(module, nn.MultiheadAttention):
        return None  # handled by its own path (in_proj_weight, num_heads)
    for names, heads_attr in _PROJECTIONS:
        heads = getattr(module, heads_attr, None)
        projections = [getattr(module, n, None) for n in names]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            continue
        if not all(isinstance(p, nn.Linear) for p in projections):
            continue
        q, k, v = projections
        assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
        # grouped-query attention (fewer key/value heads) is not this layout; leave it to channel pruning
        if not q.out_features == k.out_features == v.out_features or q.out_features % heads:
            continue
        return AttentionHeads(module, (q, k, v), heads_attr, heads, q.out_features // heads)
    return None


def attention_heads(model: nn.Module) -> dict[nn.Module, AttentionHeads]:
    """Every recognised attention module of ``model`` (not ``nn.MultiheadAttention``), keyed by module."""
    found: dict[nn.Module, AttentionHeads] = {}
    for module in model.modules():
        info = _heads_of(module)
        if info is not None:
            found[module] = info
    return found


def num_heads(found: dict[nn.Module, AttentionHeads]) -> dict[nn.Module, int]:
    """Torch-Pruning's ``num_heads`` mapping: each q/k/v projection -> the head count of its attention."""
    return {proj: info.heads for info in found.values() for proj in info.projections}


def set_heads(module: nn.Module, heads: int) -> None:
    """Set the head count a pruned attention module's forward reads; the head size is unchanged."""
    if isinstance(module, nn.MultiheadAttention):
        module.num_heads = heads  # whole heads go: head_dim stays, the head count shrinks
        return
    for _, heads_attr in _PROJECTIONS:
        if hasattr(module, heads_attr):
            setattr(module, heads_attr, heads)
            head_size = getattr(module, "attention_head_size", None)
            if isinstance(head_size, int) and hasattr(module, "all_head_size"):
                setattr(module, "all_head_size", heads * head_size)  # noqa: B010 (a plain module attribute)
            return
    raise TypeError(f"{type(module).__name__} has no head count to set")


def layout(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    """What ``model`` (a pruned copy of ``base``) kept where it differs from ``base``: heads per attention
    module, and ``[in_features, out_features]`` per linear layer (the FFN widths, per layer)."""
    base_modules = dict(base.named_modules())
    heads: dict[str, int] = {}
    linear: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        before = base_modules.get(name)
        info = _heads_of(module)
        if info is not None and before is not None:
            old = getattr(before, info.heads_attr, None)
            if old != info.heads:
                heads[name] = info.heads
        if isinstance(module, nn.Linear) and isinstance(before, nn.Linear):
            shape = [module.in_features, module.out_features]
            if shape != [before.in_features, before.out_features]:
                linear[name] = shape
    return {"heads": heads, "linear": linear}


def record_layout(model: nn.Module, base: nn.Module, plan: dict[str, Any] | None = None) -> None:
    """Write :func:`layout` (and the plan, if given) into ``model.config`` when the model has a HuggingFace
    config (anything with ``to_dict``), so that ``save_pretrained`` saves it in ``config.json``."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return
    # values are absolute, so a base that was itself pruned (iterative pruning) passes its record on
    before = getattr(getattr(base, "config", None), LAYOUT_KEY, None) or {}
    now = layout(model, base)
    record: dict[str, Any] = {
        "heads": {**before.get("heads", {}), **now["heads"]},
        "linear": {**before.get("linear", {}), **now["linear"]},
    }
    if plan is not None:
        record["plan"] = plan
    setattr(config, LAYOUT_KEY, record)
