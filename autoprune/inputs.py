"""Model inputs in the three forms users bring, and the few operations every part of the library needs on them.

:data:`Inputs` is one tensor (``model(x)``), a tuple of tensors (positional arguments, ``model(*xs)``) or a
mapping of names to tensors (keyword arguments, ``model(**kw)``: a ``dict`` or a HuggingFace ``BatchEncoding``,
which :func:`as_inputs` turns into a plain ``dict`` keeping the key order). Every tensor's first dimension is
the batch.

Everything that runs a model (tracing, MACs, metrics, recovery, latency runtimes, exports) goes through
:func:`call_model`, and everything that reshapes a batch through :func:`take`, :func:`batched`,
:func:`to_device`, so the three forms work the same everywhere. ONNX export of named inputs goes through
:class:`KeywordsAsPositional` (the exporters take positional arguments); the ONNX graph's inputs carry the
mapping's names, and :func:`ort_feed <autoprune.runtime.ort_feed>` feeds them by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autoprune.errors import InvalidConfigError

__all__ = [
    "Inputs",
    "KeywordsAsPositional",
    "as_inputs",
    "batch_len",
    "batched",
    "call_model",
    "cycled",
    "describe",
    "input_names",
    "is_named",
    "map_tensors",
    "signature",
    "split_batch",
    "take",
    "tensors",
    "to_device",
    "tracing_inputs",
]

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]
"""One tensor, a tuple of positional tensors, or a mapping of keyword tensors."""


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "__array__") and not isinstance(value, str | bytes):
        import numpy as np

        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return torch.from_numpy(np.ascontiguousarray(array))
    raise InvalidConfigError(f"{what} must be a tensor, got {type(value).__name__}")


def as_inputs(value: Any, what: str = "inputs") -> Inputs:
    """``value`` as :data:`Inputs`: a tensor stays one, a list or tuple becomes a tuple, any mapping (a
    ``BatchEncoding`` too) a plain ``dict`` with the same order; numpy arrays become tensors. Anything else,
    an empty tuple or mapping, or a non-string key is :class:`InvalidConfigError` naming ``what``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        keys = list(value.keys())
        if not keys:
            raise InvalidConfigError(f"{what} is an empty mapping: name at least one input tensor")
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise InvalidConfigError(f"{what}: keyword inputs need string names, got {bad[0]!r}")
        return {k: _tensor(value[k], f"{what}[{k!r}]") for k in keys}
    if isinstance(value, tuple | list):
        if not value:
            raise InvalidConfigError(f"{what} is empty: give a tensor, a tuple of tensors or a dict of tensors")
        return tuple(_tensor(v, f"{what}[{i}]") for i, v in enumerate(value))
    try:
        return _tensor(value, what)
    except InvalidConfigError:
        raise InvalidConfigError(
            f"{what} must be a tensor, a tuple of tensors or a dict of tensors, got {type(value).__name__}"
        ) from None


def is_named(inputs: Inputs) -> bool:
    """Whether ``inputs`` are keyword inputs (a mapping)."""
    return isinstance(inputs, Mapping)


def tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The tensors of ``inputs`` in order (a mapping's values in key order)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Mapping):
        return tuple(inputs.values())
    return tuple(inputs)


def input_names(inputs: Inputs) -> list[str]:
    """A mapping's keys, else ``input``, ``input_1``, ``input_2``...: the names of the ONNX graph's inputs."""
    if isinstance(inputs, Mapping):
        return list(inputs)
    return [f"input_{i}" if i else "input" for i in range(len(tensors(inputs)))]


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(x)``, ``model(*xs)`` or ``model(**kw)`` for the three forms of inputs."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def map_tensors(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor, in the same form."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(t) for t in inputs)


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` moved to ``device`` (tensors already there are not copied)."""
    return map_tensors(inputs, lambda t: t.to(device))


def batch_len(inputs: Inputs) -> int:
    """The batch size: the first dimension of the first tensor."""
    first = tensors(inputs)[0]
    if first.ndim == 0:
        raise InvalidConfigError("inputs need a batch dimension; got a 0-dimensional tensor")
    return int(first.shape[0])


def take(inputs: Inputs, index: slice | torch.Tensor) -> Inputs:
    """The samples ``index`` selects (a slice or an index tensor) of every tensor."""
    return map_tensors(inputs, lambda t: t[index])


def batched(inputs: Inputs, batch_size: int) -> Inputs:
    """``inputs`` resized to ``batch_size`` along dim 0 by repeating the first sample (contiguous copies)."""
    return map_tensors(inputs, lambda t: t[:1].expand(batch_size, *t.shape[1:]).contiguous())


def cycled(inputs: Inputs, batch_size: int) -> Inputs:
    """``batch_size`` samples cycled from ``inputs``; values are kept as they are (token ids stay valid)."""
    return map_tensors(inputs, lambda t: t.repeat(-(-batch_size // t.shape[0]), *([1] * (t.ndim - 1)))[:batch_size])


def describe(inputs: Inputs) -> str:
    """Shapes without the batch, for messages: ``(N, 1, 8, 8)`` or ``{input_ids: (N, 12) int64, ...}``."""

    def one(t: torch.Tensor) -> str:
        return "(N" + "".join(f", {d}" for d in t.shape[1:]) + ")"

    if isinstance(inputs, torch.Tensor):
        return one(inputs)
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {one(v)} {str(v.dtype).removeprefix('torch.')}" for k, v in inputs.items()) + "}"
    return "(" + ", ".join(one(t) for t in inputs) + ")"


def signature(inputs: Inputs) -> list[str]:
    """Per-sample shapes, dtypes and names: equal for inputs that run the same computation shapes."""
    if isinstance(inputs, Mapping):
        return [repr((n, tuple(t.shape[1:]), str(t.dtype))) for n, t in inputs.items()]
    return [repr((tuple(t.shape[1:]), str(t.dtype))) for t in tensors(inputs)]


def tracing_inputs(inputs: Inputs) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """What Torch-Pruning's ``DependencyGraph.build_dependency(example_inputs=...)`` calls the model with: a
    plain ``dict`` for keyword inputs (it tests ``isinstance(.., dict)``), else a tuple of positional tensors."""
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return tensors(inputs)


def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, labels)`` of one batch as users give them: a tensor or a mapping (no labels), or an
    ``(x, y)`` pair (``y`` may be ``None``); a 1-tuple is ``(x,)``."""
    if isinstance(batch, torch.Tensor | Mapping):
        return as_inputs(batch), None
    if isinstance(batch, tuple | list) and 1 <= len(batch) <= 2:
        y = batch[1] if len(batch) == 2 else None
        return as_inputs(batch[0], "a batch's inputs"), None if y is None else _tensor(y, "a batch's labels")
    raise InvalidConfigError(
        f"a batch must be a tensor, a dict of tensors or an (x, y) pair, got {type(batch).__name__}"
        + (f" of {len(batch)} items" if isinstance(batch, Sequence) else "")
    )


class KeywordsAsPositional(nn.Module):
    """``model`` called with positional tensors that it receives as the keyword arguments ``names``.

    The ONNX exporters trace positional arguments; wrapping a model that takes ``model(**inputs)`` lets the
    graph's inputs be named after the mapping's keys (``input_ids``, ``attention_mask``...)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))
