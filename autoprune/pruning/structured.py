"""Structured pruning with Torch-Pruning: channels, neurons, hidden units and attention heads removed.

One decision per Torch-Pruning *dependency group*: layers coupled by residual additions, concatenations or
shared dimensions are pruned together, so the plan names groups (by their root layer), never single layers
that would silently take another group's ratio.

Applying a plan:

1. deep-copy the base model and trace its dependency graph;
2. score every channel of every group on the *unpruned* copy (L1/L2 magnitude, Taylor, BN scale or random);
3. for each group keep the best ``round(C * (1 - ratio))`` units, rounded to a multiple of ``round_to``;
   groups that contain ``nn.MultiheadAttention`` or the q/k/v projections of a HuggingFace-style attention
   (BERT's ``BertSelfAttention`` and look-alikes, see :mod:`autoprune.pruning.heads`) lose whole heads instead
   (Torch-Pruning's ``num_heads`` with ``prune_num_heads=True, prune_head_dims=False``: a head's score is the
   sum of its channels' scores), and the head counts those modules read are rewritten after pruning;
4. prune, then run a forward and check the output shape is unchanged (a pruned model that does not run is a
   :class:`PruningError`, never a silent success).

In a model with HuggingFace-style attention, the groups that carry the residual stream (the hidden size: the
embeddings, every block's output projections and LayerNorms, the q/k/v *inputs*) are kept by default, their
root layers listed in :attr:`Structure.kept`; ``prune_hidden=True`` offers them to plans like any group.

Groups that plans cannot prune reliably are found once, when the context is built: every group is halved in a
trial copy and run, three times with different channels removed; if a forward fails, each group is tried alone
the same way, and a group that breaks the forward is *locked*: listed in :attr:`Structure.locked` with the
reason, left out of the groups a plan or a search can name, and kept intact. A search then does not spend its
budget on plans that cannot run. Halving alone would miss a width constraint that the half width happens to
satisfy (``view(..., -1, 32)`` after 384 channels), so every group is also tried one unit short of full width;
a group that breaks there but not halved gets the smallest *step* (a divisor of its width) whose multiples run,
recorded as :attr:`PrunableGroup.step`, and every plan's kept widths are rounded to a multiple of it.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autoprune.cost import count_macs, ensure_eval, eval_mode
from autoprune.data import as_output_tensor
from autoprune.errors import InvalidConfigError, InvalidPlanError, PruningError
from autoprune.inputs import Inputs, call_model, tracing_inputs
from autoprune.plan import Plan
from autoprune.pruning.heads import AttentionHeads, attention_heads, num_heads, record_layout, set_heads
from autoprune.pruning.recurrent import RecurrentImportance, recurrent_pruners, recurrent_tracing

Batches = Iterable[tuple[Inputs, torch.Tensor | None]]
AfterPrune = Callable[[nn.Module, Plan], "nn.Module | None"]
"""``after_prune(model, plan)``: the user's fix-up of a freshly pruned copy (head counts, cached sizes...), run
before its forward is checked; it changes the model in place (returns None) or returns the model to use."""

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.GRU)
_PRUNABLE_LEAVES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.GRU, nn.Embedding)


@dataclass(frozen=True)
class PrunableGroup:
    """One pruning decision: a set of coupled layers named after its root layer."""

    name: str
    """Qualified name of the root layer (the plan's key)."""
    index: int
    """Position in the model's group order (the order of the gymnasium episode)."""
    kind: str
    """``conv``, ``linear``, ``recurrent`` or ``attention``."""
    units: int
    """How many prunable units the group has: channels, neurons, hidden units, or heads for attention."""
    unit_width: int
    """Channels per unit (the head dimension for attention groups, otherwise 1)."""
    in_channels: int
    """Input channels / features of the root layer."""
    kernel: int
    """Kernel size of the root layer (1 for linear and recurrent layers)."""
    stride: int
    """Stride of the root layer (1 for linear and recurrent layers)."""
    macs: int
    """MACs of all layers in the group for one example batch."""
    members: tuple[str, ...]
    """Every layer whose parameters change when the group is pruned."""
    step: int = 1
    """Kept widths are multiples of this (1: any width). Above 1 where the lock probe found a shape the model
    bakes in (a ``view(..., -1, 16)`` after the group's layer, say): only the widths that run are applied."""


@dataclass(frozen=True)
class Structure:
    """The prunable structure of a model: its groups and the output layers that are kept intact."""

    groups: tuple[PrunableGroup, ...]
    kept: tuple[str, ...]
    total_macs: int
    method: str = "structured"
    locked: tuple[tuple[str, str], ...] = ()
    """``(group, reason)`` for each dependency group that cannot be pruned at all (pruning it breaks the forward:
    channel counts baked into a ``view``/``reshape``, literal channel slices, zero-padded shortcuts, attention
    projections of a ``.pt2`` program...). They are kept intact and are not offered to plans or searches."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def no_groups_message(self) -> str:
        """Why a search or an episode has nothing to choose (for the error raised on a structure without groups)."""
        message = "the model has no prunable groups"
        if self.locked:
            listed = "; ".join(f"{name!r}: {reason}" for name, reason in self.locked[:3])
            message += f" ({len(self.locked)} cannot be pruned without breaking its forward: {listed})"
        return message

    def group(self, name: str) -> PrunableGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise InvalidPlanError(f"no group named {name!r}")


# ---------------------------------------------------------------------------------------------------------
# output layers
# ---------------------------------------------------------------------------------------------------------
def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, a tuple/list of them, or a mapping (HuggingFace ``ModelOutput``,
    whose iteration yields its keys, not its tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    return [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, tuple | list) else []


def resolve_keep(model: nn.Module, keep: Iterable[str | nn.Module]) -> tuple[str, ...]:
    """Names of the layers ``keep`` protects: each entry is a module of ``model`` or its qualified name, and a
    container (``"encoder"``, ``model.rnn``) covers every layer inside it. A name that is not in the model is an
    :class:`~autoprune.errors.InvalidConfigError` (with the closest names), never silently ignored."""
    import difflib

    from autoprune.errors import InvalidConfigError

    modules = dict(model.named_modules())
    by_id = {id(m): n for n, m in modules.items()}
    out: list[str] = []
    for item in keep:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise InvalidConfigError(f"keep: {type(item).__name__} module is not part of this model")
            name = by_id[id(item)]
        elif isinstance(item, str):
            name = item
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else " (see `autoprune groups`)"
                raise InvalidConfigError(f"keep: no module named {name!r} in the model{hint}")
        else:
            raise InvalidConfigError(f"keep takes module names or modules, got {type(item).__name__}")
        out.extend(n for n in modules if n == name or (name == "" or n.startswith(name + ".")))
    return tuple(dict.fromkeys(n for n in out if n))


def find_output_layers(model: nn.Module, example_inputs: Inputs) -> list[str]:
    """Names of the layers that produce the model's output (the classifier head); they are never pruned.

    The last prunable layer run whose output has the model output's trailing size is the head. Models
    with several outputs or unusual heads can name extra layers to keep.
    """
    order: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, _PRUNABLE_LEAVES):

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                if isinstance(out, tuple):
                    out = out[0]
                if isinstance(out, torch.Tensor):
                    order.append((name, out))

            hooks.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            output = call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    kept: list[str] = []
    for out in _output_tensors(output):
        for name, tensor in reversed(order):
            if tensor.shape[-1] == out.shape[-1] or (
                tensor.dim() > 1 and out.dim() > 1 and tensor.shape[1] == out.shape[1]
            ):
                kept.append(name)
                break
    return kept


# ---------------------------------------------------------------------------------------------------------
# dependency graph and groups
# ---------------------------------------------------------------------------------------------------------
def _build_graph(model: nn.Module, example_inputs: Inputs) -> tp.DependencyGraph:
    try:
        with recurrent_tracing(model):
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=tracing_inputs(example_inputs), customized_pruners=recurrent_pruners()
            )
    except PruningError:
        raise
    except Exception as exc:  # Torch-Pruning raises bare exceptions for graphs it cannot trace
        raise PruningError(f"Torch-Pruning could not trace the model: {type(exc).__name__}: {exc}") from exc


def _execution_order(model: nn.Module, example_inputs: Inputs) -> dict[nn.Module, int]:
    """Position of each module's first call in a forward pass (modules never called come last)."""
    order: dict[nn.Module, int] = {}
    hooks = []
    for module in model.modules():

        def hook(m: nn.Module, _i: Any) -> None:
            order.setdefault(m, len(order))

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order


def _groups(
    dg: tp.DependencyGraph, model: nn.Module, kept: Sequence[str], example_inputs: Inputs
) -> list[tuple[str, Any]]:
    """The model's prunable groups in forward order, each named after its first layer whose outputs shrink."""
    modules = dict(model.named_modules())
    ignored = [modules[k] for k in kept if k in modules]
    names = {m: n for n, m in modules.items()}
    order = _execution_order(model, example_inputs)
    last = len(order)
    found = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=list(ROOT_TYPES)):
        producers = [
            dep.target.module
            for dep, _ in group
            if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, ROOT_TYPES)
        ] or [group[0].dep.target.module]
        first = min(producers, key=lambda m: order.get(m, last))
        found.append((order.get(first, last), names[first], group))
    found.sort(key=lambda item: (item[0], item[1]))
    return [(name, group) for _, name, group in found]


