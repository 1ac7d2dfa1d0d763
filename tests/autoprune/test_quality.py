from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autoprune.data import Dataset, load_dataset
from autoprune.errors import AutopruneError, DatasetError, InvalidConfigError, ShapeMismatchError
from autoprune.quality import (
    Accuracy,
    Agreement,
    CallableMetric,
    CosineFidelity,
    KLFidelity,
    QualityMetric,
    ReferenceOutputs,
    get_metric,
    metric_names,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits").subset(300, 200, seed=0)


class Lookup(nn.Module):
    """A 'perfect' classifier: returns the one-hot of the label stored for each known input."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.keys: torch.Tensor
        self.onehot: torch.Tensor
        self.register_buffer("keys", x.flatten(1))
        self.register_buffer("onehot", nn.functional.one_hot(y, classes).float() * 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.cdist(x.flatten(1), self.keys).argmin(dim=1)
        return self.onehot[idx]


class Counting(nn.Module):
    def __init__(self, inner: nn.Sequential) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))


def _perturbed(model: nn.Module, scale: float) -> nn.Module:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return other


def test_accuracy_of_a_perfect_model_is_one_and_of_a_shifted_one_is_zero(digits: Dataset) -> None:
    assert digits.y_val is not None
    perfect = Lookup(digits.x_val, digits.y_val, 10)
    assert Accuracy()(perfect, digits, batch_size=64) == 1.0
    wrong = Lookup(digits.x_val, (digits.y_val + 1) % 10, 10)
    assert Accuracy()(wrong, digits) == 0.0


def test_accuracy_needs_labels_and_logits(digits: Dataset) -> None:
    unlabelled = Dataset("feats", digits.x_train, None, digits.x_val, None)
    with pytest.raises(DatasetError, match=r"has none"):
        Accuracy()(_mlp(), unlabelled)
    with pytest.raises(ShapeMismatchError):
        Accuracy()(nn.Identity(), digits)


def test_fidelity_of_a_model_with_itself_is_one(digits: Dataset) -> None:
    model = _mlp()
    for metric in (Agreement(), KLFidelity(), KLFidelity(temperature=4.0), CosineFidelity()):
        assert metric(model, digits, reference=model) == pytest.approx(1.0, abs=1e-12), metric


def test_fidelity_drops_for_a_perturbed_copy(digits: Dataset) -> None:
    ref = _mlp()
    slightly, strongly = _perturbed(ref, 0.3), _perturbed(ref, 3.0)
    for metric in (Agreement(), KLFidelity(), CosineFidelity()):
        hi = metric(slightly, digits, reference=ref)
        lo = metric(strongly, digits, reference=ref)
        assert 0.0 <= lo < hi < 1.0, (metric, lo, hi)


def test_cosine_is_mapped_to_unit_interval_and_works_on_feature_maps(digits: Dataset) -> None:
    conv = nn.Conv2d(1, 3, 3)
    neg = copy.deepcopy(conv)
    with torch.no_grad():
        neg.weight.neg_()
        neg.bias.neg_()  # type: ignore[union-attr]
    assert CosineFidelity()(neg, digits, reference=conv) == pytest.approx(0.0, abs=1e-9)
    assert CosineFidelity()(conv, digits, reference=conv) == pytest.approx(1.0)


def test_metrics_restore_modes_and_need_a_reference(digits: Dataset) -> None:
    model = _mlp().train()
    model[3].eval()  # mixed modes survive
    Agreement()(model, digits, reference=model)
    assert model.training and model[1].training and not model[3].training
    with pytest.raises(InvalidConfigError, match="reference"):
        KLFidelity()(model, digits)


def test_reference_outputs_are_cached_and_invalidated_by_weight_changes(digits: Dataset) -> None:
    cache = ReferenceOutputs()
    ref = Counting(_mlp())
    metric = Agreement(cache=cache)
    batches = -(-digits.num_val // 50)
    for _ in range(5):
        metric(_perturbed(ref, 0.1), digits, reference=ref, batch_size=50)
    assert ref.calls == batches  # computed once for five candidates
    with torch.no_grad():
        ref.inner[1].weight.mul_(2.0)  # type: ignore[index, operator]  # in-place change of the reference
    metric(ref, digits, reference=ref, batch_size=50)
    assert ref.calls == 3 * batches  # recomputed (plus the candidate's own forward)
    other = digits.subset(50, 20, seed=1)
    metric(_perturbed(ref, 0.1), other, reference=ref, batch_size=50)
    assert ref.calls == 3 * batches + 1  # new dataset, new entry


def test_non_finite_outputs_score_lowest(digits: Dataset) -> None:
    ref = _mlp()
    broken = copy.deepcopy(ref)
    with torch.no_grad():
        broken[4].bias.fill_(float("nan"))  # type: ignore[operator]
    assert Accuracy()(broken, digits) == 0.0
    assert Agreement()(broken, digits, reference=ref) == 0.0
    assert KLFidelity()(broken, digits, reference=ref) == 0.0
    assert CosineFidelity()(broken, digits, reference=ref) == 0.0


def test_callable_metric(digits: Dataset) -> None:
    seen: list[bool] = []

    def params_left(model: nn.Module) -> float:
        seen.append(model.training)
        return -sum(p.numel() for p in model.parameters())

    metric = CallableMetric(params_left, name="small")
    model = _mlp().train()
    assert isinstance(metric, QualityMetric)
    assert metric.name == "small"
    assert metric(model, digits) == -(64 * 32 + 32 + 32 * 10 + 10)
    assert seen == [False] and model.training
    with pytest.raises(InvalidConfigError, match="not a number"):
        CallableMetric(lambda m: "high", name="bad")(model, digits)  # type: ignore[arg-type, return-value]


def test_get_metric_by_name() -> None:
    assert metric_names() == ["accuracy", "agreement", "kl", "cosine"]
    assert isinstance(get_metric("Accuracy"), Accuracy)
    kl = get_metric("kl", temperature=2.0)
    assert isinstance(kl, KLFidelity) and kl.temperature == 2.0 and kl.name == "kl"
    assert {get_metric(n).name for n in metric_names()} == set(metric_names())
    with pytest.raises(InvalidConfigError, match="unknown quality metric 'top5'") as info:
        get_metric("top5")
    assert isinstance(info.value, AutopruneError) and isinstance(info.value, ValueError)
    with pytest.raises(InvalidConfigError):
        get_metric("kl", temperature=0.0)
