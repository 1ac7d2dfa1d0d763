"""Structural pruning of nn.LSTM / nn.GRU through real Torch-Pruning, and their MAC counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.flop_counter import FlopCounterMode

from autoprune.errors import PruningError
from autoprune.pruning.recurrent import (
    GRU_PRUNER,
    LSTM_PRUNER,
    RECURRENT_TYPES,
    RecurrentImportance,
    prune_recurrent_inputs,
    prune_recurrent_units,
    recurrent_flop_formulas,
    recurrent_macs,
    recurrent_pruners,
    recurrent_tracing,
    recurrent_unit_magnitude,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning"),
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning"),
]

IN_CH, CH, HIDDEN, STEPS, BATCH, CLASSES = 4, 6, 8, 7, 3, 5
PRUNED = [1, 4, 6, 7]  # half of HIDDEN
GATES = {nn.LSTM: 4, nn.GRU: 3}
PRUNER = {nn.LSTM: LSTM_PRUNER, nn.GRU: GRU_PRUNER}
CASES = [
    pytest.param(cls, layers, bi, id=f"{cls.__name__}-{layers}layer-{'bi' if bi else 'uni'}")
    for cls in (nn.LSTM, nn.GRU)
    for layers in (1, 2)
    for bi in (False, True)
]


class SeqNet(nn.Module):
    """x (B, C, L) -> Conv1d -> transpose -> recurrent (batch_first) -> last step or h_n[-1] -> Linear."""

    def __init__(self, cls: type[nn.RNNBase], layers: int, bi: bool, use: str = "output") -> None:
        super().__init__()
        self.use = use
        self.conv = nn.Conv1d(IN_CH, CH, 3, padding=1)
        self.rnn = cls(CH, HIDDEN, num_layers=layers, batch_first=True, bidirectional=bi)
        width = {"output": HIDDEN * (2 if bi else 1), "h_n": HIDDEN, "h_cat": 2 * HIDDEN}[use]
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(self.conv(x).transpose(1, 2))
        h_n = state[0] if isinstance(state, tuple) else state
        if self.use == "output":
            return self.head(out[:, -1])
        if self.use == "h_n":
            return self.head(h_n[-1])
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1))


def make(cls: type[nn.RNNBase], layers: int, bi: bool, use: str = "output", seed: int = 0) -> SeqNet:
    torch.manual_seed(seed)
    return SeqNet(cls, layers, bi, use).eval()


def example() -> torch.Tensor:
    return torch.randn(BATCH, IN_CH, STEPS, generator=torch.Generator().manual_seed(1))


def build_graph(model: nn.Module, x: torch.Tensor) -> tp.DependencyGraph:
    with recurrent_tracing(model):
        return tp.DependencyGraph().build_dependency(model, x, customized_pruners=recurrent_pruners())


def silence_units(model: SeqNet, units: list[int]) -> None:
    """Zero every weight that carries hidden units ``units`` anywhere: then they influence nothing."""
    rnn, hidden = model.rnn, model.rnn.hidden_size
    directions = 2 if rnn.bidirectional else 1
    sfxs = ["", "_reverse"][:directions]
    cols = [d * hidden + j for d in range(directions) for j in units]
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            for sfx in sfxs:
                getattr(rnn, f"weight_hh_l{layer}{sfx}")[:, units] = 0
                if layer > 0:
                    getattr(rnn, f"weight_ih_l{layer}{sfx}")[:, cols] = 0
        head_cols = {"output": cols, "h_n": units, "h_cat": [d * hidden + j for d in range(2) for j in units]}
        model.head.weight[:, head_cols[model.use]] = 0


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the tp-free primitive ------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "layers", "bi"), CASES)
def test_prune_recurrent_units_shapes(cls: type[nn.RNNBase], layers: int, bi: bool) -> None:
    torch.manual_seed(0)
    rnn = cls(CH, HIDDEN, num_layers=layers, bidirectional=bi, batch_first=True)
    before = {n: p.detach().clone() for n, p in rnn.named_parameters()}
    prune_recurrent_units(rnn, PRUNED)
    keep = [j for j in range(HIDDEN) if j not in PRUNED]
    h, g, d = len(keep), GATES[cls], 2 if bi else 1
    assert rnn.hidden_size == h
    rows = torch.tensor([gate * HIDDEN + j for gate in range(g) for j in keep])
    for name, p in rnn.named_parameters():
        layer = int(name.split("_l")[1][0])
        if name.startswith("weight_ih"):
            expected_in = CH if layer == 0 else d * h
            assert p.shape == (g * h, expected_in)
            cols = torch.tensor([k * HIDDEN + j for k in range(d) for j in keep]) if layer else slice(None)
            torch.testing.assert_close(p, before[name][rows][:, cols], rtol=0, atol=0)
        elif name.startswith("weight_hh"):
            assert p.shape == (g * h, h)
            torch.testing.assert_close(p, before[name][rows][:, keep], rtol=0, atol=0)
        else:
            torch.testing.assert_close(p, before[name][rows], rtol=0, atol=0)
    # the flat-weight cache the kernels read is the new parameters
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names, strict=True))
    out, _ = rnn(torch.randn(BATCH, STEPS, CH))
    assert out.shape == (BATCH, STEPS, d * h)


def test_prune_recurrent_inputs() -> None:
    torch.manual_seed(0)
    rnn = nn.GRU(CH, HIDDEN, bidirectional=True)
    ref = copy.deepcopy(rnn)
    with torch.no_grad():
        ref.weight_ih_l0[:, [0, 3]] = 0
        ref.weight_ih_l0_reverse[:, [0, 3]] = 0
    x = torch.randn(STEPS, BATCH, CH)
    prune_recurrent_inputs(ref, [0, 3])
    assert ref.input_size == CH - 2 and ref.weight_ih_l0.shape[1] == CH - 2
    keep = [i for i in range(CH) if i not in (0, 3)]
    out, _ = ref(x[..., keep])
    assert out.shape == (STEPS, BATCH, 2 * HIDDEN)


def test_primitive_refuses_bad_requests() -> None:
    with pytest.raises(PruningError, match="proj_size"):
        prune_recurrent_units(nn.LSTM(CH, HIDDEN, proj_size=3), [0])
    with pytest.raises(PruningError, match="out of range"):
        prune_recurrent_units(nn.GRU(CH, HIDDEN), [HIDDEN])
    with pytest.raises(PruningError, match="cannot remove all"):
        prune_recurrent_units(nn.LSTM(CH, HIDDEN), list(range(HIDDEN)))
    with pytest.raises(PruningError, match="not a recurrent layer"):
        prune_recurrent_units(nn.Linear(2, 2), [0])  # type: ignore[arg-type]


# --- through Torch-Pruning's dependency graph -------------------------------------------------------------


@pytest.mark.parametrize(("cls", "layers", "bi"), CASES)
@pytest.mark.parametrize("use", ["output", "h_n"])
def test_group_pruning_preserves_outputs_of_silenced_units(
    cls: type[nn.RNNBase], layers: int, bi: bool, use: str
) -> None:
    model, x = make(cls, layers, bi, use), example()
    silence_units(model, PRUNED)
    with torch.no_grad():
        expected = model(x)
    params = n_params(model)

    graph = build_graph(model, x)
    group = graph.get_pruning_group(model.rnn, PRUNER[cls].prune_out_channels, PRUNED)
    targets = {(dep.target.module, dep.handler.__name__): sorted(idxs) for dep, idxs in group}
    # rooted at the recurrent module, coupled to the head's input columns (both directions for 2H features)
    assert group[0].dep.target.module is model.rnn
    head_cols = PRUNED + [HIDDEN + j for j in PRUNED] if (bi and use == "output") else PRUNED
    assert targets[(model.head, "prune_in_channels")] == sorted(head_cols)
    assert (model.conv, "prune_out_channels") not in targets
    group.prune()

    assert model.rnn.hidden_size == HIDDEN // 2
    assert n_params(model) < params
    with torch.no_grad():
        got = model(x)
    assert got.shape == (BATCH, CLASSES)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_bidirectional_h_n_concat_is_coupled_to_both_halves(cls: type[nn.RNNBase]) -> None:
    model, x = make(cls, 2, True, "h_cat"), example()
    silence_units(model, PRUNED)
    with torch.no_grad():
        expected = model(x)
    group = build_graph(model, x).get_pruning_group(model.rnn, PRUNER[cls].prune_out_channels, PRUNED)
    head = [sorted(i) for dep, i in group if dep.target.module is model.head]
    assert head == [sorted(PRUNED + [HIDDEN + j for j in PRUNED])]
    group.prune()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_upstream_pruning_removes_recurrent_input_columns(cls: type[nn.RNNBase]) -> None:
    model, x = make(cls, 2, True), example()
    with torch.no_grad():  # conv channels 2 and 5 feed nothing: zero their outgoing weights
        model.rnn.weight_ih_l0[:, [2, 5]] = 0
        model.rnn.weight_ih_l0_reverse[:, [2, 5]] = 0
        expected = model(x)
    group = build_graph(model, x).get_pruning_group(model.conv, tp.prune_conv_out_channels, [2, 5])
    assert {(dep.target.module, dep.handler.__name__) for dep, _ in group} >= {
        (model.conv, "prune_out_channels"),
        (model.rnn, "prune_in_channels"),
    }
    assert all(dep.target.module is not model.head for dep, _ in group)
    group.prune()
    assert model.rnn.input_size == CH - 2 and model.rnn.hidden_size == HIDDEN
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("cls", "layers", "bi"), CASES)
def test_base_pruner_halves_hidden_units(cls: type[nn.RNNBase], layers: int, bi: bool) -> None:
    model, x = make(cls, layers, bi), example()
    params = n_params(model)
    with recurrent_tracing(model):
        pruner = tp.pruner.BasePruner(
            model,
            x,
            importance=RecurrentImportance(tp.importance.MagnitudeImportance()),
            pruning_ratio=0.5,
            ignored_layers=[model.head],
            customized_pruners=recurrent_pruners(),
            root_module_types=[nn.Conv1d, nn.Linear, *RECURRENT_TYPES],
        )
    pruner.step()
    assert model.rnn.hidden_size == HIDDEN // 2
    assert model.conv.out_channels == CH // 2 == model.rnn.input_size
    assert model.head.in_features == HIDDEN // 2 * (2 if bi else 1)
    assert n_params(model) < params
    with torch.no_grad():
        assert model(x).shape == (BATCH, CLASSES)


@pytest.mark.parametrize("normalizer", ["mean", "max", "sum", None])
def test_recurrent_importance_scores_one_entry_per_unit(normalizer: str | None) -> None:
    model, x = make(nn.LSTM, 1, True), example()
    graph = build_graph(model, x)
    group = graph.get_pruning_group(model.rnn, LSTM_PRUNER.prune_out_channels, list(range(HIDDEN)))
    inner = tp.importance.MagnitudeImportance(normalizer=normalizer)
    stock = inner(group)
    assert stock.numel() == 2 * HIDDEN  # tp sizes the scores after the 2H-column head
    scores = RecurrentImportance(inner)(group)
    assert inner.normalizer == normalizer  # restored
    # per unit j: |head[:, j]|^2 + |head[:, H + j]|^2 (tp's 'mean' over one scored member), then normalized
    per_unit = model.head.weight.detach().pow(2).sum(0).view(2, HIDDEN).sum(0)
    torch.testing.assert_close(scores, inner._normalize(per_unit, normalizer))
    # other groups are scored by the inner importance unchanged
    conv_group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, list(range(CH)))
    torch.testing.assert_close(RecurrentImportance(inner)(conv_group), inner(conv_group))


def test_recurrent_importance_falls_back_to_own_weights() -> None:
    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.LSTM(CH, HIDDEN, batch_first=True)
            self.second = nn.GRU(HIDDEN, HIDDEN, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x)[0])[0]

    torch.manual_seed(0)
    model = Stacked()
    graph = build_graph(model, torch.randn(BATCH, STEPS, CH))
    group = graph.get_pruning_group(model.first, LSTM_PRUNER.prune_out_channels, list(range(HIDDEN)))
    assert {dep.target.module for dep, _ in group} >= {model.first, model.second}
    assert tp.importance.MagnitudeImportance()(group) is None  # nothing tp can score
    scores = RecurrentImportance(tp.importance.MagnitudeImportance(normalizer=None))(group)
    torch.testing.assert_close(scores, recurrent_unit_magnitude(model.first))
    w_ih, w_hh = model.first.weight_ih_l0.detach(), model.first.weight_hh_l0.detach()
    j = 3
    rows = [g * HIDDEN + j for g in range(4)]
    expected = w_ih[rows].pow(2).sum() + w_hh[rows].pow(2).sum() + w_hh[:, j].pow(2).sum()
    torch.testing.assert_close(scores[j], expected)
    graph.get_pruning_group(model.first, LSTM_PRUNER.prune_out_channels, PRUNED).prune()
    assert model.first.hidden_size == model.second.input_size == HIDDEN // 2
    assert model(torch.randn(BATCH, STEPS, CH)).shape == (BATCH, STEPS, HIDDEN)


def test_same_indices_give_identical_weights() -> None:
    x = example()
    states = []
    for _ in range(2):
        model = make(nn.LSTM, 2, True)
        build_graph(model, x).get_pruning_group(model.rnn, LSTM_PRUNER.prune_out_channels, PRUNED).prune()
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_projected_lstm_is_refused_but_its_inputs_stay_prunable() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(CH, CH), nn.LSTM(CH, HIDDEN, proj_size=3, batch_first=True))
    x = torch.randn(BATCH, STEPS, CH)
    graph = build_graph(model, x)
    with pytest.raises(PruningError, match="proj_size"):
        graph.get_pruning_group(model[1], LSTM_PRUNER.prune_out_channels, [0]).prune()
    roots = [g[0].dep.target.module for g in graph.get_all_groups(root_module_types=[nn.Linear, nn.LSTM])]
    assert model[1] not in roots
    graph.get_pruning_group(model[0], tp.prune_linear_out_channels, [0, 1]).prune()
    assert model[1].input_size == CH - 2 and model[1].hidden_size == HIDDEN
    assert model(x)[0].shape == (BATCH, STEPS, 3)


# --- the tracing context --------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "layers", "bi"), CASES)
def test_tracing_context_keeps_values_and_restores_modules(cls: type[nn.RNNBase], layers: int, bi: bool) -> None:
    torch.manual_seed(0)
    rnn = cls(CH, HIDDEN, num_layers=layers, bidirectional=bi, batch_first=True).eval()
    x = torch.randn(BATCH, STEPS, CH)
    lengths = torch.tensor([STEPS, 5, 2])
    with torch.no_grad():
        expected = rnn(x)
        expected_packed = rnn(pack_padded_sequence(x, lengths, batch_first=True))
    with recurrent_tracing(rnn):
        got = rnn(x)
        got_packed = rnn(pack_padded_sequence(x, lengths, batch_first=True))
        assert got[0].grad_fn is not None
    assert "forward" not in rnn.__dict__ and "_call_impl" not in rnn.__dict__
    for a, b in ((got, expected), (got_packed, expected_packed)):
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert len(flat_a) == len(flat_b)
        for ta, tb in zip(flat_a, flat_b, strict=True):
            torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def test_trainable_initial_state_is_refused() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.init = nn.Linear(CH, HIDDEN)
            self.rnn = nn.GRU(CH, HIDDEN, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x, self.init(x[:, 0]).unsqueeze(0))[0]

    model = Net()
    with pytest.raises(PruningError, match="initial state"), recurrent_tracing(model):
        tp.DependencyGraph().build_dependency(
            model, torch.randn(BATCH, STEPS, CH), customized_pruners=recurrent_pruners()
        )
    assert "_call_impl" not in model.rnn.__dict__


def test_constant_initial_state_is_accepted() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(CH, HIDDEN, batch_first=True)
    x = torch.randn(BATCH, STEPS, CH)

    def forward(m: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(1, BATCH, rnn.hidden_size)  # sized from the module at call time
        return m(inputs, (zeros, zeros))[0]

    with recurrent_tracing(rnn):
        graph = tp.DependencyGraph().build_dependency(
            rnn, x, forward_fn=forward, customized_pruners=recurrent_pruners()
        )
    graph.get_pruning_group(rnn, LSTM_PRUNER.prune_out_channels, PRUNED).prune()
    assert forward(rnn, x).shape == (BATCH, STEPS, HIDDEN // 2)


# --- MACs -------------------------------------------------------------------------------------------------


def analytic_macs(rnn: nn.RNNBase, batch: int, steps: int) -> int:
    gates, d, h = GATES[type(rnn)], 2 if rnn.bidirectional else 1, rnn.hidden_size
    inputs = [rnn.input_size] + [d * h] * (rnn.num_layers - 1)
    return sum(gates * h * (i + h) for i in inputs) * steps * batch * d


def flop_counter_macs(module: nn.Module, x: torch.Tensor, **kwargs: object) -> int:
    counter = FlopCounterMode(display=False, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops()) // 2


@pytest.mark.parametrize(("cls", "layers", "bi"), CASES)
def test_flop_counter_matches_analytic_macs(cls: type[nn.RNNBase], layers: int, bi: bool) -> None:
    torch.manual_seed(0)
    rnn = cls(CH, HIDDEN, num_layers=layers, bidirectional=bi, batch_first=True).eval()
    x = torch.randn(BATCH, STEPS, CH)
    expected = analytic_macs(rnn, BATCH, STEPS)
    assert recurrent_macs(rnn, BATCH, STEPS) == expected
    # With oneDNN off every recurrent layer decomposes into mm/addmm, which FlopCounterMode counts.
    with torch.backends.mkldnn.flags(enabled=False):
        assert flop_counter_macs(rnn, x) == expected
    # With the default backend, the custom formula covers oneDNN's fused LSTM layer.
    assert flop_counter_macs(rnn, x, custom_mapping=recurrent_flop_formulas()) == expected
    if cls is nn.GRU:  # GRU has no fused CPU kernel: counted either way
        assert flop_counter_macs(rnn, x) == expected


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built in")
def test_flop_counter_misses_onednn_lstm_without_custom_formula() -> None:
    # Documents why recurrent_flop_formulas() exists: aten.mkldnn_rnn_layer has no FLOP formula in torch.
    rnn = nn.LSTM(CH, HIDDEN, batch_first=True).eval()
    assert flop_counter_macs(rnn, torch.randn(BATCH, STEPS, CH)) == 0


def test_macs_shrink_with_pruned_units() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(CH, HIDDEN, num_layers=2, bidirectional=True, batch_first=True).eval()
    prune_recurrent_units(rnn, PRUNED)
    x = torch.randn(BATCH, STEPS, CH)
    expected = analytic_macs(rnn, BATCH, STEPS)
    assert flop_counter_macs(rnn, x, custom_mapping=recurrent_flop_formulas()) == expected
    assert expected < analytic_macs(nn.LSTM(CH, HIDDEN, num_layers=2, bidirectional=True), BATCH, STEPS)
