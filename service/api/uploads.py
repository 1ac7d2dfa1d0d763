"""Streamed uploads and their validation, without torch and without ever unpickling.

The body is read from ``request.stream()`` into a temporary file while counting bytes: a declared
``Content-Length`` over the limit is refused at once, and a body that grows past it is refused as soon as it does
(413), before the rest is taken. Then the file is checked by its format:

* ``.safetensors``: the 8-byte little-endian header length and the JSON header are parsed here; every tensor's
  dtype, shape and byte range is checked, and the byte ranges must tile the data section exactly.
* ``.pt2``: a zip file holding exactly the entries ``torch.export.save`` writes, under one top-level folder
  (the same allow-list as :mod:`autoprune.models.pt2`, which a test keeps in step); a ``torch.save`` zip
  (``data.pkl``), pickled custom objects, AOTInductor binaries or anything unknown are refused. Nothing in it is
  deserialised here; the worker's loader reads it without unpickling either.
* ``.npz``: ``np.load(..., allow_pickle=False)``; object arrays (which would need unpickling) are refused; the
  array layout must be one that :func:`autoprune.data.load_dataset` accepts.

Only then is the file moved into the content-addressed artefact store.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoprune.errors import CorruptFileError
from autoprune.models.pt2_archive import archive_entries
from autoprune.names import MAX_CLASSES, MIN_PER_SPLIT
from service.api.problems import Problem
from service.artefacts import TooLarge

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_INFLATED_BYTES = 16 * 1024**3  # declared uncompressed size of a zip upload (pt2 weights, npz arrays)

# --- safetensors -----------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


class UploadInvalid(Exception):
    """The file is not what it claims to be (the API answers 422, or 415 when the format is unrecognisable)."""

    def __init__(self, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file; :class:`UploadInvalid` for anything malformed."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UploadInvalid(f"not a safetensors file: {size} bytes is shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise UploadInvalid(
                f"not a safetensors file: its first 8 bytes declare a {n}-byte JSON header in a {size}-byte file"
            )
        raw = fh.read(n)
    if not raw.lstrip(b" ").startswith(b"{"):
        raise UploadInvalid("not a safetensors file: the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UploadInvalid("not a safetensors file: the header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise UploadInvalid("not a safetensors file: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise UploadInvalid("corrupt safetensors file: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise UploadInvalid(f"corrupt safetensors file: the entry of {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise UploadInvalid(f"corrupt safetensors file: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise UploadInvalid(f"corrupt safetensors file: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise UploadInvalid(f"corrupt safetensors file: tensor {name!r} has invalid data offsets {offsets!r}")
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise UploadInvalid(
                f"corrupt safetensors file: tensor {name!r} ({dtype} {shape}) needs {expected} bytes, "
                f"its offsets give {offsets[1] - offsets[0]}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    # the byte ranges must tile the data section: no holes, no overlaps, nothing after the last tensor
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            raise UploadInvalid("corrupt safetensors file: tensor byte ranges overlap or leave holes")
        pos = t.end
    if pos != data_len:
        raise UploadInvalid(
            f"corrupt safetensors file: the tensors cover {pos} bytes but the data section holds {data_len}"
            + (" (truncated?)" if pos > data_len else "")
        )
    return tensors, meta


def check_weights(path: Path) -> dict[str, Any]:
    """Validate a safetensors weights upload; a short description of it."""
    tensors, _ = read_safetensors_header(path)
    if not tensors:
        raise UploadInvalid("the safetensors file holds no tensors")
    return {"tensors": len(tensors), "parameters": sum(math.prod(t.shape) for t in tensors.values())}


# --- .pt2 (torch.export archive) ------------------------------------------------------------------------------


def check_pt2(path: Path) -> dict[str, Any]:
    """Validate a ``.pt2`` upload by its zip directory alone (nothing is deserialised)."""
    if not zipfile.is_zipfile(path):
        raise UploadInvalid(
            "not a .pt2 program: not a zip file (save it with torch.export.save(torch.export.export(model, args)))",
            415,
        )
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                rels = archive_entries(zf, MAX_INFLATED_BYTES)  # the library's allow-list, torch-free
            except CorruptFileError as exc:
                raise UploadInvalid(str(exc)) from None
            graphs = sorted(r for r in rels if r.startswith("models/") and r.endswith(".json"))
            if "archive_format" not in rels or not graphs:
                raise UploadInvalid("not a .pt2 program: no archive_format / models/*.json entries of torch.export")
            fmt = zf.read(rels["archive_format"])[:64].decode("utf-8", "replace").strip()
            if fmt != "pt2":
                raise UploadInvalid(f"not a .pt2 program: archive_format is {fmt!r}, expected 'pt2'")
            for g in graphs:
                if rels[g].file_size > MAX_HEADER_BYTES * 10:
                    raise UploadInvalid(f"the .pt2 graph {g!r} is too large")
                try:
                    doc = json.loads(zf.read(rels[g]))
                except (ValueError, RecursionError):
                    raise UploadInvalid(f"corrupt .pt2 program: {g!r} is not valid JSON") from None
                if not isinstance(doc, dict):
                    raise UploadInvalid(f"corrupt .pt2 program: {g!r} is not a JSON object")
            return {"models": [g[len("models/") : -len(".json")] for g in graphs], "entries": len(rels)}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, ValueError) as exc:
        if isinstance(exc, UploadInvalid):
            raise
        raise UploadInvalid(f"corrupt .pt2 archive: {exc}") from None


# --- datasets (.npz / .safetensors) ----------------------------------------------------------------------------

_KNOWN = ("x", "y", "x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_LABELS = ("y", "y_train", "y_val", "y_test")
_LAYOUTS = "x_train,y_train,x_val,y_val | x,y | x | x_train,x_val | x_train"
_NUMERIC_ST = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64"}
_INT_ST = {"U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: str
    kind: str  # numpy kind: b i u f (c, O, ... are refused)


def _check_layout(arrays: dict[str, ArrayInfo], labels: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The checks of :func:`autoprune.data._dataset_from_arrays` that need no data: names, kinds, shapes."""
    keys = set(arrays) & set(_KNOWN)
    if not keys:
        raise UploadInvalid(f"no known arrays in the dataset (found {sorted(arrays)}); expected one of: {_LAYOUTS}")
    splits = {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}
    if keys & {"x", "y"} and keys & splits:
        raise UploadInvalid(f"the dataset mixes 'x'/'y' with split arrays (found {sorted(keys)})")
    for k in sorted(keys):
        a = arrays[k]
        if a.kind not in "biuf":
            raise UploadInvalid(f"array {k!r} has dtype {a.dtype}; only numeric arrays are accepted")
    pairs: list[tuple[str, str | None]]
    if keys & splits:
        if "x_train" not in keys:
            raise UploadInvalid(f"the dataset has split arrays but no 'x_train' (found {sorted(keys)})")
        if "y_val" in keys and "x_val" not in keys:
            raise UploadInvalid("the dataset has 'y_val' without 'x_val'")
        if "x_val" in keys and ("y_train" in keys) != ("y_val" in keys):
            raise UploadInvalid("the dataset has labels for one split only; give both y_train and y_val or neither")
        if keys & {"x_test", "y_test"} and "x_val" not in keys:
            raise UploadInvalid("the dataset has a test split but no 'x_val'; give x_train, x_val and x_test")
        if "y_test" in keys and "x_test" not in keys:
            raise UploadInvalid("the dataset has 'y_test' without 'x_test'")
        if "x_test" in keys and ("y_train" in keys) != ("y_test" in keys):
            raise UploadInvalid("the dataset labels some splits only; give y_test with y_train and y_val, or none")
        pairs = [("x_train", "y_train" if "y_train" in keys else None)]
        if "x_val" in keys:
            pairs.append(("x_val", "y_val" if "y_val" in keys else None))
        if "x_test" in keys:
            pairs.append(("x_test", "y_test" if "y_test" in keys else None))
    else:
        if "x" not in keys:
            raise UploadInvalid(f"the dataset has 'y' but no 'x' (found {sorted(keys)})")
        pairs = [("x", "y" if "y" in keys else None)]
    samples = 0
    for xk, yk in pairs:
        x = arrays[xk]
        if len(x.shape) < 2 or math.prod(x.shape[1:]) == 0:
            raise UploadInvalid(
                f"{xk} has shape {x.shape}; inputs need a batch dimension and a non-empty feature dimension, "
                "e.g. (N, F), (N, C, L) or (N, C, H, W)"
            )
        least = 2 * MIN_PER_SPLIT if xk == "x" else MIN_PER_SPLIT  # one array is split into train and val
        if x.shape[0] < least:
            raise UploadInvalid(f"{xk} holds {x.shape[0]} sample(s); at least {least} are needed")
        samples += x.shape[0]
        if yk is None:
            continue
        y = arrays[yk]
        if y.kind not in "iu":
            raise UploadInvalid(f"{yk} has dtype {y.dtype}; labels must be integers (class indices 0..K-1)")
        if len(y.shape) != 1:
            raise UploadInvalid(f"{yk} has shape {y.shape}; labels must be 1-D class indices")
        if y.shape[0] != x.shape[0]:
            raise UploadInvalid(f"{yk} has {y.shape[0]} labels but {xk} has {x.shape[0]} samples")
        low, high = labels.get(yk, (0, 0))
        if low < 0:
            raise UploadInvalid(f"{yk} contains negative labels (min {low}); labels must be >= 0")
        if high >= MAX_CLASSES:
            raise UploadInvalid(
                f"{yk} has labels up to {high}: more than the {MAX_CLASSES} classes accepted (labels are class "
                "indices 0..K-1)"
            )
    return {
        "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in sorted(arrays.items())},
        "samples": samples,
        "labelled": any(yk is not None for _, yk in pairs),
        "input_shape": list(arrays[pairs[0][0]].shape[1:]),
    }


