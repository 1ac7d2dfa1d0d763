"""Architecture registry: build models by name, from the built-in zoo, Python registrations or entry points.

Name resolution (names are case-insensitive and stripped):

1. built-ins (:mod:`autoprune.models.zoo`) always win;
2. then architectures added with :func:`register_architecture` (registering a built-in name raises);
3. then the ``autoprune.architectures`` entry point group, read lazily when a name is not found above or
   when listing. An entry point named like a built-in or a registered architecture is shadowed (and a
   :class:`RuntimeWarning` says so when architectures are listed); it is never loaded.

An entry point's value is a callable ``(**kwargs) -> nn.Module``; operators declare it in their own package::

    [project.entry-points."autoprune.architectures"]
    mynet = "mypkg.models:build_mynet"

Models should expose ``example_input_shape`` (without the batch dimension) and optionally
``example_input_dtype`` so :func:`example_inputs` can build inputs for tracing and measurement.
"""

from __future__ import annotations

import difflib
import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn

from autoprune.errors import AutopruneError, InvalidConfigError, InvalidModelError, UnknownArchitectureError
from autoprune.models import zoo
from autoprune.names import MAX_BUILTIN_INPUT, MAX_BUILTIN_PARAMS

__all__ = [
    "ENTRY_POINT_GROUP",
    "ArchitectureSpec",
    "Builder",
    "build_model",
    "example_inputs",
    "list_architectures",
    "register_architecture",
    "unregister_architecture",
]

ENTRY_POINT_GROUP = "autoprune.architectures"

Builder = Callable[..., nn.Module]

_BUILTINS: dict[str, Builder] = {
    "resnet20": zoo.resnet20,
    "resnet32": zoo.resnet32,
    "resnet44": zoo.resnet44,
    "resnet56": zoo.resnet56,
    "mobilenetv2": zoo.mobilenetv2,
    "vgg": zoo.vgg,
    "mlp": zoo.mlp,
    "cnn1d": zoo.cnn1d,
    "transformer": zoo.transformer,
    "lstm": zoo.lstm,
    "gru": zoo.gru,
}

_REGISTERED: dict[str, Builder] = {}


