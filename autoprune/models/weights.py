"""Model weights as safetensors: never pickle, never ``torch.load``.

Tied parameters (one tensor under several names) are written once under the first name and restored
through the model's own aliasing on load, the way ``safetensors.torch.save_model`` / ``load_model`` do.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from autoprune.errors import CorruptFileError, InvalidModelError

__all__ = ["load_weights", "save_weights", "weights_from_bytes", "weights_to_bytes"]

_SHOWN = 3  # offending keys named per category in error messages


def _alias_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names that refer to exactly the same tensor view (tied weights), in state-dict order."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, t in state.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for names in _alias_groups(state):
        for name in names[1:]:
            del state[name]
    # Anything still sharing storage (partial views) or not contiguous is copied: safetensors refuses both.
    storages: dict[tuple[object, int], int] = {}
    for t in state.values():
        if t.numel():
            k = (t.device, t.untyped_storage().data_ptr())
            storages[k] = storages.get(k, 0) + 1
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach()
        shared = t.numel() > 0 and storages[(t.device, t.untyped_storage().data_ptr())] > 1
        out[name] = t.clone().contiguous() if shared or not t.is_contiguous() else t
    return {k: v.cpu() for k, v in out.items()}


def save_weights(model: nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s state dict to ``path`` as safetensors (atomically: temp file, then rename)."""
    target = Path(path)
    tensors = _tensors_to_save(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def weights_to_bytes(model: nn.Module, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """``model``'s state dict as safetensors bytes (for storing in a database)."""
    return safetensors.torch.save(_tensors_to_save(model), metadata={"format": "pt", **(metadata or {})})


def _read(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(source, bytes | bytearray | memoryview):
        label = f"<{len(source)} bytes>"
        try:
            return label, safetensors.torch.load(bytes(source))
        except Exception as exc:
            raise CorruptFileError(f"cannot read safetensors weights from {label}: {_one_line(exc)}") from exc
    label = os.fspath(source)
    if not os.path.isfile(label):
        raise CorruptFileError(f"cannot read safetensors weights {label}: no such file")
    try:
        return label, safetensors.torch.load_file(label, device="cpu")
    except Exception as exc:
        raise CorruptFileError(f"cannot read safetensors weights {label}: {_one_line(exc)}") from exc


def weights_from_bytes(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes into CPU tensors; :class:`CorruptFileError` if they are not safetensors."""
    return _read(data)[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", +{len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def load_weights(
    model: nn.Module,
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    strict: bool = True,
) -> nn.Module:
    """Load safetensors weights (a file path or the file's bytes) into ``model`` in place and return it.

    Raises :class:`CorruptFileError` when the source cannot be read as safetensors, and
    :class:`InvalidModelError` when tensor shapes differ from the model's or, with ``strict``, when keys are
    missing or unexpected (tied parameters saved once count as present).
    """
    label, tensors = _read(path_or_bytes)
    expected = model.state_dict()
    aliases: dict[str, list[str]] = {}
    for names in _alias_groups(expected):
        for name in names:
            aliases[name] = names
    missing = [k for k in expected if k not in tensors and not any(a in tensors for a in aliases.get(k, ()))]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k} file {_shape(tensors[k])} vs model {_shape(expected[k])}"
        for k in tensors
        if k in expected and tensors[k].shape != expected[k].shape
    ]
    problems: list[str] = []
    if mismatched:
        problems.append(f"shape mismatch: {_listed(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if problems:
        raise InvalidModelError(f"weights in {label} do not fit {type(model).__name__}: {'; '.join(problems)}")
    try:
        model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise InvalidModelError(f"weights in {label} do not fit {type(model).__name__}: {_one_line(exc)}") from exc
    return model
