"""The entries a ``torch.export.save`` archive may hold, checked from the zip directory alone (torch-free).

One home for this allow-list: :mod:`autoprune.models.pt2` reads archives through it, and the service's upload
validation (which must not import torch) refuses files with it before anything is stored.
"""

from __future__ import annotations

import re
import zipfile

from autoprune.errors import CorruptFileError

__all__ = ["IGNORED_ENTRIES", "READ_ENTRIES", "archive_entries", "describe_entry"]

_NAME = r"[A-Za-z0-9_.\-]+"
READ_ENTRIES = (
    re.compile(r"archive_format"),
    re.compile(r"archive_version"),
    re.compile(r"byteorder"),
    re.compile(rf"models/{_NAME}\.json"),
    re.compile(rf"data/weights/{_NAME}_weights_config\.json"),
    re.compile(r"data/weights/weight_\d+"),
    re.compile(rf"data/constants/{_NAME}_constants_config\.json"),
    re.compile(r"data/constants/tensor_\d+"),
)
"""Entries autoprune reads (as JSON or raw tensor bytes; never unpickled)."""
IGNORED_ENTRIES = (
    re.compile(r"\.data/version"),
    re.compile(r"\.data/serialization_id"),
    re.compile(r"version"),
    re.compile(rf"data/sample_inputs/{_NAME}\.pt"),
    re.compile(r"extra/.*"),
)
"""Present in files torch writes, never read."""


def describe_entry(rel: str) -> str:
    """Why an entry outside the allow-list is refused."""
    base = rel.rsplit("/", 1)[-1]
    if rel.startswith("data/aotinductor/"):
        return "it contains AOTInductor-compiled native code"
    if base.startswith(("custom_obj_", "opaque_obj_")):
        return f"entry {rel!r} is a pickled custom object"
    if rel.endswith((".pt", ".pkl")) or base.endswith("data.pkl"):
        return f"entry {rel!r} is a pickle (legacy or torch.save format, not a torch.export program)"
    return f"unexpected entry {rel!r}"


def archive_entries(zf: zipfile.ZipFile, max_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's entries by their path below its single top-level folder.

    :class:`CorruptFileError` for an empty zip, duplicate entries, no single top-level folder, more than
    ``max_bytes`` declared uncompressed, or any entry outside the allow-list (pickles, AOTInductor code, ...).
    """
    infos = [info for info in zf.infolist() if not info.filename.endswith("/")]
    if not infos:
        raise CorruptFileError("not a .pt2 archive: the zip file is empty")
    names = [info.filename for info in infos]
    for name in names:  # nothing is extracted, but a name that climbs or is absolute is refused outright
        if "\\" in name or name.startswith("/") or any(seg in ("", ".", "..") for seg in name.split("/")):
            raise CorruptFileError(f"refusing the .pt2 archive: unsafe entry name {name[:200]!r}")
    if len(set(names)) != len(names):
        raise CorruptFileError("not a .pt2 archive: the zip file has duplicate entries")
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) != 1 or any("/" not in name for name in names):
        raise CorruptFileError(
            "not a .pt2 archive written by torch.export.save (torch >= 2.8): no single top-level folder"
        )
    if sum(info.file_size for info in infos) > max_bytes:
        raise CorruptFileError("the .pt2 archive declares more uncompressed bytes than accepted")
    prefix = tops.pop() + "/"
    entries = {info.filename[len(prefix) :]: info for info in infos}
    for rel in entries:
        if not (any(p.fullmatch(rel) for p in READ_ENTRIES) or any(p.fullmatch(rel) for p in IGNORED_ENTRIES)):
            raise CorruptFileError(f"refusing the .pt2 archive: {describe_entry(rel)}")
    return entries
