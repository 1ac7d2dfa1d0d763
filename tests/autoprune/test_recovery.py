from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

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


def test_a_users_train_step_is_the_loss_the_recipe_trains(digits: Dataset) -> None:
    seen: list[tuple[tuple[int, ...], bool]] = []

    def label_smoothed(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        x, y = batch
        assert y is not None
        seen.append((tuple(x.shape), model.training))
        return F.cross_entropy(model(x), y, label_smoothing=0.1)

    model = _conv_bn(seed=1)
    before = _train_loss(model, digits)
    recipe = RecoveryConfig(finetune_steps=25, finetune_lr=5e-3, batch_size=32, early_stopping_patience=3, eval_every=5)
    finetune(model, digits, recipe, train_step=label_smoothed)
    assert _train_loss(model, digits) < 0.5 * before
    training = [shape for shape, mode in seen if mode]
    assert len(training) == 25 and all(shape[0] == 32 for shape in training)
    assert any(not mode for _, mode in seen)  # early stopping scored the same loss on the validation split, in eval
    # label-free data needs no teacher when the loss is the user's own
    unlabelled = Dataset("digits-x", digits.x_train, None, digits.x_val, None)
    calls: list[bool] = []

    def sparsity_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        calls.append(batch[1] is None)
        return model(batch[0]).abs().mean()

    finetune(_conv_bn(), unlabelled, RecoveryConfig(finetune_steps=3), train_step=sparsity_loss)
    assert calls == [True, True, True]
    with pytest.raises(InvalidConfigError, match="train_step"):
        finetune(_conv_bn(), digits, RecoveryConfig(finetune_steps=1, distill=True), train_step=label_smoothed)


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


# -- the fine-tuning stage: schedules, optimizers, epochs, early stopping, kept sparsity -------------------------
def test_recipe_validation_names_the_field() -> None:
    cases = [
        ({"finetune_steps": 10, "finetune_epochs": 1.0}, "not both"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"momentum": 1.0}, "momentum"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"early_stopping_patience": True}, "early_stopping_patience"),
        ({"finetune_epochs": -0.5}, "finetune_epochs"),
        ({"time_budget_s": 0}, "time_budget_s"),
    ]
    for bad, word in cases:
        with pytest.raises(InvalidConfigError, match=word):
            RecoveryConfig(**bad)  # type: ignore[arg-type]


def test_learning_rate_schedules() -> None:
    const = RecoveryConfig(finetune_steps=100, finetune_lr=0.1, warmup_steps=10)
    assert const.lr_at(0, 100) == pytest.approx(0.01) and const.lr_at(9, 100) == pytest.approx(0.1)
    assert const.lr_at(99, 100) == pytest.approx(0.1)
    cos = dataclasses.replace(const, lr_schedule="cosine")
    assert cos.lr_at(10, 100) == pytest.approx(0.1)  # the peak right after warm-up
    assert cos.lr_at(55, 100) == pytest.approx(0.05)  # half-way through the decay
    assert cos.lr_at(100, 100) == pytest.approx(0.0, abs=1e-9)
    lrs = [cos.lr_at(s, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone decay
    one = RecoveryConfig(finetune_steps=100, finetune_lr=0.1, lr_schedule="onecycle")
    assert one.lr_at(0, 100) < 0.01 and one.lr_at(29, 100) == pytest.approx(0.1)  # 30% warm-up by default
    assert one.lr_at(99, 100) < 0.001


def test_epochs_set_the_step_count(digits: Dataset) -> None:
    cfg = RecoveryConfig(finetune_epochs=2.0, batch_size=64)
    per_epoch = digits.num_train // 64
    assert cfg.finetunes and cfg.total_steps(digits.num_train) == 2 * per_epoch
    seen: list[Any] = []
    finetune(_conv_bn(seed=3), digits, cfg, on_progress=seen.append)
    assert seen[-1].steps == 2 * per_epoch == seen[-1].total_steps and seen[-1].stopped == "done"
    assert [r.steps for r in seen[:-1]] == [per_epoch, 2 * per_epoch]  # progress once per epoch


def test_sgd_with_cosine_warmup_trains(digits: Dataset) -> None:
    model = _conv_bn(seed=1)
    before = _train_loss(model, digits)
    cfg = RecoveryConfig(
        finetune_steps=40, optimizer="sgd", finetune_lr=0.05, lr_schedule="cosine", warmup_steps=5, weight_decay=5e-4
    )
    finetune(model, digits, cfg)
    assert _train_loss(model, digits) < 0.5 * before


def _val_loss(model: nn.Module, ds: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(ds.x_val), ds.y_val))  # type: ignore[arg-type]


def test_early_stopping_restores_the_best_checkpoint(digits: Dataset) -> None:
    """A learning rate far too high makes the validation loss climb after its first checks: training stops
    after ``patience`` checks without improvement and the best weights come back."""
    seen: list[Any] = []
    cfg = RecoveryConfig(
        finetune_steps=400, finetune_lr=5e-3, eval_every=5, early_stopping_patience=3, batch_size=16, seed=1
    )
    small = digits.subset(64, 200, seed=0)  # few training samples: it overfits quickly
    model = _conv_bn(seed=4)
    finetune(model, small, cfg, on_progress=seen.append)
    end = seen[-1]
    assert end.stopped == "early_stopping" and end.steps < 400
    assert end.best_step is not None and end.best_step <= end.steps - 3 * 5
    checks = [r.best_val_loss for r in seen[:-1]]
    assert end.best_val_loss == min(c for c in checks if c is not None)
    assert _val_loss(model, small) == pytest.approx(end.best_val_loss, rel=1e-4)  # the best weights, restored


def test_time_budget_stops_training(digits: Dataset) -> None:
    seen: list[Any] = []
    finetune(_conv_bn(), digits, RecoveryConfig(finetune_steps=10**6, time_budget_s=0.3), on_progress=seen.append)
    assert seen[-1].stopped == "time_budget" and 0 < seen[-1].steps < 10**6


def test_kept_sparsity_survives_finetuning(trained: nn.Sequential, digits: Dataset) -> None:
    model = copy.deepcopy(trained)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p[torch.rand_like(p) < 0.5] = 0.0
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() > 1}
    refilled = copy.deepcopy(model)
    finetune(model, digits, RecoveryConfig(finetune_steps=20, keep_sparsity=True))
    finetune(refilled, digits, RecoveryConfig(finetune_steps=20))
    for name, p in model.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), name
    assert any(bool((p[zeros[n]] != 0).any()) for n, p in refilled.named_parameters() if n in zeros)


def test_unstructured_plans_stay_sparse_after_the_objectives_finetune(trained: nn.Sequential, digits: Dataset) -> None:
    from autoprune.objective import Objective

    obj = Objective(
        copy.deepcopy(trained),
        digits.x_val[:1],
        digits,
        metric="accuracy",
        method="unstructured",
        recovery=RecoveryConfig(finetune_steps=30),
    )
    model = obj.materialize(obj.plan({"*": 0.5}))
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]  # the classifier head is kept dense
    zeros = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert zeros >= 0.49
