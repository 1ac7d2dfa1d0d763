"""The content-addressed artefact store: uploads and exported models as files named by their SHA-256.

Layout: ``<root>/<sha[:2]>/<sha><suffix>`` (e.g. ``ab/ab12...ef.onnx``). A file is written to a temporary name
inside ``<root>`` while it is hashed, then moved into place with ``os.replace``: a reader never sees a partial
file, and two writers of the same content end with the same bytes. The size limit is enforced while reading,
so an oversized upload is rejected (:class:`TooLarge`) before the whole body has been taken.

No torch, no database: the API process uses it to store uploads; the worker to store exports and find inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator
from pathlib import Path
from typing import IO

_SHA = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,16}){0,2}$")
CHUNK = 1024 * 1024


class TooLarge(Exception):  # the API maps it to 413
    """The stream exceeded ``max_bytes`` (nothing was stored)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the upload exceeds the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


class _Incoming:
    """The file :meth:`ArtefactStore._incoming` is writing: its hash and size so far; ``digest`` once stored."""

    def __init__(self, fh: IO[bytes], max_bytes: int | None) -> None:
        self.fh, self.max_bytes = fh, max_bytes
        self.hash, self.size, self.digest = hashlib.sha256(), 0, ""

    def write(self, chunk: bytes) -> None:
        """:class:`TooLarge` (nothing written) once the total passes ``max_bytes``."""
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise TooLarge(self.max_bytes)
        self.hash.update(chunk)
        self.fh.write(chunk)


class ArtefactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- paths --------------------------------------------------------------------------------------------
    def path_for(self, sha256: str, suffix: str = "") -> Path:
        """Where the file with this hash lives (ValueError for a malformed hash or suffix: no path tricks)."""
        if not _SHA.match(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        if not _SUFFIX.match(suffix):
            raise ValueError(f"bad artefact suffix {suffix!r}")
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def exists(self, sha256: str, suffix: str = "") -> bool:
        return self.path_for(sha256, suffix).is_file()

    # -- writing ------------------------------------------------------------------------------------------
    def _open_temp(self) -> tuple[IO[bytes], Path]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        return os.fdopen(fd, "wb"), Path(tmp)

    def _finish(self, fh: IO[bytes], tmp: Path, digest: str, suffix: str) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        target = self.path_for(digest, suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)

    @contextlib.contextmanager
    def _incoming(self, max_bytes: int | None, suffix: str) -> Iterator[_Incoming]:
        """A temporary file that the block writes chunks to (hashed, size-checked): moved into place under its
        hash when the block ends, removed when it raises (:class:`TooLarge`, a client gone, a cancellation)."""
        self.path_for("0" * 64, suffix)  # validate the suffix before reading anything
        fh, tmp = self._open_temp()
        incoming = _Incoming(fh, max_bytes)
        try:
            yield incoming
            incoming.digest = incoming.hash.hexdigest()
            self._finish(fh, tmp, incoming.digest, suffix)
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise

    def put_stream(self, chunks: Iterable[bytes], max_bytes: int | None = None, suffix: str = "") -> tuple[str, int]:
        """Store the concatenated ``chunks``; returns (sha256, size). :class:`TooLarge` past ``max_bytes``."""
        with self._incoming(max_bytes, suffix) as incoming:
            for chunk in chunks:
                incoming.write(chunk)
        return incoming.digest, incoming.size

    async def aput_stream(
        self, chunks: AsyncIterable[bytes], max_bytes: int | None = None, suffix: str = ""
    ) -> tuple[str, int]:
        """:meth:`put_stream` for an async stream (e.g. Starlette's ``request.stream()``)."""
        with self._incoming(max_bytes, suffix) as incoming:
            async for chunk in chunks:
                incoming.write(chunk)
        return incoming.digest, incoming.size

    def put_bytes(self, data: bytes, suffix: str = "") -> tuple[str, int]:
        return self.put_stream([data], None, suffix)

    def put_file(
        self, path: str | os.PathLike[str], suffix: str | None = None, *, move: bool = False
    ) -> tuple[str, int]:
        """Copy a local file into the store (suffix: the file's own by default). ``move=True`` hashes the file
        and moves it into place instead (it must be on the store's file system, e.g. a temp file under
        ``root``): no second copy of a large upload."""
        path = Path(path)
        suffix = path.suffix if suffix is None else suffix
        if not move:
            with path.open("rb") as fh:
                return self.put_stream(iter(lambda: fh.read(CHUNK), b""), None, suffix)
        self.path_for("0" * 64, suffix)
        h, size = hashlib.sha256(), 0
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
        digest = h.hexdigest()
        target = self.path_for(digest, suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o644)
        os.replace(path, target)
        return digest, size
