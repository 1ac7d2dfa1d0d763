from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.data import Dataset, load_dataset
from autoprune.errors import DatasetError, InvalidConfigError
from autoprune.quality import Accuracy, KLFidelity
from autoprune.recovery import RecoveryConfig, finetune, recalibrate_batchnorm, recover


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def _conv_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8 * 64, 10),
    )


@pytest.fixture(scope="module")
def trained(digits: Dataset) -> nn.Sequential:
    model = _conv_bn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for x, y in digits.train_batches(64, seed=0, max_batches=60, drop_last=True):
        opt.zero_grad()
        assert y is not None
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _train_loss(model: nn.Module, ds: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(ds.x_train), ds.y_train))  # type: ignore[arg-type]


def test_config_is_frozen_and_validated() -> None:
    cfg = RecoveryConfig()
    assert (cfg.bn_recalibration_batches, cfg.finetune_steps, cfg.distill) == (8, 0, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    for bad in ({"finetune_steps": -1}, {"finetune_lr": 0.0}, {"batch_size": 0}, {"distill_alpha": 1.5}):
        with pytest.raises(InvalidConfigError):
            RecoveryConfig(**bad)  # type: ignore[arg-type]


def test_recalibration_repairs_corrupted_batchnorm(trained: nn.Sequential, digits: Dataset) -> None:
    good = Accuracy()(trained, digits)
    assert good > 0.85
    model = copy.deepcopy(trained)
    for bn in (model[1], model[4]):
        bn.running_var.fill_(100.0)  # type: ignore[operator]
        bn.running_mean.fill_(3.0)  # type: ignore[operator]
    broken = Accuracy()(model, digits)
    assert broken < good - 0.3
    model.train()
    model[7].eval()
    recalibrate_batchnorm(model, digits.train_batches(64, seed=0, max_batches=8))
    repaired = Accuracy()(model, digits)
    assert repaired > broken + 0.3 and repaired > good - 0.05
    # momentum and every module's mode are restored; the stats are real estimates
    assert model[1].momentum == 0.1 and model[4].momentum == 0.1
    assert model.training and model[1].training and not model[7].training
    assert float(model[1].running_var.max()) < 100.0  # type: ignore[union-attr, operator]
    assert int(model[1].num_batches_tracked) == 8  # type: ignore[arg-type]


def test_recalibration_without_batchnorm_or_batches_is_a_no_op(trained: nn.Sequential) -> None:
    def exploding() -> Iterator[torch.Tensor]:
        raise AssertionError("batches must not be consumed for a model without BatchNorm")
        yield torch.zeros(1)

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert recalibrate_batchnorm(mlp, exploding()) is mlp
    model = copy.deepcopy(trained)
    before = model[1].running_var.clone()  # type: ignore[operator]
    recalibrate_batchnorm(model, [])
    assert torch.equal(model[1].running_var, before)  # type: ignore[arg-type]


def test_finetune_lowers_training_loss(digits: Dataset) -> None:
    model = _conv_bn(seed=1)
    before = _train_loss(model, digits)
    out = finetune(model, digits, RecoveryConfig(finetune_steps=25, finetune_lr=5e-3, batch_size=64))
    assert out is model and not model.training
    assert _train_loss(model, digits) < 0.5 * before


def test_label_free_finetune_distils_from_the_teacher(trained: nn.Sequential, digits: Dataset) -> None:
    unlabelled = Dataset("digits-x", digits.x_train, None, digits.x_val, None)
    student = _conv_bn(seed=2)
    kl = KLFidelity()
    before = kl(student, unlabelled, reference=trained)
    trained.train()
    finetune(student, unlabelled, RecoveryConfig(finetune_steps=25, finetune_lr=5e-3), teacher=trained)
    assert trained.training  # teacher mode restored
    trained.eval()
    assert kl(student, unlabelled, reference=trained) > before + 0.2
    with pytest.raises(DatasetError, match="teacher"):
        finetune(_conv_bn(), unlabelled, RecoveryConfig(finetune_steps=1))
    with pytest.raises(InvalidConfigError, match="teacher"):
        finetune(_conv_bn(), digits, RecoveryConfig(finetune_steps=1, distill=True))


def test_recover_is_deterministic_and_leaves_global_rng_alone(trained: nn.Sequential, digits: Dataset) -> None:
    cfg = RecoveryConfig(bn_recalibration_batches=4, finetune_steps=8, distill=True, seed=3)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    a = recover(copy.deepcopy(trained), digits, cfg, teacher=trained)
    assert torch.equal(torch.rand(3), expected)
    b = recover(copy.deepcopy(trained), digits, cfg, teacher=trained)
    c = recover(copy.deepcopy(trained), digits, dataclasses.replace(cfg, seed=4), teacher=trained)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


def test_recover_with_defaults_only_recalibrates(trained: nn.Sequential, digits: Dataset) -> None:
    model = copy.deepcopy(trained)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    recover(model, digits)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # no training happened
    assert not torch.equal(state["1.running_mean"], trained.state_dict()["1.running_mean"])
