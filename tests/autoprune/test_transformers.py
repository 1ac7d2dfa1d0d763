"""HuggingFace BERT-style models pruned by whole attention heads and FFN units (real Torch-Pruning, tiny models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from autoprune.cost import count_macs  # noqa: E402
from autoprune.errors import InvalidPlanError  # noqa: E402
from autoprune.export import load_pretrained_pruned, load_pruned, save_pruned  # noqa: E402
from autoprune.plan import Plan  # noqa: E402
from autoprune.pruning import PruningContext, analyze, apply_plan  # noqa: E402
from autoprune.pruning.heads import LAYOUT_KEY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 16, 128, 2


def _config() -> transformers.BertConfig:
    return transformers.BertConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        vocab_size=100,
    )


def _bert(cls: type = transformers.BertModel, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(_config()).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _attention(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, torch.Tensor, PruningContext]:
    model, x = _bert(), _ids()
    return model, x, PruningContext(model, x)


@pytest.fixture(scope="module")
def classifier() -> tuple[nn.Module, torch.Tensor, PruningContext]:
    model, x = _bert(transformers.BertForSequenceClassification), _ids()
    return model, x, PruningContext(model, x)


def test_groups_are_heads_and_ffn_units_and_the_hidden_size_is_kept(
    bert: tuple[nn.Module, torch.Tensor, PruningContext],
) -> None:
    _, _, ctx = bert
    structure = ctx.structure
    attention = [g for g in structure.groups if g.kind == "attention"]
    ffn = [g for g in structure.groups if g.name.endswith("intermediate.dense")]
    assert [g.name for g in attention] == [f"encoder.layer.{i}.attention.self.query" for i in range(LAYERS)]
    for g in attention:
        assert (g.units, g.unit_width) == (HEADS, HEAD_DIM)
        prefix = g.name.rsplit(".", 2)[0]
        assert set(g.members) == {f"{prefix}.self.{p}" for p in ("query", "key", "value")} | {f"{prefix}.output.dense"}
    assert [g.name for g in ffn] == [f"encoder.layer.{i}.intermediate.dense" for i in range(LAYERS)]
    assert all(g.kind == "linear" and g.units == FFN for g in ffn)
    assert len(structure.groups) == 2 * LAYERS  # nothing else: the residual (hidden-size) group is kept
    assert "encoder.layer.0.attention.output.dense" in structure.kept
    assert not any("embeddings" in m for g in structure.groups for m in g.members)
    assert structure.locked == ()
    assert analyze(*bert[:2]).names == structure.names


@pytest.mark.parametrize("fixture", ["bert", "classifier"])
def test_half_plan_keeps_two_heads_and_half_the_ffn(fixture: str, request: pytest.FixtureRequest) -> None:
    model, x, ctx = request.getfixturevalue(fixture)
    pruned = ctx.apply(Plan.uniform(ctx.structure.names, 0.5, round_to=8))
    assert _out(pruned, x).shape == _out(model, x).shape
    for attn in _attention(pruned):
        assert attn.num_attention_heads == 2
        assert attn.attention_head_size == HEAD_DIM
        assert attn.num_attention_heads * attn.attention_head_size == attn.all_head_size == attn.query.out_features
        assert attn.key.out_features == attn.value.out_features == attn.all_head_size
        assert attn.query.in_features == HIDDEN
    for i in range(LAYERS):
        layer = pruned.get_submodule(f"{'bert.' if fixture == 'classifier' else ''}encoder.layer.{i}")
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == FFN // 2
        assert layer.output.dense.out_features == HIDDEN
        assert layer.attention.output.dense.in_features == 2 * HEAD_DIM
    embeddings = pruned.get_submodule(f"{'bert.' if fixture == 'classifier' else ''}embeddings")
    assert embeddings.word_embeddings.embedding_dim == HIDDEN
    # the base model is untouched and its config still says 4 heads
    assert all(a.num_attention_heads == HEADS and a.query.out_features == HIDDEN for a in _attention(model))
    assert model.config.num_attention_heads == HEADS and not hasattr(model.config, LAYOUT_KEY)


def test_heads_go_whole_with_their_query_key_and_value_rows(
    bert: tuple[nn.Module, torch.Tensor, PruningContext],
) -> None:
    model, _, ctx = bert
    name = "encoder.layer.1.attention.self.query"
    pruned = ctx.apply(Plan({name: 0.5}))
    base, new = model.encoder.layer[1].attention, pruned.encoder.layer[1].attention
    rows = [r for r in range(HIDDEN) if any(torch.equal(base.self.query.weight[r], w) for w in new.self.query.weight)]
    heads = sorted({r // HEAD_DIM for r in rows})
    assert len(heads) == 2 and rows == [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]
    for proj in ("query", "key", "value"):
        assert torch.equal(getattr(new.self, proj).weight, getattr(base.self, proj).weight[rows])
    assert torch.equal(new.output.dense.weight, base.output.dense.weight[:, rows])
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == HEADS  # only the named layer lost heads


def test_channel_counts_off_the_head_grid_still_remove_whole_heads(
    bert: tuple[nn.Module, torch.Tensor, PruningContext],
) -> None:
    """0.3 of 4 heads (not of 64 channels): one head goes, never 19 channels that break the head view."""
    model, x, ctx = bert
    pruned = ctx.apply(
        Plan({"encoder.layer.0.attention.self.query": 0.3, "encoder.layer.1.attention.self.query": 0.75})
    )
    assert [a.num_attention_heads for a in _attention(pruned)] == [3, 1]
    assert [a.query.out_features for a in _attention(pruned)] == [3 * HEAD_DIM, HEAD_DIM]
    assert _out(pruned, x).shape == _out(model, x).shape


def test_zero_plan_gives_identical_outputs(bert: tuple[nn.Module, torch.Tensor, PruningContext]) -> None:
    model, x, ctx = bert
    same = ctx.apply(Plan.uniform(ctx.structure.names, 0.0))
    assert same is not model
    torch.testing.assert_close(_out(same, x), _out(model, x), rtol=0, atol=0)
    torch.testing.assert_close(_out(apply_plan(model, Plan(), x), x), _out(model, x), rtol=0, atol=0)


def test_macs_and_params_drop(classifier: tuple[nn.Module, torch.Tensor, PruningContext]) -> None:
    model, x, ctx = classifier
    pruned = ctx.apply(Plan.uniform(ctx.structure.names, 0.5, round_to=8))
    assert count_macs(pruned, x)[0] < count_macs(model, x)[0]
    assert _params(pruned) < _params(model)
    assert count_macs(model, x)[0] == ctx.structure.total_macs


def test_save_pruned_then_load_pruned_reproduces_outputs(
    classifier: tuple[nn.Module, torch.Tensor, PruningContext], tmp_path: Path
) -> None:
    _, x, ctx = classifier
    plan = Plan.uniform(ctx.structure.names, 0.5, round_to=8)
    pruned = ctx.apply(plan)
    with torch.no_grad():  # weights that differ from the base's (as after fine-tuning) must come back
        for p in pruned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    files = save_pruned(pruned, plan, tmp_path)
    fresh = _bert(transformers.BertForSequenceClassification)  # the same base, rebuilt
    loaded = load_pruned(fresh, x, files["plan"], files["safetensors"])
    torch.testing.assert_close(_out(loaded, x), _out(pruned, x))


def test_save_pretrained_then_load_pretrained_pruned_reproduces_outputs(
    classifier: tuple[nn.Module, torch.Tensor, PruningContext], tmp_path: Path
) -> None:
    _, x, ctx = classifier
    ratios = {n: 0.5 for n in ctx.structure.names} | {"bert.encoder.layer.1.attention.self.query": 0.25}
    pruned = ctx.apply(Plan(ratios, round_to=8))
    layout = getattr(pruned.config, LAYOUT_KEY)
    assert layout["heads"] == {"bert.encoder.layer.0.attention.self": 2, "bert.encoder.layer.1.attention.self": 3}
    assert layout["linear"]["bert.encoder.layer.0.intermediate.dense"] == [HIDDEN, FFN // 2]
    assert layout["plan"]["ratios"] == ratios
    pruned.save_pretrained(tmp_path)
    loaded = load_pretrained_pruned(transformers.BertForSequenceClassification, tmp_path)
    assert [a.num_attention_heads for a in _attention(loaded)] == [2, 3]
    assert [a.all_head_size for a in _attention(loaded)] == [2 * HEAD_DIM, 3 * HEAD_DIM]
    torch.testing.assert_close(_out(loaded, x), _out(pruned, x))
    # from_pretrained alone builds the config's (unpruned) shapes, which the pruned weights do not fit
    with pytest.raises(RuntimeError, match="mismatched"):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path)


def test_prune_hidden_offers_the_residual_group(classifier: tuple[nn.Module, torch.Tensor, PruningContext]) -> None:
    model, x, ctx = classifier
    wide = PruningContext(model, x, prune_hidden=True)
    hidden = "bert.encoder.layer.0.attention.output.dense"
    assert hidden in wide.structure.names and hidden not in ctx.structure.names
    with pytest.raises(InvalidPlanError, match="does not have"):
        ctx.apply(Plan({hidden: 0.5}))  # not offered by default
    pruned = wide.apply(Plan({hidden: 0.5}))
    assert pruned.bert.embeddings.word_embeddings.embedding_dim == HIDDEN // 2
    assert all(a.num_attention_heads == HEADS and a.query.in_features == HIDDEN // 2 for a in _attention(pruned))
    assert _out(pruned, x).shape == _out(model, x).shape


def test_distilbert_heads_are_pruned_whole() -> None:
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(dim=HIDDEN, n_heads=HEADS, hidden_dim=FFN, n_layers=LAYERS, vocab_size=100)
    model, x = transformers.DistilBertModel(config).eval(), _ids()
    ctx = PruningContext(model, x)
    assert [(g.kind, g.units) for g in ctx.structure.groups] == [("attention", HEADS), ("linear", FFN)] * LAYERS
    pruned = ctx.apply(Plan.uniform(ctx.structure.names, 0.5))
    for layer in pruned.transformer.layer:
        assert layer.attention.n_heads == 2 and layer.attention.q_lin.out_features == 2 * HEAD_DIM
    assert _out(pruned, x).shape == (2, 12, HIDDEN)


def test_torch_transformer_encoder_keeps_losing_whole_heads() -> None:
    """nn.TransformerEncoder (batch_first) goes through the nn.MultiheadAttention path, unchanged."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 32)
            layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.proj(x)).mean(dim=1))

    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 5, 8)
    ctx = PruningContext(model, x)
    kinds = {g.kind for g in ctx.structure.groups}
    assert "attention" in kinds and ctx.structure.locked == ()
    attention = next(g for g in ctx.structure.groups if g.kind == "attention")
    assert (attention.units, attention.unit_width) == (4, 8)
    pruned = ctx.apply(Plan.uniform(ctx.structure.names, 0.5))
    for mha in (m for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)):
        assert mha.num_heads == 2 and mha.head_dim == 8 and mha.embed_dim == 16
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 3)