def check_npz(path: Path) -> dict[str, Any]:
    """Validate an ``.npz`` dataset with ``np.load(allow_pickle=False)`` (object arrays are refused)."""
    if not zipfile.is_zipfile(path):
        raise UploadInvalid("not an .npz archive (a zip of .npy arrays, as np.savez writes)", 415)
    try:
        with zipfile.ZipFile(path) as zf:
            if sum(i.file_size for i in zf.infolist()) > MAX_INFLATED_BYTES:
                raise UploadInvalid("the .npz archive declares more uncompressed bytes than accepted")
        loaded = np.load(path, allow_pickle=False)
    except UploadInvalid:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UploadInvalid(f"not a readable .npz archive: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UploadInvalid("a single .npy array, not an .npz archive of named arrays")
    arrays: dict[str, ArrayInfo] = {}
    label_range: dict[str, tuple[int, int]] = {}
    try:
        with loaded:
            for key in loaded.files:
                arr = loaded[key]  # ValueError for object arrays: they would need unpickling
                if not isinstance(arr, np.ndarray):  # NpzFile hands out non-.npy members as raw bytes
                    raise UploadInvalid(f"the .npz archive holds {key!r}, which is not a .npy array")
                arrays[key] = ArrayInfo(tuple(int(d) for d in arr.shape), str(arr.dtype), arr.dtype.kind)
                if key in _LABELS and arr.dtype.kind in "iu" and arr.size:
                    label_range[key] = (int(arr.min()), int(arr.max()))
                elif key in _KNOWN and arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
                    raise UploadInvalid(f"array {key!r} contains NaN or infinite values")
                del arr
    except UploadInvalid:
        raise
    except ValueError as exc:
        raise UploadInvalid(
            f"the .npz archive holds an array that needs unpickling, which is refused ({exc})"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as exc:
        raise UploadInvalid(f"damaged .npz archive: {exc}") from None
    if not arrays:
        raise UploadInvalid("the .npz archive holds no arrays")
    return {"format": "npz", **_check_layout(arrays, label_range)}


def check_safetensors_dataset(path: Path) -> dict[str, Any]:
    tensors, _ = read_safetensors_header(path)
    arrays = {
        k: ArrayInfo(
            t.shape,
            t.dtype,
            "b" if t.dtype == "BOOL" else ("i" if t.dtype in _INT_ST else ("f" if t.dtype in _NUMERIC_ST else "c")),
        )
        for k, t in tensors.items()
    }
    label_range: dict[str, tuple[int, int]] = {}
    labels = [k for k in _LABELS if k in arrays and arrays[k].dtype in _INT_ST]
    if labels:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                for k in labels:
                    y = f.get_tensor(k)
                    if y.size:
                        label_range[k] = (int(y.min()), int(y.max()))
        except Exception as exc:  # safetensors' own errors
            raise UploadInvalid(f"corrupt safetensors file: {exc}") from None
    return {"format": "safetensors", **_check_layout(arrays, label_range)}


def sniff_dataset(path: Path) -> str:
    """``npz`` or ``safetensors`` from the first bytes."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK"):
        return "npz"
    if len(head) == 8 and 0 < struct.unpack("<Q", head)[0] <= MAX_HEADER_BYTES:
        return "safetensors"
    raise UploadInvalid("unrecognised dataset file: expected an .npz archive or a .safetensors file", 415)


# --- streaming -------------------------------------------------------------------------------------------------


def declared_length(headers: Any) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise Problem(400, f"invalid Content-Length {raw!r}") from None
    if value < 0:
        raise Problem(400, f"invalid Content-Length {raw!r}")
    return value


@contextlib.asynccontextmanager
async def receive(chunks: AsyncIterator[bytes], headers: Any, *, max_bytes: int, directory: Path) -> Any:
    """Stream a request body into a temporary file (removed on exit); yields (path, size).

    :class:`TooLarge` when ``Content-Length`` exceeds ``max_bytes`` (before reading anything) or as soon as the
    bytes read do.
    """
    declared = declared_length(headers)
    if declared is not None and declared > max_bytes:
        raise TooLarge(max_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".incoming-")
    path = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(max_bytes)
                fh.write(chunk)
        yield path, size
    finally:
        path.unlink(missing_ok=True)


def file_chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk
