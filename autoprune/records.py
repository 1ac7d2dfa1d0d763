"""The records a search produces, torch-free: how a latency figure was taken (:class:`LatencyProtocol`), the figure
(:class:`Latency`) and everything known about one candidate (:class:`Evaluation`, with its :class:`~autoprune.plan.Plan`).

They are frozen and round-trip through JSON (``to_json``/``from_json``): the service stores them, the API and the
repository read them back as these objects (no hand-parsing of their JSON), and neither needs torch to do so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from autoprune.measure_lock import Exclusive
from autoprune.plan import Plan

__all__ = ["Evaluation", "Latency", "LatencyProtocol"]


@dataclass(frozen=True)
class LatencyProtocol:
    """How a latency figure was taken."""

    runtime: str
    threads: int
    batch_size: int
    warmup: int
    repeats: int
    interleaved: bool
    load_before: float
    """1-minute load average when the measurement started."""
    load_after: float
    versions: dict[str, str] = field(default_factory=dict)
    machine: str = ""
    meter: str = "measured"
    """``measured`` for real timings; anything else marks a synthetic figure (e.g. ``deterministic``)."""
    cpus: tuple[int, ...] = ()
    """The cores the measuring process could run on (its affinity); empty in records made before it was kept."""
    exclusive: Exclusive = "off"
    """``locked``: the cores' measurement locks were held while timing; ``timeout``: the wait for them ran out and
    the figure was timed anyway (possibly beside another measurement); ``off``: no lock was configured."""
    lock_wait_ms: float = 0.0
    """How long the measurement waited for the locks."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyProtocol:
        """Also reads records stored before ``cpus``/``exclusive``/``lock_wait_ms`` existed."""
        values = dict(data)
        if "cpus" in values:
            values["cpus"] = tuple(int(c) for c in values["cpus"])
        return cls(**values)


@dataclass(frozen=True)
class Latency:
    """A latency figure with its spread and protocol. Times in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    protocol: LatencyProtocol
    reference_median_ms: float | None = None
    """Median of the unpruned reference timed in the same window (interleaved)."""
    ratio: float | None = None
    """Median of per-pair candidate/reference time ratios: below 1 means faster than the reference."""
    cached: bool = False
    timed_ms: float | None = None
    """Wall time of every run the meter made (warm-up and timed, candidate and reference): what the measurement
    cost in forward passes."""
    remeasured: bool = False
    """The first measurement's reference was an outlier (a neighbour woke): it was timed again and this is the one
    whose reference ran closer to the job's usual figure."""

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median."""
        return (self.p75_ms - self.p25_ms) / self.median_ms if self.median_ms else 0.0

    @property
    def speedup(self) -> float | None:
        """Reference time / candidate time from the interleaved pairs (above 1 means faster)."""
        return 1.0 / self.ratio if self.ratio else None

    def ratio_to(self, base_ms: float) -> float:
        """Latency relative to an unpruned model timed at ``base_ms``: the interleaved ratio when it was taken,
        else the ratio of medians (1.0 without a base)."""
        if self.ratio is not None:
            return self.ratio
        return self.median_ms / base_ms if base_ms else 1.0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (the protocol's ``cpus`` as a list), as stored and read back."""
        data = asdict(self)
        data["protocol"]["cpus"] = list(self.protocol.cpus)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Latency:
        return cls(**{**data, "protocol": LatencyProtocol.from_json(data["protocol"])})


@dataclass(frozen=True)
class Evaluation:
    """Everything known about one candidate: the plan and what it measured."""

    plan: Plan
    quality: float
    """Quality metric of the pruned (and recovered) model; higher is better."""
    metric: str
    latency: Latency
    """Measured latency with its protocol; ``latency.ratio`` is candidate/base from interleaved runs."""
    macs: int
    params: int
    nonzero_params: int
    size_bytes: int
    compressed_bytes: int
    reward: float
    reward_terms: dict[str, float]
    timings: dict[str, float]
    """Seconds spent in each stage: ``prune``, ``recover``, ``evaluate``, ``measure``, ``cost``, ``total``."""
    base_quality: float
    base_latency_ms: float
    base_macs: int
    base_params: int
    index: int = 0
    """Sequence number of this evaluation within its objective (0 is the unpruned model)."""
    stage: str = "search"
    """``search`` for candidates as evaluated in the loop, ``finetuned`` after the final fine-tuning stage."""
    extra: dict[str, Any] = field(default_factory=dict)
    test_quality: float | None = None
    """Quality on the held-out test split, measured for delivered models only (fine-tuned points, ``prune``);
    ``None`` for search candidates and when the dataset has no test split."""
    base_test_quality: float | None = None
    """The unpruned model's quality on the same test split (set with ``test_quality``)."""

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def latency_ratio(self) -> float:
        """Candidate/base latency: the interleaved ratio when available, else the ratio of medians."""
        return self.latency.ratio_to(self.base_latency_ms)

    @property
    def speedup(self) -> float:
        return 1.0 / self.latency_ratio if self.latency_ratio else float("inf")

    @property
    def latency_ms(self) -> float:
        """Latency in ms on the base model's time scale (base median x interleaved ratio)."""
        return self.base_latency_ms * self.latency_ratio

    @property
    def storage_bytes(self) -> int:
        """Bytes to ship the weights: the file for structured plans, compressed for unstructured ones."""
        return self.compressed_bytes if self.plan.method == "unstructured" else self.size_bytes

    @property
    def quality_drop(self) -> float:
        """Relative quality loss versus the unpruned model (0.01 = 1% worse)."""
        return (self.base_quality - self.quality) / abs(self.base_quality) if self.base_quality else 0.0

    @property
    def test_quality_drop(self) -> float | None:
        """Relative quality loss on the held-out test split, when it was measured."""
        if self.test_quality is None or not self.base_test_quality:
            return None
        return (self.base_test_quality - self.test_quality) / abs(self.base_test_quality)

    # -- JSON ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["plan"] = self.plan.to_json()
        data["latency"] = self.latency.to_json()
        data["derived"] = {
            "latency_ratio": self.latency_ratio,
            "latency_ms": self.latency_ms,
            "speedup": self.speedup,
            "storage_bytes": self.storage_bytes,
            "quality_drop": self.quality_drop,
            "test_quality_drop": self.test_quality_drop,
        }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evaluation:
        fields = {k: v for k, v in data.items() if k != "derived"}
        fields["plan"] = Plan.from_json(data["plan"])
        fields["latency"] = Latency.from_json(data["latency"])
        return cls(**fields)
