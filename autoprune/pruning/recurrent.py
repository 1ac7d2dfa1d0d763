"""Structural pruning of recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) with Torch-Pruning.

Torch-Pruning 1.6.1 cannot do this by itself:

* its ``LSTMPruner.prune_out_channels`` slices ``weight_hh_l0`` twice with the same indices and crashes
  with ``IndexError: index out of range in self`` (it also handles only ``num_layers == 1``, leaves the gate
  rows of ``weight_ih`` untouched, prunes ``bias_ih`` with unit indices instead of gate rows and returns
  ``None``);
* it has no pruning function for ``nn.GRU`` or ``nn.RNN``;
* its tracer records only ``outputs[0].grad_fn`` of a module and then walks *through* the recurrent layer's
  internal autograd graph (oneDNN ``MkldnnRnnLayerBackward0`` on CPU, or per-time-step ``addmm``/``chunk``/
  ``unbind`` for GRU), so ``h_n`` consumers bypass the layer and get coupled to the layer *feeding* it, and a
  bidirectional output (``2H`` features) is coupled unit ``j -> j`` instead of ``j -> {j, H + j}``;
* its importances size a group's scores after the first scored member, which for a bidirectional layer is
  its ``2H``-column consumer, so ``H`` units get ``2H`` scores.

This module fixes all of it:

* :func:`prune_recurrent_units` / :func:`prune_recurrent_inputs` are the tp-free primitives;
* :func:`recurrent_pruners` gives Torch-Pruning pruning functions built on them;
* :func:`recurrent_tracing` makes each recurrent layer a single node of tp's graph while tp traces;
* :class:`RecurrentImportance` wraps any tp importance so recurrent groups get one score per unit.

Use them together::

    with recurrent_tracing(model):
        DG = tp.DependencyGraph().build_dependency(model, x, customized_pruners=recurrent_pruners())
    group = DG.get_pruning_group(model.lstm, LSTM_PRUNER.prune_out_channels, idxs)

    with recurrent_tracing(model):  # BasePruner traces in __init__
        pruner = tp.pruner.BasePruner(
            model, x, importance=RecurrentImportance(tp.importance.MagnitudeImportance()),
            customized_pruners=recurrent_pruners(),
            root_module_types=[nn.Conv1d, nn.Linear, *RECURRENT_TYPES], ...)
    pruner.step()

**One decision per module.** A pruning index ``j`` of a recurrent module is a hidden unit; removing it
removes unit ``j`` from *every* layer and *both* directions (an ``nn.LSTM`` keeps one ``hidden_size`` for all
of them).

**Supported consumption patterns** (inside :func:`recurrent_tracing`): anything that keeps the feature
axis as the last axis and only reduces or selects over the other axes, on the output sequence or on
``h_n``/``c_n``: ``out[:, -1]``, ``out[:, t]``, ``out.mean(1)``, ``out.max(1).values``, a ``Linear`` or
another recurrent layer applied per step, ``out.transpose(1, 2)`` into a ``Conv1d``, ``h_n[-1]``,
``h_n[k]``, ``torch.cat([h_n[-2], h_n[-1]], dim=1)``, ``c_n[-1]``; unidirectional and bidirectional, ``batch_first`` or
not, batched, unbatched or ``PackedSequence`` inputs. **Not supported:** flattening time into features
(``out.reshape(B, -1)`` then ``Linear``; tp maps 3-D reshapes as identity), an initial state ``hx`` that is
computed from trainable tensors (refused with :class:`~autoprune.errors.PruningError`; a constant ``hx`` is
accepted but must be built from ``module.hidden_size`` at call time to survive pruning), ``proj_size > 0``
(refused: input pruning works, hidden units are never a root), and a bidirectional output whose features are
coupled to another layer's output channels (e.g. added residually) so that a group rooted *elsewhere* picks
``j`` without ``H + j``.

**MACs.** ``torch.utils.flop_counter.FlopCounterMode`` sees the ``mm``/``addmm`` of GRU and RNN and of LSTM
when oneDNN is off, and then ``flops / 2`` equals :func:`recurrent_macs`. On CPU with oneDNN on (the default)
an LSTM runs as ``aten.mkldnn_rnn_layer``, which has no flop formula, so the LSTM counts **0**; pass
``custom_mapping=recurrent_flop_formulas()`` to ``FlopCounterMode`` to count it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from autoprune.cost import FLOP_FORMULAS
from autoprune.errors import PruningError

__all__ = [
    "GRU_PRUNER",
    "LSTM_PRUNER",
    "RECURRENT_TYPES",
    "RNN_PRUNER",
    "GRUUnitPruner",
    "LSTMUnitPruner",
    "RNNUnitPruner",
    "RecurrentImportance",
    "RecurrentUnitPruner",
    "prune_recurrent_inputs",
    "prune_recurrent_units",
    "recurrent_flop_formulas",
    "recurrent_macs",
    "recurrent_pruners",
    "recurrent_tracing",
    "recurrent_unit_magnitude",
]

#: Module types handled here (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``).
RECURRENT_TYPES: tuple[type[nn.RNNBase], ...] = (nn.LSTM, nn.GRU, nn.RNN)

# Gate blocks stacked along dim 0 of weight_ih / weight_hh / biases:
# LSTM (i, f, g, o), GRU (r, z, n), RNN (1).
_GATES: dict[type[nn.RNNBase], int] = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _gates(module: nn.Module) -> int:
    for cls, gates in _GATES.items():
        if isinstance(module, cls):
            return gates
    raise PruningError(f"{type(module).__name__} is not a recurrent layer (nn.LSTM, nn.GRU or nn.RNN)")


def _directions(module: nn.RNNBase) -> int:
    return 2 if module.bidirectional else 1


def _suffixes(module: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if module.bidirectional else ("",)


def _keep(size: int, idxs: Sequence[int], what: str, module: nn.Module) -> torch.Tensor:
    """Sorted indices of ``range(size)`` not in ``idxs``, after validating ``idxs``."""
    removed = {int(i) for i in idxs}
    bad = sorted(i for i in removed if not 0 <= i < size)
    if bad:
        raise PruningError(f"{type(module).__name__}: {what} indices {bad} out of range [0, {size})")
    if len(removed) >= size:
        raise PruningError(f"{type(module).__name__}: cannot remove all {size} {what}s")
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _select(module: nn.RNNBase, name: str, dim: int, index: torch.Tensor) -> None:
    """Replace parameter ``name`` by its ``index`` slice along ``dim`` (keeps dtype, device, grad)."""
    old: nn.Parameter = getattr(module, name)
    index = index.to(old.device)
    new = nn.Parameter(torch.index_select(old.data, dim, index), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = torch.index_select(old.grad, dim, index)
    # RNNBase.__setattr__ also updates module._flat_weights for names in _flat_weights_names.
    setattr(module, name, new)


def _refresh_flat_weights(module: nn.RNNBase) -> None:
    """Rebuild the flat-weight caches that the fused kernels read, so ``forward`` sees the new tensors."""
    module._init_flat_weights()
    module.flatten_parameters()  # a no-op on CPU; re-packs the cuDNN buffer on CUDA


def _refuse_projection(module: nn.RNNBase) -> None:
    if getattr(module, "proj_size", 0) > 0:
        raise PruningError(
            f"nn.LSTM with proj_size={module.proj_size} cannot have its hidden units pruned "
            "(the projection couples them to the output features); exclude it from pruning"
        )


def prune_recurrent_units(module: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
    """Remove hidden units ``idxs`` from ``module`` in place and return it.

    For every layer ``k`` and direction (``""``/``"_reverse"``), with ``G`` gates (LSTM 4: i, f, g, o; GRU 3:
    r, z, n; RNN 1) and hidden size ``H``: removes rows ``{g * H + j}`` of ``weight_ih_l{k}``,
    ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, column ``j`` of ``weight_hh_l{k}`` and, for
    ``k >= 1``, input columns ``{d * H + j}`` of ``weight_ih_l{k}`` (the previous layer's output, forward
    then reverse). The same units go from every layer and both directions: one decision per module. Updates
    ``hidden_size`` and the flat-weight caches. Raises :class:`PruningError` for ``proj_size > 0``, indices
    out of range, or removing every unit.
    """
    gates = _gates(module)
    _refuse_projection(module)
    hidden = module.hidden_size
    keep = _keep(hidden, idxs, "hidden unit", module)
    rows = torch.cat([keep + g * hidden for g in range(gates)])
    upper_in = torch.cat([keep + d * hidden for d in range(_directions(module))])
    for layer in range(module.num_layers):
        for sfx in _suffixes(module):
            _select(module, f"weight_ih_l{layer}{sfx}", 0, rows)
            if layer > 0:
                _select(module, f"weight_ih_l{layer}{sfx}", 1, upper_in)
            _select(module, f"weight_hh_l{layer}{sfx}", 0, rows)
            _select(module, f"weight_hh_l{layer}{sfx}", 1, keep)
            if module.bias:
                _select(module, f"bias_ih_l{layer}{sfx}", 0, rows)
                _select(module, f"bias_hh_l{layer}{sfx}", 0, rows)
    module.hidden_size = len(keep)
    _refresh_flat_weights(module)
    return module


def prune_recurrent_inputs(module: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
    """Remove input features ``idxs`` (columns of ``weight_ih_l0`` and ``weight_ih_l0_reverse``) in place."""
    _gates(module)
    keep = _keep(module.input_size, idxs, "input feature", module)
    for sfx in _suffixes(module):
        _select(module, f"weight_ih_l0{sfx}", 1, keep)
    module.input_size = len(keep)
    _refresh_flat_weights(module)
    return module


class RecurrentUnitPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruning function whose channels are hidden units (out) and input features (in).

    ``prune_out_channels`` and ``prune_in_channels`` differ, so tp builds no intra-layer dependency: a
    module's inputs and its hidden units are pruned by different groups.
    """

    TARGET_MODULES: Any = RECURRENT_TYPES

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return prune_recurrent_units(layer, idxs)  # type: ignore[arg-type]

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return prune_recurrent_inputs(layer, idxs)  # type: ignore[arg-type]

    def get_out_channels(self, layer: nn.Module) -> int | None:
        # None for projected LSTMs: tp then never makes them a group root (their inputs stay prunable).
        if getattr(layer, "proj_size", 0) > 0:
            return None
        return int(layer.hidden_size)  # type: ignore[arg-type]

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.input_size)  # type: ignore[arg-type]