def _key(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UnknownArchitectureError(f"architecture name must be a non-empty string, got {name!r}")
    return name.strip().lower()


def _entry_points() -> dict[str, metadata.EntryPoint]:
    """The group's entry points by lower-cased name (not loaded; the first of duplicate names wins)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name.strip().lower(), ep)
    return found


def _warn_shadowed(key: str, ep: metadata.EntryPoint) -> None:
    warnings.warn(
        f"entry point {ep.name!r} = {ep.value!r} in group {ENTRY_POINT_GROUP!r} is shadowed by the "
        f"{'built-in' if key in _BUILTINS else 'registered'} architecture of the same name",
        RuntimeWarning,
        stacklevel=3,
    )


def register_architecture(name: str, builder: Builder, *, overwrite: bool = False) -> None:
    """Make ``builder(**kwargs) -> nn.Module`` buildable as ``name`` (case-insensitive).

    Raises :class:`InvalidConfigError` when ``name`` is a built-in, when ``builder`` is not callable, or when
    ``name`` is already registered and ``overwrite`` is false.
    """
    key = _key(name)
    if not callable(builder):
        raise InvalidConfigError(f"architecture {name!r}: builder must be callable, got {builder!r}")
    if key in _BUILTINS:
        raise InvalidConfigError(f"architecture {name!r} is built in and cannot be replaced")
    if key in _REGISTERED and not overwrite:
        raise InvalidConfigError(f"architecture {name!r} is already registered (pass overwrite=True)")
    _REGISTERED[key] = builder


def unregister_architecture(name: str) -> None:
    """Remove an architecture added with :func:`register_architecture` (no error if absent)."""
    _REGISTERED.pop(_key(name), None)


def list_architectures() -> list[str]:
    """Sorted names of every buildable architecture: built-ins, registered ones and entry points."""
    names = set(_BUILTINS) | set(_REGISTERED)
    for key, ep in _entry_points().items():
        if key in names:
            _warn_shadowed(key, ep)
        names.add(key)
    return sorted(names)


def _resolve(name: str) -> tuple[str, Builder]:
    key = _key(name)
    if key in _BUILTINS:
        return key, _BUILTINS[key]
    if key in _REGISTERED:
        return key, _REGISTERED[key]
    eps = _entry_points()
    ep = eps.get(key)
    if ep is None:
        available = sorted(set(_BUILTINS) | set(_REGISTERED) | set(eps))
        close = difflib.get_close_matches(key, available, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownArchitectureError(f"unknown architecture {name!r}{hint} (available: {', '.join(available)})")
    try:
        builder = ep.load()
    except Exception as exc:
        raise InvalidModelError(
            f"architecture {name!r}: entry point {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(builder):
        raise InvalidModelError(f"architecture {name!r}: entry point {ep.value!r} is not callable")
    return key, builder


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` with ``kwargs``.

    Raises :class:`UnknownArchitectureError` (with close matches) for an unknown name and
    :class:`InvalidModelError` (one line naming the architecture and the argument) for bad kwargs, a
    builder that fails or does not return an ``nn.Module``, and a built-in asked to be larger than
    :data:`~autoprune.names.MAX_BUILTIN_PARAMS` parameters or :data:`~autoprune.names.MAX_BUILTIN_INPUT` input
    elements (counted before anything is allocated).
    """
    key, builder = _resolve(name)
    if key in _BUILTINS and kwargs:  # the defaults are small; the meta build's first call costs ~1.5 s of imports
        _check_size(key, builder, kwargs)
    try:
        model = builder(**kwargs)
    except AutopruneError:
        raise
    except TypeError as exc:  # unexpected/missing keyword: the message names it
        raise InvalidModelError(f"{key}: invalid arguments: {exc}") from exc
    except Exception as exc:  # operator builders may raise anything; keep the message one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InvalidModelError(f"{key}: build failed: {type(exc).__name__}: {first_line}") from exc
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"{key}: builder returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_size(key: str, builder: Builder, kwargs: Mapping[str, Any]) -> None:
    """A built-in's size with ``kwargs``, counted on the meta device (nothing allocated): InvalidModelError past
    :data:`~autoprune.names.MAX_BUILTIN_PARAMS` parameters or :data:`~autoprune.names.MAX_BUILTIN_INPUT` input
    elements per sample; the builder's own argument errors are left to the real build."""
    try:
        with torch.device("meta"):
            probe = builder(**kwargs)
    except Exception:  # bad arguments: the real build names them
        return
    params = sum(p.numel() for p in probe.parameters())
    if params > MAX_BUILTIN_PARAMS:
        raise InvalidModelError(
            f"{key}: these arguments make a model of {params:,} parameters, more than the {MAX_BUILTIN_PARAMS:,} "
            f"a built-in architecture may have ({json.dumps(dict(kwargs), default=str)[:200]})"
        )
    shape = tuple(int(d) for d in getattr(probe, "example_input_shape", None) or ())
    elements = math.prod(shape) if shape else 0
    if elements > MAX_BUILTIN_INPUT:
        raise InvalidModelError(
            f"{key}: these arguments make an input of {elements:,} elements per sample (shape {shape}), "
            f"more than the {MAX_BUILTIN_INPUT:,} a built-in architecture may take"
        )


def example_inputs(model: nn.Module, batch_size: int = 1, *, seed: int = 0) -> torch.Tensor:
    """A deterministic example batch for ``model``: ``(batch_size, *model.example_input_shape)``.

    Floating dtypes get standard-normal values, integer dtypes token ids in ``[0, model.vocab_size)`` (zeros
    when the model has no ``vocab_size``), both drawn from a private generator seeded with ``seed``. A model
    without ``example_input_shape`` but with an ``example_input`` tensor gets that tensor repeated to
    ``batch_size``. The batch is placed on the device of the model's first parameter or buffer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    shape = getattr(model, "example_input_shape", None)
    if shape is None:
        given = getattr(model, "example_input", None)
        if isinstance(given, torch.Tensor) and given.dim() >= 1:
            # `example_input` has a batch dimension of its own; take its first sample.
            return given[:1].expand(batch_size, *given.shape[1:]).clone().to(device)
        raise InvalidModelError(
            f"{type(model).__name__} has no example_input_shape attribute; set it to the input shape "
            "without the batch dimension"
        )
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise InvalidModelError(f"{type(model).__name__}.example_input_shape is not a shape: {shape!r}") from exc
    dtype = getattr(model, "example_input_dtype", torch.float32)
    if not isinstance(dtype, torch.dtype):
        raise InvalidModelError(f"{type(model).__name__}.example_input_dtype is not a torch.dtype: {dtype!r}")
    gen = torch.Generator().manual_seed(seed)
    size = (batch_size, *dims)
    if dtype.is_floating_point:
        x = torch.randn(size, generator=gen, dtype=dtype)
    elif dtype == torch.bool:
        x = torch.zeros(size, dtype=dtype)
    else:
        vocab = getattr(model, "vocab_size", None)
        high = vocab if isinstance(vocab, int) and vocab > 0 else 1
        x = torch.randint(0, high, size, generator=gen, dtype=dtype)
    return x.to(device)


@dataclass(frozen=True)
class ArchitectureSpec:
    """A JSON-able recipe for a model: an architecture name and its builder kwargs.

    ``kwargs`` are normalised through JSON at construction (tuples become lists), so
    ``ArchitectureSpec.from_json(spec.to_json()) == spec``; kwargs that JSON cannot hold raise
    :class:`InvalidConfigError`.
    """

    name: str
    """Architecture name (stored lower-cased)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the builder; JSON values only."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidConfigError(f"architecture name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise InvalidConfigError(f"{self.name}: kwargs must be a mapping with string keys")
        try:
            normalised = json.loads(json.dumps(dict(self.kwargs), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidConfigError(f"{self.name}: kwargs are not JSON-serialisable: {exc}") from exc
        object.__setattr__(self, "name", self.name.strip().lower())
        object.__setattr__(self, "kwargs", normalised)

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.kwargs, sort_keys=True)))

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "kwargs": {...}}``, a fresh JSON-able dict."""
        return {"name": self.name, "kwargs": json.loads(json.dumps(self.kwargs))}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArchitectureSpec:
        """Inverse of :meth:`to_json`; raises :class:`InvalidConfigError` on a malformed dict."""
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"architecture spec must be an object, got {type(data).__name__}")
        extra = set(data) - {"name", "kwargs"}
        if extra or "name" not in data:
            raise InvalidConfigError(
                f"architecture spec needs 'name' and optional 'kwargs' (unexpected: {sorted(extra)})"
            )
        kwargs = data.get("kwargs")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise InvalidConfigError(f"architecture spec 'kwargs' must be an object, got {kwargs!r}")
        return cls(name=data["name"], kwargs=dict(kwargs))

    def build(self) -> nn.Module:
        """``build_model(self.name, **self.kwargs)``."""
        return build_model(self.name, **self.kwargs)
