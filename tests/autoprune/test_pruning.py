"""Structured pruning with real Torch-Pruning over the built-in zoo, plus unstructured sparsity."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.cost import count_macs
from autoprune.errors import InvalidPlanError, PruningError
from autoprune.models.registry import build_model, example_inputs
from autoprune.plan import Plan
from autoprune.pruning import (
    GLOBAL,
    PruningContext,
    Structure,
    analyze,
    analyze_unstructured,
    apply_plan,
    kept_units,
)
from autoprune.pruning.recurrent import recurrent_macs
from autoprune.pruning.structured import apply_structured

pytestmark = [
    pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

ARCHS: dict[str, dict[str, int]] = {
    "resnet20": {"image_size": 8, "in_channels": 1},
    "mobilenetv2": {"image_size": 8},
    "vgg": {"image_size": 8},
    "mlp": {},
    "cnn1d": {"in_channels": 1, "seq_len": 40},
    "transformer": {"in_channels": 1, "seq_len": 40},
    "lstm": {"in_channels": 1, "seq_len": 40},
    "gru": {"in_channels": 1, "seq_len": 40},
}
KINDS = {"conv", "linear", "recurrent", "attention"}


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, **ARCHS[arch]).eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor] | nn.Module, b: dict[str, torch.Tensor] | nn.Module) -> bool:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.RNNBase):
        return int(module.hidden_size)
    raise AssertionError(f"unexpected group root {type(module).__name__}")


@dataclass
class Pruned:
    arch: str
    base: nn.Module
    before: dict[str, torch.Tensor]
    x: torch.Tensor
    ctx: PruningContext
    plan: Plan
    pruned: nn.Module


_ZOO: dict[str, Pruned] = {}


def _zoo(arch: str) -> Pruned:
    """The base model, its traced context and its uniform 0.5 / round_to=8 pruning (built once per module)."""
    if arch not in _ZOO:
        base = _model(arch)
        before = _snapshot(base)
        x = example_inputs(base, batch_size=2)
        ctx = PruningContext(base, x)
        plan = Plan.uniform(ctx.structure.names, 0.5, round_to=8)
        _ZOO[arch] = Pruned(arch, base, before, x, ctx, plan, ctx.apply(plan))
    return _ZOO[arch]


@pytest.fixture(scope="module", autouse=True)
def _forget_zoo() -> Iterator[None]:
    yield
    _ZOO.clear()


ALL = pytest.mark.parametrize("arch", list(ARCHS))


# ---------------------------------------------------------------------------------------------- structure


@ALL
def test_analyze_finds_groups(arch: str) -> None:
    zoo = _zoo(arch)
    s = zoo.ctx.structure
    assert isinstance(s, Structure)
    assert s.method == "structured"
    assert len(s.groups) >= 1
    assert len(set(s.names)) == len(s.names)
    assert [g.index for g in s.groups] == list(range(len(s.groups)))
    modules = dict(zoo.base.named_modules())
    for g in s.groups:
        assert g.kind in KINDS
        assert g.units >= 1 and g.unit_width >= 1
        assert g.name in g.members
        assert all(m in modules for m in g.members)
        assert g.macs > 0, f"group {g.name!r} of {arch} has no MACs"
        assert g.macs <= s.total_macs


def test_analyze_equals_the_context_structure() -> None:
    zoo = _zoo("mlp")
    s = analyze(zoo.base, zoo.x)
    assert s == zoo.ctx.structure
    assert s.total_macs == count_macs(zoo.base, zoo.x)[0]
    assert s.group("body.2").units == 128
    with pytest.raises(InvalidPlanError, match=r"'body\.9'"):
        s.group("body.9")


@ALL
def test_classifier_is_kept(arch: str) -> None:
    zoo = _zoo(arch)
    s = zoo.ctx.structure
    assert "classifier" in s.kept
    assert "classifier" not in s.names
    assert zoo.pruned.classifier.out_features == zoo.base.classifier.out_features == 10
    with pytest.raises(InvalidPlanError, match="classifier"):
        zoo.ctx.apply(Plan({"classifier": 0.5}))


@ALL
def test_uniform_half_shrinks_params_and_macs(arch: str) -> None:
    zoo = _zoo(arch)
    base_macs = zoo.ctx.structure.total_macs
    macs, _ = count_macs(zoo.pruned, zoo.x)
    assert _params(zoo.pruned) < _params(zoo.base)
    assert macs < base_macs
    # a 50% cut of every group removes a large share, not a token one
    assert _params(zoo.pruned) < 0.75 * _params(zoo.base)
    assert macs < 0.75 * base_macs


@ALL
def test_output_shape_unchanged(arch: str) -> None:
    zoo = _zoo(arch)
    with torch.no_grad():
        expected = zoo.base(zoo.x).shape
        got = zoo.pruned(zoo.x)
    assert got.shape == expected
    assert torch.isfinite(got).all()
    assert not zoo.pruned.training


@ALL
def test_base_model_unchanged(arch: str) -> None:
    zoo = _zoo(arch)
    assert _same_weights(zoo.base, zoo.before)
    assert zoo.ctx.base is zoo.base
    assert all(p.grad is None for p in zoo.base.parameters())


@ALL
def test_kept_widths_are_multiples_of_round_to(arch: str) -> None:
    zoo = _zoo(arch)
    modules = dict(zoo.pruned.named_modules())
    checked = 0
    for g in zoo.ctx.structure.groups:
        if g.kind == "attention" or g.units <= 8:
            continue
        width = _width(modules[g.name])
        assert width % 8 == 0, f"{arch}: group {g.name!r} kept {width} of {g.units}"
        assert width == kept_units(g.units, 0.5, 8)
        assert width < g.units
        checked += 1
    if arch != "transformer":
        assert checked == len(zoo.ctx.structure.groups)


@ALL
def test_apply_is_deterministic(arch: str) -> None:
    zoo = _zoo(arch)
    again = zoo.ctx.apply(zoo.plan)
    assert again is not zoo.pruned
    assert _same_weights(again, zoo.pruned)


@pytest.mark.parametrize("arch", ["mlp", "cnn1d", "transformer", "gru"])
def test_fresh_trace_gives_identical_weights(arch: str) -> None:
    zoo = _zoo(arch)
    fresh = apply_plan(zoo.base, zoo.plan, zoo.x)
    assert _same_weights(fresh, zoo.pruned)
    assert not fresh.training


@pytest.mark.parametrize("arch", ["mlp", "resnet20"])
def test_zero_plan_is_an_unpruned_copy(arch: str) -> None:
    zoo = _zoo(arch)
    copy_ = zoo.ctx.apply(Plan.uniform(zoo.ctx.structure.names, 0.0))
    assert copy_ is not zoo.base
    assert _same_weights(copy_, zoo.before)
    empty = apply_plan(zoo.base, Plan(), zoo.x)
    assert empty is not zoo.base
    assert _same_weights(empty, zoo.before)


# ---------------------------------------------------------------------------------------------- criteria


@pytest.fixture(scope="module")
def cnn_ctx() -> tuple[nn.Module, torch.Tensor, PruningContext]:
    """cnn1d (with BatchNorm) traced with calibration batches for the taylor criterion."""
    model = _model("cnn1d")
    x = example_inputs(model, batch_size=2)
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(8, 1, 40, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(2)]
    return model, x, PruningContext(model, x, calibration=calibration)


def test_every_criterion_name_has_an_importance() -> None:
    from autoprune.names import CRITERIA
    from autoprune.pruning.structured import IMPORTANCES

    assert tuple(IMPORTANCES) == CRITERIA  # the names the job spec, the CLI and the API accept are the registry's


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random", "taylor"])
def test_each_criterion_prunes(criterion: str, cnn_ctx: tuple[nn.Module, torch.Tensor, PruningContext]) -> None:
    model, x, ctx = cnn_ctx
    before = _snapshot(model)
    plan = Plan.uniform(ctx.structure.names, 0.5, criterion=criterion, round_to=8)
    pruned = ctx.apply(plan)
    assert [pruned.features[i].out_channels for i in (0, 3, 6)] == [16, 32, 64]
    assert _params(pruned) < _params(model)
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)
    assert _same_weights(model, before)
    assert all(p.grad is None for p in model.parameters())  # taylor's gradients are cleared
    assert _same_weights(ctx.apply(plan), pruned)


def test_criteria_choose_different_channels(cnn_ctx: tuple[nn.Module, torch.Tensor, PruningContext]) -> None:
    _, _, ctx = cnn_ctx
    names = ctx.structure.names
    pruned = {
        c: ctx.apply(Plan.uniform(names, 0.5, criterion=c, round_to=8)) for c in ("l1", "bn_scale", "random", "taylor")
    }
    assert not _same_weights(pruned["l1"], pruned["random"])
    assert not _same_weights(pruned["l1"], pruned["bn_scale"])
    assert not _same_weights(pruned["l1"], pruned["taylor"])


def test_l1_keeps_the_largest_channels() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 1.0, 6.0, 2.0, 5.0, 4.0])[:, None].repeat(1, 4))
        model[0].bias.zero_()
        model[2].weight.fill_(0.01)
    pruned = apply_plan(model, Plan({"0": 0.5}), torch.randn(2, 4))
    assert pruned[0].out_features == 3
    # rows 2, 4, 5 (values 6, 5, 4) have the largest magnitude; their order is kept
    assert torch.equal(pruned[0].weight[:, 0], torch.tensor([6.0, 5.0, 4.0]))
    assert torch.equal(pruned[2].weight, model[2].weight[:, [2, 4, 5]])


def test_random_criterion_depends_on_seed(cnn_ctx: tuple[nn.Module, torch.Tensor, PruningContext]) -> None:
    _, _, ctx = cnn_ctx
    names = ctx.structure.names
    a = ctx.apply(Plan.uniform(names, 0.5, criterion="random", seed=0, round_to=8))
    b = ctx.apply(Plan.uniform(names, 0.5, criterion="random", seed=1, round_to=8))
    a2 = ctx.apply(Plan.uniform(names, 0.5, criterion="random", seed=0, round_to=8))
    assert not _same_weights(a, b)
    assert _same_weights(a, a2)


def test_random_criterion_leaves_global_rng_alone(cnn_ctx: tuple[nn.Module, torch.Tensor, PruningContext]) -> None:
    _, _, ctx = cnn_ctx
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ctx.apply(Plan.uniform(ctx.structure.names, 0.5, criterion="random", seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_taylor_needs_calibration() -> None:
    zoo = _zoo("mlp")
    with pytest.raises(InvalidPlanError, match="calibration"):
        apply_plan(zoo.base, Plan({"body.0": 0.5}, criterion="taylor"), zoo.x)
    with pytest.raises(InvalidPlanError, match="at least one"):
        apply_plan(zoo.base, Plan({"body.0": 0.5}, criterion="taylor"), zoo.x, calibration=[])


def test_taylor_with_label_free_calibration() -> None:
    zoo = _zoo("mlp")
    batches = [(torch.randn(4, 1, 64), None)]
    pruned = apply_plan(zoo.base, Plan({"body.0": 0.5}, criterion="taylor"), zoo.x, calibration=batches)
    assert pruned.body[0].out_features == 128
    assert all(p.grad is None for p in zoo.base.parameters())


def test_bn_scale_without_batchnorm_is_a_pruning_error() -> None:
    zoo = _zoo("mlp")
    with pytest.raises(PruningError, match="bn_scale"):
        zoo.ctx.apply(Plan({"body.0": 0.5}, criterion="bn_scale"))


def test_pruning_context_apply_equals_apply_structured(
    cnn_ctx: tuple[nn.Module, torch.Tensor, PruningContext],
) -> None:
    model, x, ctx = cnn_ctx
    plan = Plan({"features.0": 0.25, "features.6": 0.6}, round_to=8, criterion="l2")
    assert _same_weights(ctx.apply(plan), apply_structured(model, plan, x))
    ops, heads = ctx.operations(plan)
    assert heads == {}
    assert {layer for layer, *_ in ops} >= {"features.0", "features.1", "features.3", "features.6", "classifier"}


# ----------------------------------------------------------------------------------- attention, recurrent


def test_attention_groups_remove_whole_heads() -> None:
    zoo = _zoo("transformer")
    first = zoo.ctx.structure.groups[0]
    assert first.kind == "attention"
    assert first.units == zoo.base.nhead == 4
    assert first.unit_width == 64 // 4
    pruned = zoo.ctx.apply(Plan({first.name: 0.5}))
    mhas = [m for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas) == 2
    for mha in mhas:
        assert mha.num_heads == 2
        assert mha.head_dim == 16
        assert mha.embed_dim == 32
        assert mha.in_proj_weight.shape == (3 * 32, 32)
    with torch.no_grad():
        out = pruned(zoo.x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # the uniform plan also halved the heads; the base keeps its own
    assert all(m.num_heads == 2 for m in zoo.pruned.modules() if isinstance(m, nn.MultiheadAttention))
    assert all(m.num_heads == 4 for m in zoo.base.modules() if isinstance(m, nn.MultiheadAttention))


def test_attention_heads_keep_their_dimensions_together() -> None:
    """The removed embedding channels are whole heads, and the kept q/k/v weights come over unchanged."""
    zoo = _zoo("transformer")
    plan = Plan({"input_proj": 0.5})
    ops, heads = zoo.ctx.operations(plan)
    assert set(heads.values()) == {2} and len(heads) == 2
    removed = {tuple(idxs) for layer, _, _, idxs in ops if layer == "input_proj"}
    assert len(removed) == 1
    dropped = list(removed.pop())
    assert len(dropped) == 32
    dropped_heads = sorted({i // 16 for i in dropped})
    assert dropped == [h * 16 + d for h in dropped_heads for d in range(16)]
    kept = [i for i in range(64) if i not in dropped]
    pruned = zoo.ctx.apply(plan)
    base_attn = zoo.base.encoder.layers[0].self_attn.in_proj_weight
    new_attn = pruned.encoder.layers[0].self_attn.in_proj_weight
    rows = [block * 64 + i for block in range(3) for i in kept]  # q, k and v blocks
    assert torch.equal(new_attn, base_attn[rows][:, kept])
    assert torch.equal(pruned.input_proj.weight, zoo.base.input_proj.weight[kept])


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_hidden_size_shrinks(arch: str) -> None:
    zoo = _zoo(arch)
    s = zoo.ctx.structure
    assert s.names == ("rnn",)
    assert s.groups[0].kind == "recurrent" and s.groups[0].units == 64
    assert zoo.pruned.rnn.hidden_size == 32
    assert zoo.pruned.classifier.in_features == 32
    assert zoo.base.rnn.hidden_size == 64
    pruned = zoo.ctx.apply(Plan({"rnn": 0.3}, round_to=8))
    assert pruned.rnn.hidden_size == 48
    with torch.no_grad():
        assert pruned(zoo.x).shape == (2, 10)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_macs_are_counted(arch: str) -> None:
    """The group's MACs include the recurrent matmuls (oneDNN's LSTM kernel has no flop formula of its own)."""
    zoo = _zoo(arch)
    s = zoo.ctx.structure
    expected = recurrent_macs(zoo.base.rnn, batch_size=2, seq_len=40)
    assert s.groups[0].macs >= expected
    assert s.total_macs >= expected
    assert count_macs(zoo.pruned, zoo.x)[0] >= recurrent_macs(zoo.pruned.rnn, batch_size=2, seq_len=40)


# ------------------------------------------------------------------------------------------ concatenation


class TwoBranchCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 24, 3, padding=1)
        self.fuse = nn.Conv2d(40, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.classifier(self.pool(F.relu(self.fuse(h))).flatten(1))


def _kept_rows(pruned: torch.Tensor, base: torch.Tensor) -> list[int]:
    rows = []
    for row in pruned:
        matches = [i for i in range(base.shape[0]) if torch.equal(row, base[i])]
        assert len(matches) == 1
        rows.append(matches[0])
    return rows


def test_concat_branches_pruned_with_different_ratios() -> None:
    torch.manual_seed(0)
    model = TwoBranchCat().eval()
    before = _snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    ctx = PruningContext(model, x)
    assert ctx.structure.names[:2] == ("a", "b")
    assert set(ctx.structure.group("a").members) >= {"a", "fuse"}
    plan = Plan({"a": 0.5, "b": 0.25})
    pruned = ctx.apply(plan)
    assert pruned.a.out_channels == 8 and pruned.b.out_channels == 18
    assert pruned.fuse.in_channels == 26 and pruned.fuse.out_channels == 32
    with torch.no_grad():
        assert pruned(x).shape == (2, 5)
    # fuse keeps exactly the input columns of the kept channels, at the right concatenation offsets
    kept_a = _kept_rows(pruned.a.weight, model.a.weight)
    kept_b = _kept_rows(pruned.b.weight, model.b.weight)
    columns = kept_a + [16 + i for i in kept_b]
    assert torch.equal(pruned.fuse.weight, model.fuse.weight[:, columns])
    # same result as pruning group by group: first a, then b on the already pruned model
    step1 = apply_plan(model, Plan({"a": 0.5}), x)
    step2 = apply_plan(step1, Plan({"b": 0.25}), x)
    assert _same_weights(step2, pruned)
    # and in the other order
    other = apply_plan(apply_plan(model, Plan({"b": 0.25}), x), Plan({"a": 0.5}), x)
    assert _same_weights(other, pruned)
    assert _same_weights(model, before)


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("arch", ["resnet20", "mlp"])
def test_unknown_group_is_an_invalid_plan(arch: str) -> None:
    zoo = _zoo(arch)
    name = zoo.ctx.structure.names[-1]
    bad = name + "x"
    with pytest.raises(InvalidPlanError, match=f"'{re.escape(bad)}' \\(did you mean '{re.escape(name)}'\\?\\)"):
        zoo.ctx.apply(Plan({bad: 0.5, name: 0.5}))
    with pytest.raises(InvalidPlanError, match=r"'no\.such\.layer'"):
        zoo.ctx.apply(Plan({"no.such.layer": 0.5}))
    assert _same_weights(zoo.base, zoo.before)


def test_unknown_group_through_apply_plan() -> None:
    torch.manual_seed(0)
    model = TwoBranchCat().eval()
    with pytest.raises(InvalidPlanError, match="'c'"):
        apply_plan(model, Plan({"a": 0.5, "c": 0.5}), torch.randn(1, 3, 8, 8))


class HardcodedView(nn.Module):
    """Its forward hardcodes the conv's channel count: pruning that conv must break it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.classifier = nn.Linear(16 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return self.classifier(h.view(h.shape[0], 16 * 64))


