"""Hooks for models users bring: after_prune, calibration batches, dict metrics, a kept recovery recipe."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from autoprune.errors import DataRequiredError, InvalidConfigError
from autoprune.latency import DeterministicMeter
from autoprune.objective import Objective
from autoprune.plan import Plan
from autoprune.recovery import RecoveryConfig, recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class StoredWidth(nn.Module):
    """Reads its hidden width from an attribute (as models with a stored head count or size do): pruning fc1
    breaks the forward unless something updates ``width``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 3)
        self.width = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h.reshape(-1, self.width))


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _x(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _score(model: nn.Module) -> float:
    with torch.no_grad():
        return float(-model(_x(16, 1)).abs().mean())


# -- after_prune ---------------------------------------------------------------------------------------------
def test_without_a_hook_a_stored_width_locks_the_group() -> None:
    torch.manual_seed(0)
    obj = Objective(StoredWidth().eval(), _x(), None, metric=_score, latency=DeterministicMeter())
    assert obj.group_names == () and [name for name, _ in obj.structure.locked] == ["fc1"]


def test_after_prune_runs_in_the_probe_on_candidates_and_in_materialize() -> None:
    torch.manual_seed(0)
    seen: list[tuple[int, dict[str, float]]] = []

    def fix(model: nn.Module, plan: Plan) -> None:
        seen.append((model.fc1.out_features, plan.as_dict()))
        model.width = model.fc1.out_features

    obj = Objective(StoredWidth().eval(), _x(), None, metric=_score, latency=DeterministicMeter(), after_prune=fix)
    assert obj.group_names == ("fc1",) and obj.structure.locked == ()
    # the lock probe's trials: halved, then one unit short of full width
    assert seen == [(16, {"fc1": 0.5})] * 3 + [(31, {"fc1": 1 / 32})]
    probed = len(seen)
    ev = obj({"fc1": 0.75})
    assert seen[probed] == (8, {"fc1": 0.75}) and ev.macs < obj.baseline.macs
    model = obj.materialize(ev.plan)
    assert seen[-1] == (8, {"fc1": 0.75}) and len(seen) == probed + 2
    assert model.width == 8 and model(_x(5)).shape == (5, 3)


def test_after_prune_may_return_the_model_to_use_and_its_errors_surface() -> None:
    torch.manual_seed(0)

    def wrap(model: nn.Module, plan: Plan) -> nn.Module:
        model.width = model.fc1.out_features
        return nn.Sequential(model)  # a different module: this is the one used

    obj = Objective(StoredWidth().eval(), _x(), None, metric=_score, latency=DeterministicMeter(), after_prune=wrap)
    assert isinstance(obj.materialize(obj.plan({"fc1": 0.5})), nn.Sequential)
    with pytest.raises(InvalidConfigError, match=r"return an nn\.Module"):
        Objective(StoredWidth().eval(), _x(), None, metric=_score, after_prune=lambda m, p: 3)

    def broken(model: nn.Module, plan: Plan) -> None:
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):  # not swallowed into a locked group
        Objective(StoredWidth().eval(), _x(), None, metric=_score, after_prune=broken)


# -- calibration batches -------------------------------------------------------------------------------------
def test_calibration_batches_re_estimate_batchnorm_without_a_dataset() -> None:
    torch.manual_seed(0)
    base = WithBatchNorm().eval()
    batches = [_x(16, 2), (_x(16, 3), None)]  # bare tensors and (x, y) pairs
    with pytest.raises(DataRequiredError, match="calibration="):
        Objective(base, _x(), None, metric=_score, recovery=RecoveryConfig())
    obj = Objective(base, _x(), None, metric=_score, latency=DeterministicMeter(), calibration=batches)
    assert obj.recovery == RecoveryConfig()  # BatchNorm re-estimation on, as with data
    plan = obj.plan({"fc1": 0.5})
    model = obj.materialize(plan)
    expected = recalibrate_batchnorm(obj.prune(plan), [b if isinstance(b, torch.Tensor) else b[0] for b in batches])
    assert not torch.equal(model.bn.running_mean, obj.prune(plan).bn.running_mean)  # stats were re-estimated
    torch.testing.assert_close(model.bn.running_mean, expected.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, expected.bn.running_var)
    off = Objective(base, _x(), None, metric=_score, latency=DeterministicMeter())
    assert torch.equal(off.materialize(plan).bn.running_mean, obj.prune(plan).bn.running_mean)  # no data: none


