"""Latency: real meters (torch eager, ONNX Runtime), the shape cache, the deterministic meter, configs, JSON.

No assertion here depends on how fast this machine is: only on structure (a model 16x wider does more work,
quartiles are ordered, the cache is hit) and on what the protocol records.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from autoprune.cost import count_macs
from autoprune.errors import InvalidConfigError
from autoprune.latency import (
    CachedMeter,
    DeterministicMeter,
    Latency,
    LatencyConfig,
    LatencyProtocol,
    Meter,
    batched,
    make_meter,
    shape_signature,
)
from autoprune.plan import Plan
from autoprune.pruning import GLOBAL, apply_plan

SMALL = {"warmup": 1, "min_repeats": 3, "max_repeats": 6, "block": 3}


def _stack(width: int, depth: int = 3, inputs: int = 64) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    torch.manual_seed(0)
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def small() -> nn.Module:
    return _stack(64)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(0))


def _check_figures(lat: Latency) -> None:
    assert lat.median_ms > 0
    assert 0 < lat.min_ms <= lat.p25_ms <= lat.median_ms <= lat.p75_ms
    assert lat.spread >= 0
    assert all(math.isfinite(v) for v in (lat.median_ms, lat.p25_ms, lat.p75_ms, lat.min_ms))


# ------------------------------------------------------------------------------------------------ Meter


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_meter_measures_and_records_its_protocol(runtime: str, small: nn.Module, x: torch.Tensor) -> None:
    cfg = LatencyConfig(runtime=runtime, batch_size=2, **SMALL)
    lat = Meter(cfg).measure(small, x)
    _check_figures(lat)
    p = lat.protocol
    assert isinstance(p, LatencyProtocol)
    assert (p.runtime, p.threads, p.batch_size, p.warmup) == (runtime, 1, 2, 1)
    assert cfg.min_repeats <= p.repeats <= cfg.max_repeats
    assert p.meter == "measured"
    assert p.interleaved is False
    assert p.versions["torch"] == str(torch.__version__)
    if runtime == "onnxruntime":
        import onnxruntime

        assert p.versions["onnxruntime"] == onnxruntime.__version__
    assert p.machine
    assert p.load_before >= 0 and p.load_after >= 0
    assert lat.ratio is None and lat.reference_median_ms is None and lat.speedup is None
    assert lat.cached is False


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_interleaved_reference_gives_a_ratio(runtime: str, small: nn.Module, x: torch.Tensor) -> None:
    lat = Meter(LatencyConfig(runtime=runtime, **SMALL)).measure(small, x, reference=_stack(64))
    _check_figures(lat)
    assert lat.protocol.interleaved is True
    assert lat.reference_median_ms is not None and lat.reference_median_ms > 0
    assert lat.ratio is not None and lat.ratio > 0
    assert lat.speedup == pytest.approx(1 / lat.ratio)
    # the wall time of every run, warm-up included: at least every run of both models at their fastest
    assert lat.timed_ms is not None
    assert lat.timed_ms >= (lat.protocol.warmup + lat.protocol.repeats) * lat.min_ms
    assert Latency.from_json(lat.to_json()).timed_ms == lat.timed_ms


def test_reference_ignored_when_interleaving_is_off(small: nn.Module, x: torch.Tensor) -> None:
    lat = Meter(LatencyConfig(interleave_reference=False, **SMALL)).measure(small, x, reference=_stack(64))
    assert lat.protocol.interleaved is False
    assert lat.ratio is None and lat.reference_median_ms is None


def test_a_much_wider_model_has_a_ratio_above_one(x: torch.Tensor) -> None:
    """Structural: 16x the width is ~250x the MACs; the ratio is far above 1 on any machine."""
    narrow, wide = _stack(64), _stack(1024)
    cfg = LatencyConfig(warmup=2, min_repeats=9, max_repeats=30, block=3)
    lat = Meter(cfg).measure(wide, x, reference=narrow)
    assert lat.ratio is not None and lat.ratio > 1.5
    assert lat.reference_median_ms is not None and lat.median_ms > lat.reference_median_ms


def test_repeats_never_exceed_max_repeats(small: nn.Module, x: torch.Tensor) -> None:
    # 7 is not a multiple of the block of 3; rel_tolerance close to 1 makes it stop as early as it may
    for cfg in (
        LatencyConfig(warmup=0, min_repeats=3, max_repeats=7, block=3),
        LatencyConfig(warmup=0, min_repeats=7, max_repeats=7, block=5, rel_tolerance=0.99),
        LatencyConfig(warmup=0, min_repeats=1, max_repeats=2, block=10),
    ):
        lat = Meter(cfg).measure(small, x, reference=small)
        assert cfg.min_repeats <= lat.protocol.repeats <= cfg.max_repeats, cfg


def test_torch_thread_count_is_restored(small: nn.Module, x: torch.Tensor) -> None:
    previous = torch.get_num_threads()
    target = 2 if previous != 2 else 3
    torch.set_num_threads(target)
    try:
        seen: list[int] = []

        class Probe(nn.Module):
            def forward(self, t: torch.Tensor) -> torch.Tensor:
                seen.append(torch.get_num_threads())
                return t * 2

        lat = Meter(LatencyConfig(threads=1, **SMALL)).measure(Probe(), x)
        assert lat.protocol.threads == 1
        assert seen and set(seen) == {1}  # pinned while timing
        assert torch.get_num_threads() == target  # restored after
    finally:
        torch.set_num_threads(previous)


def test_batched_inputs_repeat_the_first_sample() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    (b,) = batched(x, 5)
    assert b.shape == (5, 4)
    assert torch.equal(b, x[:1].expand(5, 4))
    a, c = batched((x, x[:, :2]), 2)
    assert a.shape == (2, 4) and c.shape == (2, 2)


# ------------------------------------------------------------------------------------------- CachedMeter


class CountingMeter:
    """A fake inner meter that counts its calls (the deterministic meter does the arithmetic)."""

    def __init__(self) -> None:
        self.inner = DeterministicMeter()
        self.config = self.inner.config
        self.calls = 0

    def measure(self, model: nn.Module, example_inputs: torch.Tensor, *, reference: nn.Module | None = None) -> Latency:
        self.calls += 1
        return self.inner.measure(model, example_inputs, reference=reference)


def test_cached_meter_times_each_shape_once(small: nn.Module, x: torch.Tensor) -> None:
    inner = CountingMeter()
    meter = CachedMeter(inner)
    first = meter.measure(small, x, reference=small)
    second = meter.measure(small, x, reference=small)
    assert inner.calls == 1
    assert first.cached is False and second.cached is True
    assert second.median_ms == first.median_ms and second.ratio == first.ratio
    assert meter.hits == 1
    assert len(meter.cache) == 1
    # a different model object with the same shapes (other weights) is the same key
    other_weights = _stack(64)
    with torch.no_grad():
        for p in other_weights.parameters():
            p.add_(1.0)
    assert meter.measure(other_weights, x).cached is True
    assert inner.calls == 1
    # refresh: timed again, and the new figure replaces the cached one
    fresh = meter.measure(small, x, reference=small, refresh=True)
    assert inner.calls == 2 and fresh.cached is False and len(meter.cache) == 1
    assert meter.measure(small, x).median_ms == fresh.median_ms


class ScriptedReferenceMeter:
    """A fake inner meter whose interleaved reference runs at the scripted times (a neighbour waking is the
    point): the candidate/reference ratio is what a burst on the reference alone would give."""

    def __init__(self, reference_ms: list[float]) -> None:
        self.inner = DeterministicMeter()
        self.config = self.inner.config
        self.reference_ms = list(reference_ms)
        self.calls = 0

    def measure(self, model: nn.Module, example_inputs: torch.Tensor, *, reference: nn.Module | None = None) -> Latency:
        self.calls += 1
        lat = self.inner.measure(model, example_inputs)
        ref = self.reference_ms.pop(0)
        return dataclasses.replace(lat, reference_median_ms=ref, ratio=lat.median_ms / ref)


def test_cached_meter_times_an_outlier_reference_again(small: nn.Module, x: torch.Tensor) -> None:
    # three ordinary figures, then one whose reference ran 2.3x slow (a false speed-up), then ordinary again
    inner = ScriptedReferenceMeter([3.0, 3.1, 2.9, 7.0, 3.05, 3.0])
    meter = CachedMeter(inner)
    for width in (16, 24, 32):
        assert meter.measure(_stack(width), x, reference=small).remeasured is False
    assert inner.calls == 3 and meter.remeasures == 0
    kept = meter.measure(_stack(40), x, reference=small)
    assert inner.calls == 5 and meter.remeasures == 1
    assert kept.remeasured is True and kept.reference_median_ms == 3.05
    # the cached figure is the kept one, and an ordinary reference is not timed twice
    assert meter.measure(_stack(40), x).reference_median_ms == 3.05
    assert meter.measure(_stack(48), x, reference=small).remeasured is False
    assert inner.calls == 6
    # the flag survives the record's JSON
    assert Latency.from_json(kept.to_json()).remeasured is True


def test_cached_meter_keeps_the_first_figure_when_the_second_is_worse(small: nn.Module, x: torch.Tensor) -> None:
    inner = ScriptedReferenceMeter([3.0, 3.0, 3.0, 4.0, 9.0])
    meter = CachedMeter(inner)
    for width in (16, 24, 32):
        meter.measure(_stack(width), x, reference=small)
    kept = meter.measure(_stack(40), x, reference=small)
    assert inner.calls == 5 and kept.reference_median_ms == 4.0 and kept.remeasured is True


def test_cached_meter_keys_differ_by_shape(small: nn.Module, x: torch.Tensor) -> None:
    inner = CountingMeter()
    meter = CachedMeter(inner)
    meter.measure(small, x)
    meter.measure(_stack(32), x)
    meter.measure(_stack(64, depth=4), x)
    assert inner.calls == 3
    assert len(meter.cache) == 3
    assert meter.hits == 0


def test_shape_signature_depends_on_shapes_not_values(small: nn.Module, x: torch.Tensor) -> None:
    cfg = LatencyConfig()
    sig = shape_signature(small, x, cfg)
    assert sig == shape_signature(_stack(64), x, cfg)
    assert sig == shape_signature(small, torch.randn(9, 64), cfg)  # batch dimension is the meter's
    assert sig != shape_signature(_stack(48), x, cfg)
    assert sig != shape_signature(small, x.double(), cfg)
    assert sig != shape_signature(small, x, LatencyConfig(threads=2))
    assert sig != shape_signature(small, x, LatencyConfig(batch_size=8))
    assert sig != shape_signature(small, x, LatencyConfig(runtime="onnxruntime"))


def test_shape_signature_counts_attention_heads() -> None:
    a = nn.MultiheadAttention(16, 4, batch_first=True)
    b = nn.MultiheadAttention(16, 2, batch_first=True)
    q = torch.randn(1, 5, 16)
    cfg = LatencyConfig()
    assert shape_signature(a, (q, q, q), cfg) != shape_signature(b, (q, q, q), cfg)


@pytest.mark.parametrize("ratios", [{GLOBAL: 0.7}, {"0": 0.5, "4": 0.9}])
def test_unstructured_model_has_the_shape_signature_of_its_base(
    ratios: dict[str, float], small: nn.Module, x: torch.Tensor
) -> None:
    sparse = apply_plan(small, Plan(ratios, method="unstructured"), x)
    assert any((p == 0).any() for p in sparse.parameters())
    cfg = LatencyConfig()
    assert shape_signature(sparse, x, cfg) == shape_signature(small, x, cfg)
    inner = CountingMeter()
    meter = CachedMeter(inner)
    meter.measure(small, x)
    assert meter.measure(sparse, x).cached is True
    assert inner.calls == 1


def test_structured_model_has_another_signature(small: nn.Module, x: torch.Tensor) -> None:
    pruned = apply_plan(small, Plan({"0": 0.5}), x)
    cfg = LatencyConfig()
    assert shape_signature(pruned, x, cfg) != shape_signature(small, x, cfg)


def test_shared_cache_dict_and_make_meter(small: nn.Module, x: torch.Tensor) -> None:
    shared: dict[str, Latency] = {}
    a, b = CachedMeter(CountingMeter(), shared), CachedMeter(CountingMeter(), shared)
    a.measure(small, x)
    assert b.measure(small, x).cached is True
    assert isinstance(make_meter(LatencyConfig(**SMALL)), CachedMeter)
    assert isinstance(make_meter(LatencyConfig(**SMALL), cache=False), Meter)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "kwargs",
    [
        {"runtime": "tensorrt"},
        {"runtime": "Torch"},
        {"threads": 0},
        {"batch_size": 0},
        {"min_repeats": 0},
        {"max_repeats": 0},
        {"block": 0},
        {"warmup": -1},
        {"max_seconds": 0.0},
        {"max_seconds": -1.0},
        {"max_seconds": math.nan},
        {"rel_tolerance": 0.0},
        {"rel_tolerance": 1.0},
        {"rel_tolerance": math.nan},
        {"min_repeats": 10, "max_repeats": 5},
    ],
)
def test_invalid_latency_configs(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        LatencyConfig(**kwargs)  # type: ignore[arg-type]


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="runtime"):
        LatencyConfig(runtime="tvm")


def test_default_config_pins_one_thread() -> None:
    cfg = LatencyConfig()
    assert cfg.threads == 1 and cfg.runtime == "torch" and cfg.interleave_reference


# --------------------------------------------------------------------------------------- deterministic


def test_deterministic_meter_is_deterministic(small: nn.Module, x: torch.Tensor) -> None:
    meter = DeterministicMeter(ms_per_mmac=0.05, overhead_ms=0.1)
    wide = _stack(256)
    a = meter.measure(wide, x, reference=small)
    b = DeterministicMeter(ms_per_mmac=0.05, overhead_ms=0.1).measure(wide, x, reference=small)
    assert a == b
    assert a.protocol.meter == "deterministic"
    assert a.protocol.repeats == 1 and a.protocol.interleaved is False
    macs, _ = count_macs(wide, x[:1])
    assert a.median_ms == pytest.approx(0.1 + 0.05 * macs / 1e6)
    assert a.median_ms == a.p25_ms == a.p75_ms == a.min_ms
    assert a.ratio == pytest.approx(a.median_ms / a.reference_median_ms)
    assert a.ratio > 1
    alone = meter.measure(small, x)
    assert alone.ratio is None and alone.reference_median_ms is None
    assert meter.measure(small, x, reference=small).ratio == 1.0


def test_deterministic_meter_follows_batch_size(small: nn.Module, x: torch.Tensor) -> None:
    one = DeterministicMeter(overhead_ms=0.0).measure(small, x)
    four = DeterministicMeter(overhead_ms=0.0, config=LatencyConfig(batch_size=4)).measure(small, x)
    assert four.median_ms == pytest.approx(4 * one.median_ms)
    assert four.protocol.batch_size == 4


# ------------------------------------------------------------------------------------------------- JSON


def test_latency_json_round_trip(small: nn.Module, x: torch.Tensor) -> None:
    measured = Meter(LatencyConfig(**SMALL)).measure(small, x, reference=small)
    for lat in (measured, DeterministicMeter().measure(small, x), CachedMeter(DeterministicMeter()).measure(small, x)):
        data = json.loads(json.dumps(lat.to_json()))
        back = Latency.from_json(data)
        assert back == lat
        assert back.protocol == lat.protocol
        assert back.spread == lat.spread and back.speedup == lat.speedup
    assert measured.to_json()["protocol"]["versions"]["torch"] == str(torch.__version__)