class ZeroPadShortcut(nn.Module):
    """ResNet option-A shortcut: subsample and zero-pad channels instead of a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        return self.classifier(F.relu(self.c2(h) + shortcut).mean((2, 3)))


def test_a_group_whose_pruning_breaks_the_forward_is_locked_with_its_reason() -> None:
    torch.manual_seed(0)
    model = HardcodedView().eval()
    x = torch.randn(2, 3, 8, 8)
    structure = analyze(model, x)
    assert structure.names == ()
    assert [name for name, _ in structure.locked] == ["conv"]
    assert "no longer runs" in structure.locked[0][1] and "invalid for input" in structure.locked[0][1]
    assert "cannot be pruned without breaking its forward" in structure.no_groups_message()
    with pytest.raises(PruningError, match="group 'conv' cannot be pruned: the pruned model no longer runs"):
        apply_plan(model, Plan({"conv": 0.5}), x)
    # naming a locked group with ratio 0 is harmless
    assert apply_plan(model, Plan({"conv": 0.0}), x)(x).shape == (2, 5)


class LiteralHeadSize(nn.Module):
    """Attention written by hand with a literal head size: q/k/v widths that are multiples of 16 run, others do
    not, and halving 64 -> 32 (the lock probe's first trial) happens to be one of the widths that run."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = (m(x).view(b, length, -1, 16).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = (torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v).transpose(1, 2).reshape(b, length, -1)
        return self.head(self.o(out).mean(1))


def test_the_probe_learns_a_width_step_and_plans_only_apply_widths_that_run() -> None:
    torch.manual_seed(0)
    model, x = LiteralHeadSize().eval(), torch.randn(2, 5, 64)
    structure = analyze(model, x)
    steps = {g.name: g.step for g in structure.groups}
    assert steps == {"q": 16, "o": 1} and structure.locked == ()
    for ratio, width in ((0.1, 64), (0.2, 48), (0.3, 48), (0.5, 32), (0.8, 16), (0.95, 16)):
        pruned = apply_plan(model, Plan({"q": ratio, "o": 0.3}), x)
        assert (pruned.q.out_features, pruned.v.out_features) == (width, width)
        assert pruned.o.out_features == 45  # the unconstrained group keeps any width
        assert pruned(x).shape == (2, 3)


@pytest.mark.parametrize("criterion", ["l1", "l2", "random"])
def test_zero_pad_shortcut_group_is_locked(criterion: str) -> None:
    # Torch-Pruning mis-traces the zero-padded shortcut: which channels go decides whether the forward survives,
    # so the group is locked rather than left to fail some plans and not others
    torch.manual_seed(0)
    model = ZeroPadShortcut().eval()
    before = _snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    structure = analyze(model, x)
    assert structure.names == () and [name for name, _ in structure.locked] == ["c1"]
    with pytest.raises(PruningError, match="'c1' cannot be pruned"):
        apply_plan(model, Plan({"c1": 0.5}, criterion=criterion), x)
    assert _same_weights(model, before)


class ChannelSlices(nn.Module):
    """Literal channel slices: the first conv's channels are split by index in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        z = torch.cat([self.a(y[:, :16]), self.b(y[:, 16:])], 1)
        return self.head(z.mean((2, 3)))


def test_literal_channel_slices_lock_only_the_sliced_group() -> None:
    torch.manual_seed(0)
    model = ChannelSlices().eval()
    x = torch.randn(1, 3, 8, 8)
    structure = analyze(model, x)
    assert structure.names == ("a", "b")
    assert [name for name, _ in structure.locked] == ["c1"]
    pruned = apply_plan(model, Plan({"a": 0.5, "b": 0.25}), x)
    assert pruned.get_submodule("a").out_channels == 4 and pruned.get_submodule("b").out_channels == 6
    assert pruned.get_submodule("c1").out_channels == 32
    assert pruned(x).shape == (1, 4)


# -------------------------------------------------------------------------------------------- unstructured


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, torch.Tensor]:
    model = _model("cnn1d")
    return model, example_inputs(model, batch_size=2)


def _zero_fraction(model: nn.Module, names: list[str] | tuple[str, ...]) -> float:
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in names)
    return zeros / sum(modules[n].weight.numel() for n in names)


def _assert_clean(model: nn.Module) -> None:
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith(("weight_orig", "weight_mask"))]
    for m in model.modules():
        assert not m._forward_pre_hooks
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
        if isinstance(m, nn.Conv1d | nn.Linear):
            assert isinstance(m.weight, nn.Parameter)


def test_unstructured_structure(cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = cnn
    s = analyze_unstructured(model, x)
    assert s.method == "unstructured"
    assert s.names == ("features.0", "features.3", "features.6")
    assert s.kept == ("classifier",)
    assert [g.units for g in s.groups] == [
        m.weight.numel() for m in (model.features[0], model.features[3], model.features[6])
    ]


def test_unstructured_per_layer_sparsity(cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = cnn
    before = _snapshot(model)
    plan = Plan({"features.0": 0.3, "features.6": 0.8}, method="unstructured")
    sparse = apply_plan(model, plan, x)
    assert _zero_fraction(sparse, ["features.0"]) == pytest.approx(0.3, abs=1 / 160)
    assert _zero_fraction(sparse, ["features.6"]) == pytest.approx(0.8, abs=1e-4)
    assert _zero_fraction(sparse, ["features.3", "classifier"]) == 0.0
    # l1: every zeroed weight was no larger than every kept one
    base_w, new_w = model.features[6].weight, sparse.features[6].weight
    assert base_w[new_w == 0].abs().max() <= base_w[new_w != 0].abs().min()
    assert torch.equal(new_w[new_w != 0], base_w[new_w != 0])
    _assert_clean(sparse)
    assert _same_weights(model, before)
    assert all(sparse.state_dict()[k].shape == v.shape for k, v in before.items())
    with torch.no_grad():
        assert sparse(x).shape == (2, 10)
    assert _same_weights(apply_plan(model, plan, x), sparse)


def test_unstructured_global_sparsity(cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = cnn
    sparse = apply_plan(model, Plan({GLOBAL: 0.6}, method="unstructured"), x)
    layers = ["features.0", "features.3", "features.6"]
    assert _zero_fraction(sparse, layers) == pytest.approx(0.6, abs=1e-4)
    assert _zero_fraction(sparse, ["classifier"]) == 0.0
    _assert_clean(sparse)


def test_unstructured_random_is_seeded(cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = cnn
    a = apply_plan(model, Plan({GLOBAL: 0.5}, method="unstructured", criterion="random", seed=1), x)
    b = apply_plan(model, Plan({GLOBAL: 0.5}, method="unstructured", criterion="random", seed=2), x)
    a2 = apply_plan(model, Plan({GLOBAL: 0.5}, method="unstructured", criterion="random", seed=1), x)
    assert _same_weights(a, a2)
    assert not _same_weights(a, b)
    assert _zero_fraction(a, ["features.0", "features.3", "features.6"]) == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("criterion", ["taylor", "bn_scale"])
def test_unstructured_refuses_structured_criteria(criterion: str, cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = cnn
    with pytest.raises(InvalidPlanError, match=criterion):
        apply_plan(model, Plan({GLOBAL: 0.5}, method="unstructured", criterion=criterion), x)


def test_unstructured_refuses_unknown_or_mixed_layers(cnn: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = cnn
    with pytest.raises(InvalidPlanError, match="'classifier'"):
        apply_plan(model, Plan({"classifier": 0.5}, method="unstructured"), x)
    with pytest.raises(InvalidPlanError, match="cannot also name layers"):
        apply_plan(model, Plan({GLOBAL: 0.5, "features.0": 0.1}, method="unstructured"), x)


def test_clone_module_is_a_real_deep_copy() -> None:
    import torch
    from torch import nn

    from autoprune.pruning.structured import _plainly_copyable, clone_module

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(
        nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(32, 4), nn.Linear(4, 4), lin
    )
    model[5].weight = lin.weight  # tied
    calls: list[int] = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert _plainly_copyable(model)
    clone = clone_module(model)
    x = torch.randn(2, 1, 10)
    assert torch.equal(model.eval()(x), clone.eval()(x))
    assert clone[5].weight is clone[6].weight and clone[5].weight is not lin.weight
    assert isinstance(clone[5].weight, nn.Parameter) and clone[5].weight.requires_grad
    with torch.no_grad():
        clone[0].weight.zero_()
    clone[1].running_mean.add_(1.0)
    assert model[0].weight.abs().sum() > 0 and torch.equal(model[1].running_mean, torch.zeros(4))
    clone._forward_hooks.clear()
    assert len(model._forward_hooks) == 1  # hook dicts are copied, not shared
    clone[0].out_channels = 2
    assert model[0].out_channels == 4
    # RNNs keep flat-weight lists: they go through copy.deepcopy
    assert not _plainly_copyable(nn.Sequential(nn.LSTM(4, 4)))
    rnn = nn.LSTM(4, 4)
    assert clone_module(rnn).weight_hh_l0 is not rnn.weight_hh_l0


def test_a_group_that_cannot_be_scored_only_fails_plans_that_prune_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.plan import Plan
    from autoprune.pruning import structured
    from autoprune.pruning.structured import PruningContext

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    ctx = PruningContext(model, torch.randn(1, 8))
    first, second = ctx.structure.names[:2]
    real = structured.IMPORTANCES["l1"]

    def flaky() -> object:
        inner = real.make()

        def score(group: object) -> object:
            if group[0].dep.target.module is model[0]:  # type: ignore[index]
                raise IndexError("mis-traced coupling")
            return inner(group)

        return score

    monkeypatch.setitem(structured.IMPORTANCES, "l1", structured.Criterion(flaky))  # type: ignore[arg-type]
    pruned = ctx.apply(Plan(ratios={second: 0.5}))
    assert pruned(torch.randn(2, 8)).shape == (2, 4)
    with pytest.raises(PruningError, match=rf"cannot score group '{re.escape(first)}'.*mis-traced"):
        ctx.apply(Plan(ratios={first: 0.5}))