def _members(group: Any, names: dict[nn.Module, str], order: dict[nn.Module, int]) -> tuple[str, ...]:
    modules = {dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.Module)}
    ranked = sorted((order.get(m, len(order)), names[m]) for m in modules if m in names)
    return tuple(name for _, name in ranked)


def _attention_modules(group: Any) -> list[nn.MultiheadAttention]:
    found: list[nn.MultiheadAttention] = []
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.MultiheadAttention) and m not in found:
            found.append(m)
    return found


def _head_projections(dg: tp.DependencyGraph, group: Any, heads: Mapping[nn.Module, int]) -> list[nn.Module]:
    """The q/k/v projections (of HuggingFace-style attention) whose *outputs* this group prunes."""
    found: list[nn.Module] = []
    for dep, _ in group:
        m = dep.target.module
        if m in heads and dg.is_out_channel_pruning_fn(dep.handler) and m not in found:
            found.append(m)
    return found


def _head_layout(
    dg: tp.DependencyGraph, group: Any, name: str, heads: Mapping[nn.Module, int] | None = None
) -> tuple[int, int] | None:
    """``(num_heads, head_dim)`` if the group's root dimension is an attention embedding, else None."""
    layouts = {(m.num_heads, m.head_dim) for m in _attention_modules(group)}
    for proj in _head_projections(dg, group, heads or {}):
        assert isinstance(proj, nn.Linear)
        assert heads is not None
        layouts.add((heads[proj], proj.out_features // heads[proj]))
    if not layouts:
        return None
    if len(layouts) != 1:
        raise PruningError(f"group {name!r} couples attention layers with different head layouts {layouts}")
    return layouts.pop()


def _channel_groups(dg: tp.DependencyGraph, group: Any) -> int:
    """Grouped convolutions and GroupNorm split channels into equal groups that must shrink together."""
    groups = [1]
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.MultiheadAttention):
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels == m.out_channels:
            continue  # depthwise: follows its input channels one to one
        pruner = dg.get_pruner_of_module(m)
        if pruner is None:
            continue
        if dg.is_out_channel_pruning_fn(dep.handler):
            groups.append(int(pruner.get_out_channel_groups(m) or 1))
        else:
            groups.append(int(pruner.get_in_channel_groups(m) or 1))
    return max(groups)


def _root_geometry(module: nn.Module) -> tuple[str, int, int, int]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", int(module.in_channels), int(module.kernel_size[0]), int(module.stride[0])
    if isinstance(module, nn.Linear):
        return "linear", int(module.in_features), 1, 1
    if isinstance(module, nn.RNNBase):
        return "recurrent", int(module.input_size), 1, 1
    return type(module).__name__.lower(), 0, 1, 1


# ---------------------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    """How one importance criterion scores channels (Torch-Pruning's importance classes behind a name)."""

    make: Callable[[], tp.importance.Importance]
    """A fresh Torch-Pruning importance object."""
    needs_gradients: bool = False
    """Scores use gradients: calibration batches are run forward and backward first (Taylor)."""
    seeded: bool = False
    """Scores are random: cached per seed."""


IMPORTANCES: dict[str, Criterion] = {
    "l1": Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=1)),
    "l2": Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=2)),
    "taylor": Criterion(tp.importance.GroupTaylorImportance, needs_gradients=True),
    "bn_scale": Criterion(tp.importance.BNScaleImportance),
    "random": Criterion(tp.importance.RandomImportance, seeded=True),
}
"""The structured importance criteria by name (the names are :data:`autoprune.names.CRITERIA`, which the job spec,
the CLI and the API validate against; ``tests`` check both agree)."""