class LSTMUnitPruner(RecurrentUnitPruner):
    """Hidden-unit pruning for ``nn.LSTM`` (4 gates)."""

    TARGET_MODULES = nn.LSTM


class GRUUnitPruner(RecurrentUnitPruner):
    """Hidden-unit pruning for ``nn.GRU`` (3 gates)."""

    TARGET_MODULES = nn.GRU


class RNNUnitPruner(RecurrentUnitPruner):
    """Hidden-unit pruning for ``nn.RNN`` (1 gate)."""

    TARGET_MODULES = nn.RNN


# Singletons: tp compares pruning functions by identity of the bound method, so the functions passed to
# ``get_pruning_group`` must belong to the instances registered through ``customized_pruners``.
LSTM_PRUNER = LSTMUnitPruner()
GRU_PRUNER = GRUUnitPruner()
RNN_PRUNER = RNNUnitPruner()


def recurrent_pruners() -> dict[type[nn.Module], tp.pruner.function.BasePruningFunc]:
    """``customized_pruners`` for Torch-Pruning: ``{nn.LSTM: LSTM_PRUNER, nn.GRU: GRU_PRUNER, nn.RNN: ...}``.

    Also add :data:`RECURRENT_TYPES` to ``root_module_types`` of ``tp.pruner.BasePruner`` so that groups are
    rooted at the recurrent modules, and build the graph inside :func:`recurrent_tracing`.
    """
    return {nn.LSTM: LSTM_PRUNER, nn.GRU: GRU_PRUNER, nn.RNN: RNN_PRUNER}