def test_calibration_replaces_the_dataset_batches_for_batchnorm(digits_workload: Any) -> None:
    wl = digits_workload
    data = wl.dataset.subset(128, 64)
    given = [data.x_val[:32]]
    obj = Objective(wl.model, wl.example_inputs, data, latency=DeterministicMeter(), calibration=given)
    plain = Objective(wl.model, wl.example_inputs, data, latency=DeterministicMeter())
    plan = obj.plan(dict.fromkeys(obj.group_names, 0.5))
    bn = next(n for n, m in obj.base.named_modules() if isinstance(m, nn.BatchNorm2d))
    ours, theirs = obj.materialize(plan).get_submodule(bn), plain.materialize(plan).get_submodule(bn)
    expected = recalibrate_batchnorm(obj.prune(plan), given).get_submodule(bn)
    torch.testing.assert_close(ours.running_mean, expected.running_mean)
    assert not torch.allclose(ours.running_mean, theirs.running_mean)
    with pytest.raises(InvalidConfigError, match="calibration is empty"):
        Objective(wl.model, wl.example_inputs, data, calibration=[])


# -- dict metrics, known baseline, the recipe kept ----------------------------------------------------------
def test_an_evaluate_function_may_return_several_metrics() -> None:
    torch.manual_seed(0)
    calls: list[int] = []

    def metrics(model: nn.Module) -> dict[str, float]:
        calls.append(1)
        with torch.no_grad():
            out = model(_x(16, 1))
        return {"score": float(-out.abs().mean()), "params": float(sum(p.numel() for p in model.parameters()))}

    base = WithBatchNorm().eval()
    obj = Objective(base, _x(), None, metric=metrics, metric_name="score", latency=DeterministicMeter())
    assert obj.baseline.metric == "score" and set(obj.baseline.extra["metrics"]) == {"score", "params"}
    assert obj.baseline.quality == obj.baseline.extra["metrics"]["score"]
    ev = obj({"fc1": 0.5})
    assert ev.quality == ev.extra["metrics"]["score"] and ev.extra["metrics"]["params"] == ev.params
    assert ev.to_json()["extra"]["metrics"]["params"] == ev.params  # recorded with the evaluation
    with pytest.raises(InvalidConfigError, match="several metrics"):
        Objective(base, _x(), None, metric=metrics)
    with pytest.raises(InvalidConfigError, match="not 'f1'"):
        Objective(base, _x(), None, metric=metrics, metric_name="f1")
    calls.clear()
    known = Objective(base, _x(), None, metric=metrics, metric_name="score", base_quality=-0.5)
    assert calls == [] and known.baseline.quality == -0.5 and known.baseline.extra == {}


def test_without_data_the_given_recipe_is_kept_or_refused() -> None:
    base = WithBatchNorm().eval()
    recipe = RecoveryConfig(bn_recalibration_batches=0, batch_size=7, seed=3)
    assert Objective(base, _x(), None, metric=_score, recovery=recipe).recovery is recipe
    with pytest.raises(DataRequiredError, match="fine-tuning needs data"):
        Objective(base, _x(), None, metric=_score, recovery=RecoveryConfig(finetune_steps=5), calibration=[_x(8)])
    obj = Objective(base, _x(), None, metric=_score, latency=DeterministicMeter())
    with pytest.raises(DataRequiredError, match="BatchNorm"):
        obj.evaluate({"fc1": 0.5}, recovery=RecoveryConfig())
