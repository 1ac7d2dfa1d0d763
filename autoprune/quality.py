"""Quality metrics of a (pruned) model on a dataset's validation split. Higher is better for every metric.

* :class:`Accuracy` — top-1 accuracy on labels, in ``[0, 1]``.
* :class:`Agreement` — label-free: fraction of samples whose top-1 prediction matches the reference's.
* :class:`KLFidelity` — label-free: ``exp(-mean KL(reference ‖ model))`` on softmax outputs, in ``(0, 1]``.
* :class:`CosineFidelity` — label-free, for any output (embeddings, feature maps): mean cosine similarity of
  flattened outputs, mapped from ``[-1, 1]`` to ``[0, 1]`` as ``(1 + cos) / 2`` so that every metric shares
  the range ``[0, 1]`` (identical direction → 1, orthogonal → 0.5, opposite → 0).
* :class:`CallableMetric` — wraps a user function ``fn(model) -> float``.

Metrics run the model in eval mode under ``torch.no_grad()`` and restore every module's previous mode.
Outputs that are not finite count as wrong (accuracy, agreement), as fidelity 0 (KL) or as opposite
direction (cosine), so a broken candidate scores low instead of producing NaN.

The reference model's outputs are computed once per (reference, dataset) and cached in a
:class:`ReferenceOutputs` (weakly keyed, invalidated when the reference's weights change in place).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.cost import eval_mode
from autoprune.data import Dataset, as_output_tensor, model_device
from autoprune.errors import DatasetError, InvalidConfigError, ShapeMismatchError
from autoprune.inputs import call_model, to_device

__all__ = [
    "Accuracy",
    "Agreement",
    "CallableMetric",
    "CosineFidelity",
    "KLFidelity",
    "QualityMetric",
    "ReferenceOutputs",
    "eval_mode",
    "get_metric",
    "metric_names",
    "model_outputs",
]

DEFAULT_BATCH_SIZE = 256


@runtime_checkable
class QualityMetric(Protocol):
    """A score of a model on a dataset's validation split; higher is better."""

    name: str

    def __call__(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        reference: nn.Module | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> float: ...


def model_outputs(model: nn.Module, dataset: Dataset, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The model's outputs on the whole validation split, concatenated on the CPU (eval mode, no grad)."""
    device = model_device(model)
    chunks: list[torch.Tensor] = []
    with eval_mode(model), torch.no_grad():
        for x, _ in dataset.val_batches(batch_size):
            chunks.append(as_output_tensor(call_model(model, to_device(x, device))).detach().float().cpu())
    out = torch.cat(chunks)
    if out.ndim == 0 or out.shape[0] != dataset.num_val:
        raise ShapeMismatchError(
            f"model returned {tuple(out.shape)} in total for {dataset.num_val} validation samples; the first "
            "dimension of the output must be the batch"
        )
    return out


def _fingerprint(model: nn.Module) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    # data_ptr catches replaced tensors, _version catches in-place updates (optimizer steps, pruning).
    return tuple((t.data_ptr(), int(t._version), tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))


class ReferenceOutputs:
    """Cache of a reference model's validation outputs, one entry per (reference, dataset).

    Keys are weak: entries disappear with the model or the dataset. An entry is recomputed when the
    reference's parameters or buffers were replaced or modified in place since it was computed. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary[Dataset, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, reference: nn.Module, dataset: Dataset, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
        """The reference's outputs on ``dataset``'s validation split (computed on first use)."""
        fp = _fingerprint(reference)
        with self._lock:
            per_model = self._entries.setdefault(reference, weakref.WeakKeyDictionary())
            hit = per_model.get(dataset)
            if hit is not None and hit[0] == fp:
                out: torch.Tensor = hit[1]
                return out
            out = model_outputs(reference, dataset, batch_size=batch_size)
            per_model[dataset] = (fp, out)
            return out

    def clear(self) -> None:
        """Forget every cached output."""
        with self._lock:
            self._entries = weakref.WeakKeyDictionary()


_DEFAULT_CACHE = ReferenceOutputs()


def _need_reference(metric: str, reference: nn.Module | None) -> nn.Module:
    if reference is None:
        raise InvalidConfigError(f"metric {metric!r} compares with a reference model; pass reference=")
    return reference


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)


def _check_logits(metric: str, out: torch.Tensor) -> None:
    if out.ndim != 2:
        raise ShapeMismatchError(f"metric {metric!r} needs (N, K) class scores; the model returned {tuple(out.shape)}")


def _paired(
    metric: str,
    model: nn.Module,
    dataset: Dataset,
    reference: nn.Module,
    batch_size: int,
    cache: ReferenceOutputs,
) -> tuple[torch.Tensor, torch.Tensor]:
    ref = cache.get(reference, dataset, batch_size=batch_size)
    out = model_outputs(model, dataset, batch_size=batch_size)
    if out.shape != ref.shape:
        raise ShapeMismatchError(
            f"metric {metric!r}: the model returned {tuple(out.shape)} but the reference {tuple(ref.shape)}"
        )
    return out, ref


class Accuracy:
    """Top-1 accuracy on the validation labels, in ``[0, 1]``. Needs a labelled dataset."""

    name = "accuracy"

    def __call__(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        reference: nn.Module | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> float:
        if dataset.y_val is None:
            raise DatasetError(
                f"accuracy needs labels but dataset {dataset.name!r} has none; use 'agreement', 'kl' or 'cosine'"
            )
        out = model_outputs(model, dataset, batch_size=batch_size)
        _check_logits(self.name, out)
        correct = (out.argmax(dim=1) == dataset.y_val) & _finite_rows(out)
        return float(correct.float().mean())

    def __repr__(self) -> str:
        return "Accuracy()"


class _Fidelity:
    """A label-free metric: the model's validation outputs scored against the reference model's (cached)."""

    name = ""

    def __init__(self, *, cache: ReferenceOutputs | None = None) -> None:
        self.cache = cache or _DEFAULT_CACHE

    def __call__(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        reference: nn.Module | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> float:
        ref_model = _need_reference(self.name, reference)
        out, ref = _paired(self.name, model, dataset, ref_model, batch_size, self.cache)
        return self.score(out, ref)

    def score(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        """The metric of outputs ``out`` against the reference outputs ``ref`` (one row per sample)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Agreement(_Fidelity):
    """Fraction of validation samples whose top-1 class matches the reference model's, in ``[0, 1]``."""

    name = "agreement"

    def score(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        _check_logits(self.name, out)
        same = (out.argmax(dim=1) == ref.argmax(dim=1)) & _finite_rows(out)
        return float(same.float().mean())


class KLFidelity(_Fidelity):
    """``exp(-mean_i KL(softmax(ref_i / T) ‖ softmax(model_i / T)))``, in ``(0, 1]``; 1 means identical
    output distributions."""

    name = "kl"

    def __init__(self, *, temperature: float = 1.0, cache: ReferenceOutputs | None = None) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise InvalidConfigError(f"temperature must be a positive number, got {temperature}")
        super().__init__(cache=cache)
        self.temperature = float(temperature)

    def score(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        _check_logits(self.name, out)
        if not bool(_finite_rows(out).all()):
            return 0.0
        log_p = F.log_softmax(out.double() / self.temperature, dim=1)
        log_q = F.log_softmax(ref.double() / self.temperature, dim=1)
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
        return float(torch.exp(-kl.clamp_min(0.0)))

    def __repr__(self) -> str:
        return f"KLFidelity(temperature={self.temperature})"


class CosineFidelity(_Fidelity):
    """Mean cosine similarity between flattened model and reference outputs, mapped to ``[0, 1]`` as
    ``(1 + cos) / 2``. Works for any output shape (logits, embeddings, feature maps)."""

    name = "cosine"

    def score(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        a = out.reshape(out.shape[0], -1).double()
        b = ref.reshape(ref.shape[0], -1).double()
        cos = F.cosine_similarity(a, b, dim=1, eps=1e-12)
        cos = torch.where(_finite_rows(out) & torch.isfinite(cos), cos, torch.full_like(cos, -1.0))
        return float(((1.0 + cos.clamp(-1.0, 1.0)) / 2.0).mean())


class CallableMetric:
    """A user function ``fn(model) -> float`` (higher is better) used as a metric. The model is in eval mode
    while ``fn`` runs (the previous modes are restored); ``dataset``, ``reference`` and ``batch_size`` are
    not passed on.

    ``fn`` may also return a mapping of several metrics (``{"f1": .., "loss": ..}``): ``key`` names the one
    that is the objective (higher is better; a mapping of one entry needs no key), :meth:`evaluate_all`
    returns all of them so they can be recorded. ``name`` defaults to ``key``."""

    def __init__(self, fn: Callable[[nn.Module], Any], name: str | None = None, *, key: str | None = None) -> None:
        if not callable(fn):
            raise InvalidConfigError(f"CallableMetric needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.key = key
        self.name = name or key or "custom"

    def _number(self, value: Any, what: str) -> float:
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise InvalidConfigError(f"metric {what!r} returned {value!r}, not a number") from e

    def evaluate_all(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        """The objective's value and every metric ``fn`` returned (empty when it returned one number)."""
        with eval_mode(model):
            value = self.fn(model)
        if not isinstance(value, Mapping):
            return self._number(value, self.name), {}
        metrics = {str(k): self._number(v, f"{self.name}[{k!r}]") for k, v in value.items()}
        key = self.key
        if key is None:
            if len(metrics) != 1:
                raise InvalidConfigError(
                    f"the evaluate function returned several metrics ({', '.join(metrics)}); name the one to "
                    "optimise with metric=<its key>"
                )
            key = next(iter(metrics))
        if key not in metrics:
            raise InvalidConfigError(
                f"the evaluate function returned {', '.join(metrics) or 'no metrics'} but not {key!r}, the metric "
                "to optimise; pass metric=<one of its keys>"
            )
        return metrics[key], metrics

    def __call__(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        reference: nn.Module | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> float:
        return self.evaluate_all(model)[0]

    def __repr__(self) -> str:
        return f"CallableMetric({self.fn!r}, name={self.name!r})"


_METRICS: dict[str, Callable[..., QualityMetric]] = {
    "accuracy": Accuracy,
    "agreement": Agreement,
    "kl": KLFidelity,
    "cosine": CosineFidelity,
}


def metric_names() -> list[str]:
    """Names accepted by :func:`get_metric`."""
    return list(_METRICS)


def get_metric(name: str, **kwargs: Any) -> QualityMetric:
    """The built-in metric called ``name`` (case-insensitive): ``accuracy``, ``agreement``, ``kl``
    (``temperature=`` accepted) or ``cosine``. Unknown names raise :class:`InvalidConfigError`."""
    factory = _METRICS.get(str(name).strip().lower())
    if factory is None:
        raise InvalidConfigError(f"unknown quality metric {name!r}; choose one of {', '.join(_METRICS)}")
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise InvalidConfigError(f"bad options for metric {name!r}: {e}") from e