def _criterion(name: str) -> Criterion:
    found = IMPORTANCES.get(name)
    if found is None:
        raise InvalidPlanError(f"unknown criterion {name!r}; choose one of {', '.join(IMPORTANCES)}")
    return found


def _accumulate_gradients(model: nn.Module, batches: Batches | None, max_batches: int = 4) -> None:
    if batches is None:
        raise InvalidPlanError("the 'taylor' criterion needs data: pass calibration batches")
    model.zero_grad(set_to_none=True)
    seen = 0
    with eval_mode(model):
        for x, y in batches:
            out = as_output_tensor(call_model(model, x))
            target = y if y is not None else out.detach().argmax(dim=-1)
            F.cross_entropy(out, target).backward()
            seen += 1
            if seen >= max_batches:
                break
    if seen == 0:
        raise InvalidPlanError("the 'taylor' criterion needs at least one calibration batch")


def kept_units(units: int, ratio: float, round_to: int) -> int:
    """How many of ``units`` stay for ``ratio``, rounded to a multiple of ``round_to`` (at least one)."""
    keep = units - math.floor(ratio * units + 1e-9)
    if round_to > 1 and units > round_to:
        keep = max(round_to, round_to * round(keep / round_to))
    return max(1, min(units, keep))


def _select(
    dg: tp.DependencyGraph,
    group: Any,
    name: str,
    scores: torch.Tensor,
    ratio: float,
    round_to: int,
    qkv_heads: Mapping[nn.Module, int] | None = None,
) -> tuple[list[int], int | None]:
    """Indices (in the root's channel space) to remove, and the new head count for attention groups.

    ``qkv_heads`` is Torch-Pruning's ``num_heads`` mapping (q/k/v projection -> heads) of HuggingFace-style attention.
    """
    channels = scores.numel()
    layout = _head_layout(dg, group, name, qkv_heads)
    if layout is not None:
        heads, head_dim = layout
        if heads * head_dim != channels:
            raise PruningError(f"group {name!r}: attention embedding {heads}x{head_dim} != {channels} channels")
        per_head = scores.view(heads, head_dim).sum(dim=1)
        keep = kept_units(heads, ratio, 1)
        drop = torch.argsort(per_head, stable=True)[: heads - keep].tolist()
        idxs = sorted(h * head_dim + d for h in drop for d in range(head_dim))
        return idxs, keep
    ch_groups = _channel_groups(dg, group)
    if channels % ch_groups:
        ch_groups = 1
    size = channels // ch_groups
    per_position = scores.view(ch_groups, size).mean(dim=0)
    keep = kept_units(size, ratio, max(1, round_to // ch_groups) if ch_groups > 1 else round_to)
    drop = torch.argsort(per_position, stable=True)[: size - keep].tolist()
    return sorted(p + g * size for g in range(ch_groups) for p in drop), None


# ---------------------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------------------
def _output_shapes(model: nn.Module, example_inputs: Inputs) -> list[tuple[int, ...]]:
    with eval_mode(model), torch.no_grad():
        out = call_model(model, example_inputs)
    return [tuple(o.shape) for o in _output_tensors(out)]


class PruningContext:
    """The dependency graph of one base model, traced once, and the plans applied from it.

    Tracing a model with Torch-Pruning costs far more than pruning it, so the graph is built once on the base
    model. For each plan, every group's indices (chosen from importance scores cached per criterion) are
    expanded through the base graph into per-layer pruning operations in the *base* index space, merged per
    layer and dimension, and replayed on a fresh deep copy. Because every index refers to the unpruned model,
    the order of operations does not matter (concatenation offsets stay right) and the result is identical
    to pruning group by group.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        *,
        keep: Sequence[str | nn.Module] = (),
        calibration: Batches | None = None,
        prune_hidden: bool = False,
        after_prune: AfterPrune | None = None,
    ) -> None:
        self.base = model
        self.after_prune = after_prune
        """Called on every pruned copy, the lock probe's trial copies included (see :data:`AfterPrune`)."""
        self.example_inputs = example_inputs
        self.calibration = list(calibration) if calibration is not None else None
        self._expected = _output_shapes(model, example_inputs)
        self._names = {m: n for n, m in model.named_modules()}
        self.kept = list(dict.fromkeys([*find_output_layers(model, example_inputs), *resolve_keep(model, keep)]))
        self.graph = _build_graph(model, example_inputs)
        self.groups = _groups(self.graph, model, self.kept, example_inputs)
        self._attention: dict[nn.Module, AttentionHeads] = attention_heads(model)
        self.num_heads: dict[nn.Module, int] = num_heads(self._attention)
        """Torch-Pruning's ``num_heads``: each q/k/v projection of a HuggingFace-style attention -> its heads."""
        if self.num_heads and not prune_hidden:
            hidden = [name for name, group in self.groups if self._carries_hidden(group)]
            self.kept.extend(n for n in hidden if n not in self.kept)
            self.groups = [(name, group) for name, group in self.groups if name not in hidden]
        self._scores: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._plain: bool | None = None
        self._unscorable: dict[tuple[tuple[str, int], str], str] = {}
        self._group_ops: dict[tuple[str, tuple[int, ...]], list[tuple[tuple[str, Any, int], list[int]]]] = {}
        self.steps: dict[str, int] = {}
        """Groups whose kept width must be a multiple of a step above 1 (found by the lock probe)."""
        self.locked = self._probe()
        self.groups = [(name, group) for name, group in self.groups if name not in self.locked]
        self.steps = self._probe_steps()
        self.structure = self._describe()

    def _carries_hidden(self, group: Any) -> bool:
        """True for a group that prunes the *inputs* of q/k/v projections: the residual stream (hidden size)."""
        return any(
            dep.target.module in self.num_heads and self.graph.is_in_channel_pruning_fn(dep.handler) for dep, _ in group
        )

    # -- description ----------------------------------------------------------------------------------------
    def _describe(self) -> Structure:
        model, dg = self.base, self.graph
        total, per_module = count_macs(model, self.example_inputs)
        order = _execution_order(model, self.example_inputs)
        modules = dict(model.named_modules())
        out: list[PrunableGroup] = []
        for index, (name, group) in enumerate(self.groups):
            root = modules[name]
            kind, in_ch, kernel, stride = _root_geometry(root)
            layout = _head_layout(dg, group, name, self.num_heads)
            members = _members(group, self._names, order)
            if layout is not None:
                kind, units, width = "attention", layout[0], layout[1]
            else:
                units, width = int(dg.get_out_channels(root)), 1
            out.append(
                PrunableGroup(
                    name=name,
                    index=index,
                    kind=kind,
                    units=units,
                    unit_width=width,
                    in_channels=in_ch,
                    kernel=kernel,
                    stride=stride,
                    macs=sum(per_module.get(m, 0) for m in members),
                    members=members,
                    step=self.steps.get(name, 1),
                )
            )
        return Structure(groups=tuple(out), kept=tuple(self.kept), total_macs=total, locked=tuple(self.locked.items()))

    # -- groups that cannot be pruned ---------------------------------------------------------------------------
    def _probe(self) -> dict[str, str]:
        """The groups whose pruning breaks the forward, with the reason (see the module docstring)."""
        names = [name for name, _ in self.groups]
        if not names or self._trial(names) is None:
            return {}
        locked: dict[str, str] = {}
        for name in names:
            reason = self._trial([name])
            if reason is not None:
                locked[name] = reason
        return locked

    def _probe_steps(self) -> dict[str, int]:
        """The smallest admissible step (in channels) of every group that runs halved but not one unit short of
        full width. Attention groups already lose whole heads and are not stepped."""
        names = [name for name, _ in self.groups]
        if not names or self._trial(names, cut=1) is None:
            return {}
        steps: dict[str, int] = {}
        for name in names:
            units, per_unit = self._units(name)
            if per_unit == 0 or self._trial([name], cut=1) is None:
                continue
            divisors = [d for d in range(2, units // 2 + 1) if units % d == 0]
            step = next((d for d in divisors if self._trial([name], cut=d) is None), units // 2)
            steps[name] = step * per_unit
        return steps

    def _units(self, name: str) -> tuple[int, int]:
        """``(units, channels per unit)`` as :func:`_select` counts them: positions per channel group, else
        channels (``(heads, 0)`` for attention, whose units are whole heads)."""
        group = dict(self.groups)[name]
        layout = _head_layout(self.graph, group, name, self.num_heads)
        if layout is not None:
            return layout[0], 0
        channels = int(self.graph.get_out_channels(group[0].dep.target.module))
        ch_groups = _channel_groups(self.graph, group)
        if ch_groups > 1 and channels % ch_groups == 0:
            return channels // ch_groups, ch_groups
        return channels, 1

    def _trial(self, names: list[str], cut: int | None = None) -> str | None:
        """Why pruning these groups breaks the model, or None if it runs: halved, or with ``cut`` units removed.
        Which channels go must not matter, so halving tries three index patterns (lowest first, highest first,
        every other one): a coupling Torch-Pruning mis-traced (a zero-padded shortcut) may survive one choice of
        channels and break with the next. A width trial (``cut``) runs on groups that passed those, so one
        pattern is enough there."""
        by_name = dict(self.groups)
        for pattern in ("low", "high", "strided") if cut is None else ("low",):
            try:
                selected, ratios = {}, {}
                for name in names:
                    group = by_name[name]
                    channels = int(self.graph.get_out_channels(group[0].dep.target.module))
                    order = torch.arange(channels, dtype=torch.float)
                    if pattern == "high":
                        order = -order
                    elif pattern == "strided":
                        order = order + channels * (order % 2)
                    units = self._units(name)[0] if cut is not None else 0
                    if cut is not None and cut >= units:
                        continue
                    ratios[name] = 0.5 if cut is None else cut / units
                    selected[name] = _select(self.graph, group, name, order, ratios[name], 1, self.num_heads)
                if not selected:
                    return None
                ops, heads = self._operations_for(selected)
                self._pruned_copy(ops, heads, Plan(tuple(ratios.items()), round_to=1))
            except PruningError as exc:
                return str(exc)
        return None

    # -- importance -----------------------------------------------------------------------------------------
    def scores(self, criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
        """Importance of every channel of every group on the unpruned model (cached per criterion)."""
        spec = _criterion(criterion)
        key = (criterion, seed if spec.seeded else 0)
        if key not in self._scores:
            importance = RecurrentImportance(spec.make())
            if spec.needs_gradients:
                _accumulate_gradients(self.base, self.calibration)
            result: dict[str, torch.Tensor] = {}
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    for name, group in self.groups:
                        # a group that cannot be scored only fails the plans that prune it (see operations)
                        try:
                            imp = importance(group)
                        except Exception as exc:  # tp fails on couplings it mis-traced (e.g. zero-pad shortcuts)
                            self._unscorable[(key, name)] = (
                                f"criterion {criterion!r} cannot score group {name!r}: {type(exc).__name__}: {exc}"
                            )
                            continue
                        if imp is None:
                            self._unscorable[(key, name)] = f"criterion {criterion!r} cannot score group {name!r}"
                            continue
                        result[name] = imp.detach().float().cpu()
            finally:
                if spec.needs_gradients:
                    self.base.zero_grad(set_to_none=True)
            self._scores[key] = result
        return self._scores[key]

    # -- apply ----------------------------------------------------------------------------------------------
    def _group_operations(self, name: str, group: Any, idxs: list[int]) -> list[tuple[tuple[str, Any, int], list[int]]]:
        """The per-layer cuts that removing ``idxs`` from group ``name`` implies, memoised: searches revisit
        the same (group, kept channels) often, and walking Torch-Pruning's graph is the costly part of a plan."""
        memo_key = (name, tuple(idxs))
        found = self._group_ops.get(memo_key)
        if found is not None:
            return found
        root, handler = group[0].dep.target.module, group[0].dep.handler
        try:
            deps = list(self.graph.get_pruning_group(root, handler, idxs))
        except Exception as exc:  # Torch-Pruning raises bare exceptions for couplings it cannot map
            raise PruningError(f"group {name!r} cannot be pruned: {type(exc).__name__}: {exc}") from exc
        out: list[tuple[tuple[str, Any, int], list[int]]] = []
        for dep, dep_idxs in deps:
            target = dep.target.module
            if isinstance(dep.handler.__self__, tp.ops.DummyPruner):
                continue  # graph bookkeeping (concat/split/elementwise nodes): nothing to cut in the model
            if not isinstance(target, nn.Module) or target not in self._names:
                raise PruningError(f"group {name!r} prunes an unwrapped parameter, which is not supported")
            plain = [int(i) for i in tp._helpers.to_plain_idxs(dep_idxs)]
            out.append(((self._names[target], dep.handler, int(dep.target.pruning_dim)), plain))
        if len(self._group_ops) < 4096:
            self._group_ops[memo_key] = out
        return out

    def operations(self, plan: Plan) -> tuple[list[tuple[str, Any, int, list[int]]], dict[str, int]]:
        """Per-layer pruning operations ``(layer, handler, dim, indices)`` and new head counts for ``plan``."""
        plan.validate_against([*self.structure.names, *self.locked])  # a locked group may be named at ratio 0
        refused = [name for name, ratio in plan.ratios if ratio > 0 and name in self.locked]
        if refused:
            raise PruningError(f"group {refused[0]!r} cannot be pruned: {self.locked[refused[0]]}")
        ratios = plan.as_dict()
        if not any(ratios.get(name, 0.0) > 0 for name, _ in self.groups):
            return [], {}
        scores = self.scores(plan.criterion, plan.seed)
        selected: dict[str, tuple[list[int], int | None]] = {}
        for name, group in self.groups:
            ratio = ratios.get(name, 0.0)
            if ratio <= 0.0:
                continue
            if name not in scores:
                score_key = (plan.criterion, plan.seed if plan.criterion == "random" else 0)
                raise PruningError(self._unscorable[(score_key, name)])
            round_to = math.lcm(plan.round_to, self.steps.get(name, 1))
            selected[name] = _select(self.graph, group, name, scores[name], ratio, round_to, self.num_heads)
        return self._operations_for(selected)

    def _operations_for(
        self, selected: dict[str, tuple[list[int], int | None]]
    ) -> tuple[list[tuple[str, Any, int, list[int]]], dict[str, int]]:
        """Merged per-layer operations for the channels ``selected`` per group (and their new head counts)."""
        by_name = dict(self.groups)
        merged: dict[tuple[str, Any, int], set[int]] = {}
        heads: dict[str, int] = {}
        for name, (idxs, new_heads) in selected.items():
            if not idxs:
                continue
            for key, plain in self._group_operations(name, by_name[name], idxs):
                merged.setdefault(key, set()).update(plain)
            if new_heads is not None:
                for mha in _attention_modules(by_name[name]):
                    heads[self._names[mha]] = new_heads
                for proj in _head_projections(self.graph, by_name[name], self.num_heads):
                    owner = next(a for a, info in self._attention.items() if proj in info.projections)
                    heads[self._names[owner]] = new_heads
        return [(layer, handler, dim, sorted(ix)) for (layer, handler, dim), ix in merged.items()], heads

    def apply(self, plan: Plan) -> nn.Module:
        """A pruned deep copy of the base model (the base is never modified).

        A HuggingFace model's config gets the plan and what each layer kept (see
        :func:`autoprune.pruning.heads.record_layout`), so ``save_pretrained`` writes them into ``config.json``.
        """
        ops, heads = self.operations(plan)
        work = self._pruned_copy(ops, heads, plan)
        if ops:
            record_layout(work, self.base, plan.to_json())
        return work

    def _pruned_copy(self, ops: list[tuple[str, Any, int, list[int]]], heads: dict[str, int], plan: Plan) -> nn.Module:
        """A copy of the base model with ``ops`` applied, passed to ``after_prune``, checked by a forward pass."""
        if self._plain is None:
            self._plain = _plainly_copyable(self.base)
        work = ensure_eval(clone_module(self.base, plain=self._plain))
        if not ops:
            return self._after_prune(work, plan)
        modules = dict(work.named_modules())
        for layer, new_heads in heads.items():
            set_heads(modules[layer], new_heads)  # whole heads go: the head size stays, the head count shrinks
        try:
            for layer, handler, dim, idxs in ops:
                handler.__self__.pruning_dim = dim
                handler(modules[layer], idxs)
        except Exception as exc:
            raise PruningError(f"pruning {layer!r} failed: {type(exc).__name__}: {exc}") from exc
        work = self._after_prune(work, plan)
        try:
            got = _output_shapes(work, self.example_inputs)
        except Exception as exc:
            raise PruningError(f"the pruned model no longer runs: {type(exc).__name__}: {exc}") from exc
        if got != self._expected:
            raise PruningError(f"pruning changed the output shape from {self._expected} to {got}")
        return work

    def _after_prune(self, model: nn.Module, plan: Plan) -> nn.Module:
        """``after_prune``'s model (the same one unless it returned another). Its own errors propagate: a bug in
        the hook is the user's to see, not a reason to lock a group."""
        if self.after_prune is None:
            return model
        returned = self.after_prune(model, plan)
        if returned is None:
            return model
        if not isinstance(returned, nn.Module):
            raise InvalidConfigError(
                f"after_prune must change the model in place (return None) or return an nn.Module, "
                f"got {type(returned).__name__}"
            )
        return ensure_eval(returned)


_PLAIN = (int, float, bool, str, bytes, type(None), tuple, frozenset, torch.dtype, torch.device, torch.Size)
_IMMUTABLE = frozenset(_PLAIN)
_SHALLOW = frozenset({dict, OrderedDict, list, set})


def _plainly_copyable(model: nn.Module) -> bool:
    """True when every module holds only tensors, submodules, hooks dicts and immutable or container values."""
    for m in model.modules():
        if isinstance(m, nn.RNNBase | nn.MultiheadAttention):
            return False  # flat-weight lists, fused fast paths: leave these to deepcopy
        for key, value in m.__dict__.items():
            if key in ("_parameters", "_buffers", "_modules") or isinstance(value, (torch.Tensor, *_PLAIN)):
                continue
            if isinstance(value, dict | list | set) and all(
                isinstance(v, _PLAIN) or callable(v) for v in (value.values() if isinstance(value, dict) else value)
            ):
                continue
            return False
    return True


def clone_module(model: nn.Module, *, plain: bool | None = None) -> nn.Module:
    """A deep copy of ``model``, about 10x cheaper than ``copy.deepcopy`` for trees of plain layers.

    Every module object, parameter and buffer is new (tied tensors stay tied); dict/list/set attributes are
    copied one level; immutable values are shared. Models holding anything else (RNNs, attention, arbitrary
    objects) go through ``copy.deepcopy``. ``plain`` skips that check when the caller already knows.
    """
    if not (_plainly_copyable(model) if plain is None else plain):
        return copy.deepcopy(model)
    memo: dict[int, Any] = {}

    # the hot path of every candidate: exact-type dispatch first, isinstance (slow on unions) only as a fallback
    def tensor(t: torch.Tensor) -> torch.Tensor:
        new = memo.get(id(t))
        if new is None:
            new = t.detach().clone()
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            memo[id(t)] = new
        return new  # type: ignore[no-any-return]

    def module(m: nn.Module) -> nn.Module:
        new = memo.get(id(m))
        if new is not None:
            return new  # type: ignore[no-any-return]
        new = m.__class__.__new__(m.__class__)
        memo[id(m)] = new
        state = m.__dict__.copy()  # immutable values are shared as they are; the rest is replaced below
        for key, value in state.items():
            kind = type(value)
            if kind in _IMMUTABLE:
                continue
            if key == "_parameters" or key == "_buffers":
                tensors = {k: None if v is None else tensor(v) for k, v in value.items()}
                state[key] = tensors if kind is dict else kind(tensors)
            elif key == "_modules":
                modules = {k: None if v is None else module(v) for k, v in value.items()}
                state[key] = modules if kind is dict else kind(modules)
            elif kind in _SHALLOW:
                state[key] = value.copy()  # hooks dicts are OrderedDicts: .copy() keeps the type, fast
            elif isinstance(value, torch.Tensor):
                state[key] = tensor(value)
            elif isinstance(value, dict | list | set):
                state[key] = value.copy()
        new.__dict__.update(state)
        return new

    return module(model)


def analyze(
    model: nn.Module, example_inputs: Inputs, *, keep: Sequence[str] = (), prune_hidden: bool = False
) -> Structure:
    """Find the prunable groups of ``model`` (which is not modified)."""
    return PruningContext(model, example_inputs, keep=keep, prune_hidden=prune_hidden).structure


def apply_structured(
    model: nn.Module,
    plan: Plan,
    example_inputs: Inputs,
    *,
    keep: Sequence[str] = (),
    calibration: Batches | None = None,
    prune_hidden: bool = False,
    after_prune: AfterPrune | None = None,
) -> nn.Module:
    """Return a pruned copy of ``model``; the base model is not modified.

    For many plans on one model, build a :class:`PruningContext` once and call its ``apply``.
    """
    context = PruningContext(
        model, example_inputs, keep=keep, calibration=calibration, prune_hidden=prune_hidden, after_prune=after_prune
    )
    return context.apply(plan)
