"""``autoprune.search`` as a Python user calls it: data in the forms they have, real models, real pruning."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.errors import InvalidConfigError
from autoprune.latency import DeterministicMeter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 3)).eval()


def _xy(n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head(torch.relu(self.fc((self.emb(input_ids) * mask).sum(1) / mask.sum(1))))


def _search(model: nn.Module, data: Any, **kw: Any) -> Any:
    return autoprune.search(model, data, strategy="uniform", budget=2, latency=DeterministicMeter(), round_to=1, **kw)


def test_tensors_pairs_and_dataloaders_search_without_example_inputs() -> None:
    x, y = _xy()
    by_pair = _search(_mlp(), (x, y))
    assert by_pair.objective.dataset.num_val == 12 and by_pair.objective.dataset.num_test == 12
    assert by_pair.objective.example_inputs.shape == (1, 12)  # the data's first validation sample
    assert len(by_pair.evaluations) == 2 and by_pair.baseline.metric == "accuracy"
    by_loader = _search(_mlp(), DataLoader(TensorDataset(x, y), batch_size=32))
    assert [e.quality for e in by_loader.evaluations] == [e.quality for e in by_pair.evaluations]  # same split
    label_free = _search(_mlp(), x, metric="agreement")
    assert label_free.baseline.quality == 1.0 and label_free.baseline.metric == "agreement"
    pruned = by_pair.materialize(by_pair.evaluations[-1])
    assert pruned(x[:2]).shape == (2, 3)


def test_keyword_data_searches_a_model_that_takes_keywords() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (80, 5), generator=gen)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(0)
    result = _search(KeywordNet().eval(), (enc, ids[:, 0] % 2))
    assert set(result.objective.example_inputs) == {"input_ids", "attention_mask"}
    assert result.objective.group_names == ("fc",)
    point = result.evaluations[-1]
    assert point.macs < result.baseline.macs
    assert result.materialize(point)(**enc).shape == (80, 2)


def test_without_example_inputs_or_data_the_error_says_what_to_give() -> None:
    with pytest.raises(InvalidConfigError, match="give example_inputs="):
        autoprune.search(_mlp(), evaluate=lambda m: 1.0, budget=1, latency=DeterministicMeter())


def test_evaluate_with_several_metrics_a_known_baseline_and_no_data() -> None:
    calls: list[int] = []
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    model = _mlp()
    with torch.no_grad():
        reference = model(x)

    def metrics(m: nn.Module) -> dict[str, float]:
        calls.append(1)
        with torch.no_grad():
            out = m(x)
        return {
            "fidelity": float(torch.cosine_similarity(out, reference).mean()),
            "mse": float((out - reference).pow(2).mean()),
        }

    result = autoprune.search(
        model, evaluate=metrics, metric="fidelity", base_quality=1.0, example_inputs=x[:1],
        strategy="uniform", budget=3, latency=DeterministicMeter(), round_to=1,
    )  # fmt: skip
    assert len(calls) == 3 == len(result.evaluations)  # the unpruned model was not scored: its score was given
    assert result.baseline.quality == 1.0 and all(e.metric == "fidelity" for e in result.evaluations)
    assert all(set(e.extra["metrics"]) == {"fidelity", "mse"} for e in result.evaluations)
    assert all(e.quality == e.extra["metrics"]["fidelity"] for e in result.evaluations)


def test_without_data_a_recipe_that_needs_data_is_refused_not_replaced() -> None:
    from autoprune.errors import DataRequiredError
    from autoprune.recovery import RecoveryConfig

    kw: dict[str, Any] = {"evaluate": lambda m: 1.0, "example_inputs": torch.randn(1, 12), "budget": 1}
    with pytest.raises(DataRequiredError, match="fine-tuning needs data"):
        autoprune.search(_mlp(), recovery=RecoveryConfig(finetune_steps=10), **kw)
    with pytest.raises(DataRequiredError, match="BatchNorm re-estimation needs data"):
        autoprune.search(_mlp(), recovery=RecoveryConfig(), **kw)
    with pytest.raises(DataRequiredError, match="finetune_top"):
        autoprune.search(_mlp(), finetune_top=1, **kw)


def test_after_prune_and_calibration_through_the_facade() -> None:
    class Stored(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn, self.fc2, self.width = nn.Linear(12, 32), nn.BatchNorm1d(32), nn.Linear(32, 3), 32

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.bn(self.fc1(x))).reshape(-1, self.width))

    def fix(model: nn.Module, plan: Any) -> None:
        model.width = model.fc1.out_features

    torch.manual_seed(0)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(2))
    result = autoprune.search(
        Stored().eval(), evaluate=lambda m: 1.0, example_inputs=x[:1], after_prune=fix, calibration=[x[:32], x[32:]],
        strategy="uniform", budget=2, latency=DeterministicMeter(), round_to=1,
    )  # fmt: skip
    assert result.objective.group_names == ("fc1",)  # without the hook fc1 is locked
    pruned = result.materialize(result.evaluations[-1])
    assert pruned.width == pruned.fc1.out_features < 32
    with torch.no_grad():
        h = pruned.fc1(x)
    torch.testing.assert_close(pruned.bn.running_mean, h.mean(0))  # re-estimated on the calibration batches


def test_progress_is_one_plain_line_per_evaluation_on_stderr_by_default(capfd: pytest.CaptureFixture[str]) -> None:
    x, y = _xy()
    seen: list[Any] = []
    result = _search(_mlp(), (x, y), callbacks=[seen.append])
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert out == ""  # progress goes to stderr only
    assert len(lines) == 2 + len(result.evaluations)  # the unpruned model, one per evaluation, the end
    assert lines[0].startswith("autoprune: unpruned accuracy") and "uniform search, 2 evaluations" in lines[0]
    assert lines[1] == "autoprune: " + seen[0].line() and lines[1].startswith("autoprune: 1/2: accuracy ")
    assert lines[2].startswith("autoprune: 2/2: ") and "| front " in lines[2]
    assert lines[-1].startswith("autoprune: done (budget): 2 evaluations") and "best by reward" in lines[-1]
    assert "\r" not in err and "\x1b" not in err  # not a terminal: no control characters
    assert len(seen) == 2  # the user's callback still gets every Progress


def test_progress_false_is_quiet_and_a_function_gets_the_lines(capfd: pytest.CaptureFixture[str]) -> None:
    x, y = _xy()
    _search(_mlp(), (x, y), progress=False)
    assert capfd.readouterr() == ("", "")
    got: list[str] = []
    _search(_mlp(), (x, y), progress=got.append)
    assert capfd.readouterr() == ("", "")
    assert len(got) == 4 and all(line.startswith("autoprune: ") and "\n" not in line for line in got)
    with pytest.raises(InvalidConfigError, match="progress must be"):
        _search(_mlp(), (x, y), progress="yes")


def test_progress_on_a_terminal_rewrites_the_evaluation_line_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    x, y = _xy()
    _search(_mlp(), (x, y))
    text = term.getvalue()
    assert text.count("\r") == 2 and text.count("\x1b[K") == 2  # both evaluations on one rewritten line
    assert "\x1b[K\nautoprune: done" in text  # the open line is ended before the last one
    assert text.endswith("\n") and text.count("\n") == 3  # the unpruned model, the evaluations, the end


def test_select_is_the_results_rule_and_orders_the_fine_tune() -> None:
    x, y = _xy()
    result = _search(_mlp(), (x, y), select="latency", max_quality_drop=1.0, progress=False)
    assert result.selection.key == "latency" and result.selection.max_quality_drop == 1.0
    fastest = min(result.all_evaluations, key=lambda e: (e.latency_ratio, -e.quality))
    assert result.best() is fastest is result.best("latency", max_quality_drop=1.0)
    assert result.best("reward") is max(result.all_evaluations, key=lambda e: e.reward)
    assert result.summary()["best"]["select"] == "latency"
    with pytest.raises(InvalidConfigError, match="unknown selection 'fast'"):
        _search(_mlp(), (x, y), select="fast")
    with pytest.raises(InvalidConfigError, match="max_quality_drop must be"):
        _search(_mlp(), (x, y), select="latency", max_quality_drop=2.0)


def test_keep_takes_modules_and_container_names_through_the_facade() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x, y = _xy()
    assert _search(model, (x, y), progress=False).objective.group_names == ("0.0", "0.2", "1")
    assert _search(model, (x, y), keep=["0"], progress=False).objective.group_names == ("1",)  # a container
    assert _search(model, (x, y), keep=[model[1]], progress=False).objective.group_names == ("0.0", "0.2")
    with pytest.raises(InvalidConfigError, match="did you mean"):
        _search(model, (x, y), keep=["0.9"], progress=False)


def test_a_callback_object_sees_the_search_and_the_fine_tune_and_can_stop_the_fine_tune() -> None:
    from agents import SearchCallback
    from autoprune.recovery import RecoveryConfig

    class Watch(SearchCallback):
        def __init__(self, stop_finetune: bool) -> None:
            self.seen: list[str] = []
            self.stop_finetune = stop_finetune

        def on_step(self) -> bool:  # asked before each candidate and before each point to fine-tune
            return not (self.stop_finetune and len(self.seen) >= 3)

        def on_evaluation(self, progress: Any) -> bool:
            self.seen.append(f"eval {progress.done}")
            return True

        def on_finetune_start(self, point: Any, recovery: Any) -> None:
            self.seen.append(f"start {point.index}")

        def on_finetuned(self, tuned: Any, result: Any, *, trained: bool) -> None:
            self.seen.append(f"tuned {tuned.index} {tuned.stage} {trained}")

    x, y = _xy()

    def run(watch: Watch) -> Any:
        return autoprune.search(
            _mlp(),
            (x, y),
            strategy="uniform",
            budget=3,
            latency=DeterministicMeter(),
            round_to=1,
            finetune_top=1,
            finetune=RecoveryConfig(finetune_steps=2),
            progress=False,
            callback=watch,
        )

    watch = Watch(stop_finetune=False)
    result = run(watch)
    assert len(result.finetuned) == 1
    tuned = result.finetuned[0]
    assert watch.seen == ["eval 1", "eval 2", "eval 3", f"start {tuned.index}", f"tuned {tuned.index} finetuned True"]
    stopping = Watch(stop_finetune=True)
    stopped = run(stopping)
    assert stopping.seen == ["eval 1", "eval 2", "eval 3"] and stopped.finetuned == []  # the search is kept
    assert len(stopped.evaluations) == 3