# ---------------------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------------------


def recurrent_unit_magnitude(module: nn.RNNBase, p: float = 2.0) -> torch.Tensor:
    """Per hidden unit, the sum of ``|w| ** p`` over the weights :func:`prune_recurrent_units` removes for it.

    That is the unit's gate rows of ``weight_ih``/``weight_hh``, its column of ``weight_hh`` and its input
    columns of the upper layers' ``weight_ih``, over all layers and directions (biases excluded, as in
    Torch-Pruning's magnitude importance). Shape ``(hidden_size,)``.
    """
    gates = _gates(module)
    _refuse_projection(module)
    hidden, directions = module.hidden_size, _directions(module)
    total = torch.zeros(hidden)
    for name, weight in module.named_parameters():
        if not name.startswith("weight_"):
            continue
        a = weight.detach().abs().float().pow(p).cpu()
        total += a.sum(dim=1).view(gates, hidden).sum(dim=0)  # gate rows of the unit
        if name.startswith("weight_hh"):
            total += a.sum(dim=0)  # recurrent column
        elif not name.startswith("weight_ih_l0"):
            total += a.sum(dim=0).view(directions, hidden).sum(dim=0)  # upper layers' input columns
    return total


class RecurrentImportance(tp.importance.Importance):
    """Adapts a Torch-Pruning importance to groups rooted at recurrent modules; others pass through unchanged.

    Torch-Pruning sizes a group's score vector after the first *scored* member. A recurrent root is never
    scored by tp's importances, so for a bidirectional layer the first scored member is its consumer, with
    ``2H`` columns, and the scores come back with ``2H`` entries (the last ``H`` of them zero) for ``H`` units.
    This wrapper returns exactly ``hidden_size`` scores: the inner importance computed without its normalizer,
    cut to the units (exact: tp scatters every member's scores onto the root's indices ``< H``), then
    normalized as the inner importance would. When no member is scorable (e.g. an LSTM feeding another LSTM)
    the scores are :func:`recurrent_unit_magnitude` of the module (with the inner importance's ``p``, default
    2).
    """

    def __init__(self, inner: tp.importance.Importance) -> None:
        self.inner = inner

    def __call__(self, group: Any) -> torch.Tensor | None:
        root_dep = group[0].dep
        root = root_dep.target.module
        pruner = recurrent_pruners().get(type(root))
        if pruner is None or root_dep.handler != pruner.prune_out_channels:
            return self.inner(group)
        normalizer = getattr(self.inner, "normalizer", None)
        normalize = getattr(self.inner, "_normalize", None)
        if normalize is not None:
            self.inner.normalizer = None  # type: ignore[attr-defined]
        try:
            scores = self.inner(group)
        finally:
            if normalize is not None:
                self.inner.normalizer = normalizer  # type: ignore[attr-defined]
        hidden = root.hidden_size
        if scores is None or scores.numel() < hidden:
            scores = recurrent_unit_magnitude(root, float(getattr(self.inner, "p", 2)))
        scores = scores[:hidden]
        return normalize(scores, normalizer) if normalize is not None else scores


