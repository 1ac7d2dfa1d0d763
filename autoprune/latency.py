"""Measured latency: time the real model on this machine and record how it was timed.

Protocol (what the measurements on a shared 2-core box taught us):

* one thread by default, pinned for torch (``set_num_threads``) and ONNX Runtime (``intra_op_num_threads``);
* warm-up runs first, then repeats in blocks until the median stops moving (or a cap is hit);
* the candidate is timed **interleaved with the unpruned reference** in the same window, alternating the order
  of each pair, and the median of the per-pair ratios is reported beside the absolute median: when a neighbour
  process wakes, both slow down and the ratio survives;
* the spread (inter-quartile range), the number of repeats, the load average before and after, the thread
  count, batch size and runtime versions are kept with every figure in a :class:`LatencyProtocol`;
* with a lock directory (``LatencyConfig.lock_dir``) the timing (warm-up and interleaved runs, nothing else) holds
  the per-core locks of :mod:`autoprune.measure_lock`, so processes on one host never time on the same cores at
  once; the protocol records the cores, whether the lock was held and how long it was waited for.

A cache keyed by the pruned shape means each distinct shape is timed once per job.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from autoprune.cost import count_macs
from autoprune.errors import InvalidConfigError
from autoprune.inputs import Inputs, tensors
from autoprune.inputs import batched as resize_batch
from autoprune.inputs import signature as input_signature
from autoprune.measure_lock import Held, MeasureLock, unlocked
from autoprune.records import Latency, LatencyProtocol
from autoprune.runtime import RUNTIMES, Runner, make_runner, runtime_versions, torch_threads


@dataclass(frozen=True)
class LatencyConfig:
    """How to time a model."""

    runtime: str = "torch"
    """``torch`` (eager) or ``onnxruntime`` (CPU execution provider)."""
    threads: int = 1
    """Intra-op threads, pinned for the measurement. One thread gives the steadiest figures."""
    batch_size: int = 1
    """Batch size of the timed input."""
    warmup: int = 5
    """Untimed runs before timing (per model)."""
    min_repeats: int = 15
    """Timed runs before the stability check starts."""
    max_repeats: int = 300
    """Upper bound on timed runs."""
    block: int = 5
    """Runs between two stability checks."""
    rel_tolerance: float = 0.02
    """Stop when the median moved less than this fraction over the last block (twice in a row)."""
    max_seconds: float = 5.0
    """Time cap for one measurement (warm-up excluded)."""
    interleave_reference: bool = True
    """Time the unpruned reference model in the same window and report the ratio."""
    lock_dir: str | os.PathLike[str] | None = None
    """Directory of per-core lock files shared by every process timing on this host (see
    :mod:`autoprune.measure_lock`); None: no lock (``exclusive="off"`` in the protocol)."""
    lock_timeout_s: float = 30.0
    """Longest wait for the locks; then the measurement runs anyway, recorded as ``exclusive="timeout"``."""

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise InvalidConfigError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        for name in ("threads", "batch_size", "min_repeats", "max_repeats", "block"):
            if int(getattr(self, name)) < 1:
                raise InvalidConfigError(f"latency {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or not self.max_seconds > 0 or not 0 < self.rel_tolerance < 1:  # `not >`: rejects NaN
            raise InvalidConfigError("latency warmup must be >= 0, max_seconds > 0, 0 < rel_tolerance < 1")
        if self.max_repeats < self.min_repeats:
            raise InvalidConfigError("latency max_repeats must be >= min_repeats")
        if self.lock_dir is not None and not str(self.lock_dir):
            raise InvalidConfigError("latency lock_dir must be a directory path or None")
        if not (isinstance(self.lock_timeout_s, int | float) and self.lock_timeout_s >= 0):
            raise InvalidConfigError(f"latency lock_timeout_s must be >= 0, got {self.lock_timeout_s!r}")


class LatencyMeter(Protocol):
    """Anything that turns a model into a :class:`Latency`."""

    config: LatencyConfig

    def measure(self, model: nn.Module, example_inputs: Inputs, *, reference: nn.Module | None = None) -> Latency: ...


@functools.cache
def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}; {os.cpu_count()} logical CPUs; {platform.system()} {platform.release()}"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def batched(example_inputs: Inputs, batch_size: int) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """Example inputs resized to ``batch_size`` along dim 0 (repeating the first sample): a tuple of positional
    tensors, or a dict for keyword inputs."""
    resized = resize_batch(example_inputs, batch_size)
    return dict(resized) if isinstance(resized, Mapping) else tensors(resized)


class Meter:
    """Times models for real in the configured runtime (torch eager or ONNX Runtime)."""

    def __init__(self, config: LatencyConfig | None = None) -> None:
        self.config = config or LatencyConfig()
        cfg = self.config
        self.lock = MeasureLock(cfg.lock_dir, cfg.lock_timeout_s) if cfg.lock_dir is not None else None

    def _runner(self, model: nn.Module, inputs: Inputs) -> Runner:
        return make_runner(model, inputs, runtime=self.config.runtime, threads=self.config.threads)

    def measure(self, model: nn.Module, example_inputs: Inputs, *, reference: nn.Module | None = None) -> Latency:
        cfg = self.config
        inputs = batched(example_inputs, cfg.batch_size)
        with torch_threads(cfg.threads):
            candidate = self._runner(model, inputs)
            other = self._runner(reference, inputs) if reference is not None and cfg.interleave_reference else None
        return self.measure_runners(candidate, other)

    def measure_runners(self, candidate: Runner, reference: Runner | None = None) -> Latency:
        """Time prepared runners (e.g. ONNX Runtime sessions of exported files), interleaved if both given."""
        cfg = self.config
        # the host-wide lock covers the timed runs only: building runners, pruning and evaluation run unlocked
        exclusive = self.lock.hold() if self.lock is not None else nullcontext(unlocked())
        with torch_threads(cfg.threads), exclusive as held:
            load_before = os.getloadavg()[0]
            start = time.perf_counter_ns()
            for _ in range(cfg.warmup):
                candidate()
                if reference is not None:
                    reference()
            warmup_ms = (time.perf_counter_ns() - start) / 1e6
            times, ref_times = self._time(candidate, reference)
            load_after = os.getloadavg()[0]
        protocol = LatencyProtocol(
            runtime=cfg.runtime,
            threads=cfg.threads,
            batch_size=cfg.batch_size,
            warmup=cfg.warmup,
            repeats=len(times),
            interleaved=reference is not None,
            load_before=round(load_before, 2),
            load_after=round(load_after, 2),
            versions=runtime_versions(),
            machine=machine_description(),
            **_lock_fields(held),
        )
        ratio = statistics.median(t / r for t, r in zip(times, ref_times, strict=True)) if ref_times else None
        return Latency(
            median_ms=statistics.median(times),
            p25_ms=_quantile(times, 0.25),
            p75_ms=_quantile(times, 0.75),
            min_ms=min(times),
            protocol=protocol,
            reference_median_ms=statistics.median(ref_times) if ref_times else None,
            ratio=ratio,
            timed_ms=warmup_ms + sum(times) + sum(ref_times),
        )

    def _time(self, candidate: Runner, other: Runner | None) -> tuple[list[float], list[float]]:
        cfg = self.config
        clock = time.perf_counter_ns
        times: list[float] = []
        ref_times: list[float] = []
        stable_checks = 0
        last_median: float | None = None
        deadline = time.monotonic() + cfg.max_seconds
        while len(times) < cfg.max_repeats:
            for _ in range(min(cfg.block, cfg.max_repeats - len(times))):  # never more than max_repeats
                # alternate which model goes first so neither always runs on a warmer cache
                order = [(candidate, times), (other, ref_times)] if other is not None else [(candidate, times)]
                if other is not None and len(times) % 2:
                    order.reverse()
                for runner, sink in order:
                    assert runner is not None
                    start = clock()
                    runner()
                    sink.append((clock() - start) / 1e6)
            if len(times) < cfg.min_repeats:
                continue
            med = statistics.median(times)
            if other is not None:
                med = statistics.median(t / r for t, r in zip(times, ref_times, strict=True))
            if last_median is not None and abs(med - last_median) <= cfg.rel_tolerance * last_median:
                stable_checks += 1
                if stable_checks >= 2:
                    break
            else:
                stable_checks = 0
            last_median = med
            if time.monotonic() > deadline:
                break
        return times, ref_times


def _lock_fields(held: Held) -> dict[str, Any]:
    return {"cpus": held.cpus, "exclusive": held.exclusive, "lock_wait_ms": round(held.wait_ms, 1)}


class DeterministicMeter:
    """A synthetic latency proportional to MACs: **not a measurement**.

    It exists so that environment checkers and tests can run episodes with reproducible rewards; every figure
    it returns is marked ``meter="deterministic"`` in its protocol.
    """

    def __init__(self, ms_per_mmac: float = 0.05, overhead_ms: float = 0.1, config: LatencyConfig | None = None):
        self.ms_per_mmac = ms_per_mmac
        self.overhead_ms = overhead_ms
        self.config = config or LatencyConfig()

    def _ms(self, model: nn.Module, inputs: Inputs) -> float:
        macs, _ = count_macs(model, inputs)
        return self.overhead_ms + self.ms_per_mmac * macs / 1e6

    def measure(self, model: nn.Module, example_inputs: Inputs, *, reference: nn.Module | None = None) -> Latency:
        inputs = batched(example_inputs, self.config.batch_size)
        ms = self._ms(model, inputs)
        ref = self._ms(reference, inputs) if reference is not None else None
        protocol = LatencyProtocol(
            runtime=self.config.runtime,
            threads=self.config.threads,
            batch_size=self.config.batch_size,
            warmup=0,
            repeats=1,
            interleaved=False,
            load_before=0.0,
            load_after=0.0,
            meter="deterministic",
        )
        return Latency(ms, ms, ms, ms, protocol, reference_median_ms=ref, ratio=ms / ref if ref else None)


def shape_signature(model: nn.Module, example_inputs: Inputs, config: LatencyConfig | None = None) -> str:
    """A key that is equal for models that run the same computation shapes (weights values aside).

    With ``config`` the key also covers how the model is timed (runtime, threads, batch size); without it,
    the key describes the computation only (e.g. to cache MACs)."""
    # one string hashed once: the same digest as feeding the parts one by one, at a fraction of the calls
    parts: list[str] = []
    if config is not None:
        parts.append(repr((config.runtime, config.threads, config.batch_size)))
    parts.append(type(model).__name__)
    parts.extend(input_signature(example_inputs))
    # sorted: torch.nn.utils.prune.remove re-registers ``weight`` after ``bias``, reordering the state dict of an
    # unstructured-sparsified model whose shapes are those of its base
    parts.extend(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};" for name, tensor in sorted(model.state_dict().items()))
    for name, module in model.named_modules():
        parts.append(f"{name}:{type(module).__name__};")
        heads = getattr(module, "num_heads", None)
        if isinstance(heads, int):
            parts.append(f"heads={heads};")
    return hashlib.sha256("".join(parts).encode()).hexdigest()


OUTLIER_FACTOR = 1.25
"""A measurement whose interleaved reference ran this many times slower or faster than the median of the
reference's recent figures (:data:`OUTLIER_WINDOW` of them, at least :data:`OUTLIER_MIN_SEEN`) is taken again once:
a neighbour that woke during the window skews the pair ratio too (a reference timed at 6.99 ms instead of 3.1 ms
once gave a false 2.55x), and the shape cache would keep the figure for the whole job."""
OUTLIER_WINDOW = 9
OUTLIER_MIN_SEEN = 3


class CachedMeter:
    """Wraps a meter so that each distinct pruned shape is timed once (per cache, i.e. per job).

    A measurement whose interleaved reference is an outlier against the reference's recent figures
    (:data:`OUTLIER_FACTOR`) is timed a second time; the one whose reference is closer to them is kept and cached,
    with ``remeasured=True``. ``remeasures`` counts them."""

    def __init__(self, meter: LatencyMeter, cache: dict[str, Latency] | None = None) -> None:
        self.meter = meter
        self.config = meter.config
        self.cache: dict[str, Latency] = {} if cache is None else cache
        self.hits = 0
        self.remeasures = 0
        self._references: list[float] = []

    def _off(self, latency: Latency) -> float:
        """How far (a factor >= 1) the reference of ``latency`` ran from the median of the recent ones; 1.0 when
        there are too few to judge or no reference."""
        ref = latency.reference_median_ms
        recent = self._references[-OUTLIER_WINDOW:]
        if not ref or len(recent) < OUTLIER_MIN_SEEN:
            return 1.0
        typical = statistics.median(recent)
        return max(ref / typical, typical / ref) if typical > 0 else 1.0

    def measure(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        *,
        reference: nn.Module | None = None,
        refresh: bool = False,
    ) -> Latency:
        """The cached figure for this pruned shape, or a new measurement (always with ``refresh=True``; the new
        figure then replaces the cached one)."""
        key = shape_signature(model, example_inputs, self.config)
        found = None if refresh else self.cache.get(key)
        if found is not None:
            self.hits += 1
            return replace(found, cached=True)
        result = self.meter.measure(model, example_inputs, reference=reference)
        if reference is not None and self._off(result) > OUTLIER_FACTOR:
            again = self.meter.measure(model, example_inputs, reference=reference)
            self.remeasures += 1
            result = replace(min(result, again, key=self._off), remeasured=True)
        if result.reference_median_ms:
            self._references.append(result.reference_median_ms)
        self.cache[key] = result
        return result


def make_meter(config: LatencyConfig | None = None, *, cache: bool = True) -> LatencyMeter:
    meter: LatencyMeter = Meter(config)
    return CachedMeter(meter) if cache else meter


MeterFactory = Callable[[LatencyConfig], LatencyMeter]