# ---------------------------------------------------------------------------------------------------------
# Tracing: one graph node per recurrent module
# ---------------------------------------------------------------------------------------------------------


class _Boundary(torch.autograd.Function):
    """Identity on ``values`` whose only graph inputs are the layer's input (and a leaf anchor).

    All outputs share this one autograd node, which tp maps to the recurrent module; so the sequence output
    and ``h_n``/``c_n`` both hang off the module's node, and the layer's internal graph (oneDNN, gate chunks,
    time-step unbinds) is hidden from tp. Used only while tracing; gradients are not propagated.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, inputs: torch.Tensor, *values: torch.Tensor) -> Any:
        return tuple(v.clone() for v in values)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        return (None, None, *(None for _ in grads))


def _state_tensors(hx: Any) -> list[torch.Tensor]:
    if hx is None:
        return []
    if isinstance(hx, torch.Tensor):
        return [hx]
    return [t for t in hx if isinstance(t, torch.Tensor)]


def _join_directions(forward: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """``cat([forward, reverse], -1)`` written so that tp maps unit ``j`` to features ``j`` and ``H + j``.

    tp's concat index mapping only applies to ``cat(dim=1)`` (and tp maps 3-D views as identity), so 3-D
    tensors are transposed (an element-wise op for tp) to put features on dim 1, concatenated and transposed
    back.
    """
    if forward.dim() == 2:
        return torch.cat([forward, reverse], dim=1)
    if forward.dim() == 3:
        return torch.cat([forward.transpose(1, 2), reverse.transpose(1, 2)], dim=1).transpose(1, 2)
    raise PruningError(f"unexpected recurrent output of rank {forward.dim()}")


class _Tracer:
    """Replaces ``forward`` and ``_call_impl`` of one recurrent module while tp traces.

    ``forward`` runs the real layer without autograd and returns *raw* tensors made by :class:`_Boundary`
    (per-direction outputs, then ``h_n`` and ``c_n``); the module's forward hooks, tp's included, see the raw
    tuple, so tp records the boundary node as the module. ``_call_impl`` then assembles the outputs the caller
    expects (same values, same structure) from the raw tensors.
    """

    def __init__(self, module: nn.RNNBase) -> None:
        self.module = module
        self.trainable_state = False

    def forward(self, input: Any, hx: Any = None) -> tuple[Any, ...]:
        module = self.module
        if any(t.requires_grad for t in _state_tensors(hx)):
            self.trainable_state = True  # reported when the context exits, outside tp's try/except
        with torch.no_grad():
            output, state = type(module).forward(module, input, hx)
        packed = isinstance(output, PackedSequence)
        features = output.data if packed else output
        x = input.data if isinstance(input, PackedSequence) else input
        width = features.shape[-1] // _directions(module)
        values = [features[..., d * width : (d + 1) * width] for d in range(_directions(module))]
        values += _state_tensors(state)
        anchor = torch.zeros((), device=features.device, requires_grad=True)
        raw = _Boundary.apply(anchor, x, *values)
        return (*raw, output if packed else None)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        raw = type(self.module)._call_impl(self.module, *args, **kwargs)
        *tensors, packed = raw
        directions = _directions(self.module)
        per_direction, states = tensors[:directions], tensors[directions:]
        features = per_direction[0] if directions == 1 else _join_directions(*per_direction)
        output: Any = features
        if packed is not None:
            output = PackedSequence(features, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        if isinstance(self.module, nn.LSTM):
            return output, (states[0], states[1])
        return output, states[0]


@contextlib.contextmanager
def recurrent_tracing(model: nn.Module) -> Iterator[None]:
    """While active, every LSTM/GRU/RNN in ``model`` is one node of Torch-Pruning's dependency graph.

    Wrap ``tp.DependencyGraph().build_dependency(...)`` or the construction of a ``tp.pruner.BasePruner``
    (which traces in its ``__init__``); pruning afterwards needs no context. Inside, recurrent modules return
    the same values as usual but carry a simplified autograd graph (no gradients reach their weights), so do
    not train inside it. Raises :class:`PruningError` on exit if a recurrent module got an initial state
    ``hx`` computed from trainable tensors (its coupling to the hidden units cannot be expressed in tp).
    """
    tracers: list[_Tracer] = []
    for m in model.modules():
        if isinstance(m, RECURRENT_TYPES) and "_call_impl" not in m.__dict__:
            tracers.append(_Tracer(m))
    for tracer in tracers:
        # Instance attributes shadow the class methods; nn.Module.__call__ looks up self._call_impl.
        tracer.module.__dict__["forward"] = tracer.forward
        tracer.module.__dict__["_call_impl"] = tracer.call
    try:
        yield
    finally:
        for tracer in tracers:
            tracer.module.__dict__.pop("forward", None)
            tracer.module.__dict__.pop("_call_impl", None)
    bad = [type(t.module).__name__ for t in tracers if t.trainable_state]
    if bad:
        raise PruningError(
            f"{', '.join(bad)} received an initial state (hx) computed from trainable tensors; pruning its "
            "hidden units would need the producer pruned too, which is not supported"
        )


# ---------------------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------------------


def recurrent_macs(module: nn.RNNBase, batch_size: int, seq_len: int) -> int:
    """Multiply-accumulates of the matmuls of one forward over ``batch_size`` sequences of ``seq_len`` steps.

    Per step, layer and direction: ``G * H * (I_k + H)`` (LSTM G=4, GRU G=3, RNN G=1; ``I_0`` the input size,
    ``I_k = D * H`` above), plus ``P * H`` for an LSTM projection; i.e. the sum of the sizes of the 2-D
    weights times ``batch_size * seq_len``. For a ``PackedSequence`` pass ``batch_size=1`` and
    ``seq_len=data.shape[0]``. Element-wise gate arithmetic and biases are not counted (nor are they by
    ``FlopCounterMode``).
    """
    _gates(module)
    per_step = sum(p.numel() for name, p in module.named_parameters() if name.startswith("weight_"))
    return int(per_step) * int(batch_size) * int(seq_len)


def recurrent_flop_formulas() -> dict[Any, Any]:
    """``custom_mapping`` for ``FlopCounterMode`` that counts oneDNN LSTM layers (otherwise counted as 0)."""
    return dict(FLOP_FORMULAS)
