"""A small Python client of the autoprune API (httpx), mirroring its routes.

    from service.client import Client

    with Client() as api:                                   # AUTOPRUNE_URL / AUTOPRUNE_API_KEY or the defaults
        job = api.submit(model="resnet20", data="digits", strategy="random", budget=6)
        final = api.wait(job["id"], on_event=print)         # follows the live events (SSE)
        api.download(job["id"], "best.onnx", point="best", format="onnx")
        api.download(job["id"], "p3.pt2", point=3, format="pt2")   # not exported yet: requested, then waited for

Every error answer becomes :class:`ApiError` carrying the problem document (RFC 9457); a download that is not
ready (``wait=False``, or past its ``timeout``) raises :class:`ExportPending`, one whose export failed
:class:`ExportFailed`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """An error answer of the API (``problem`` is its problem+json document)."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem = dict(problem)
        title = self.problem.get("title") or f"HTTP {status}"
        detail = self.problem.get("detail")
        super().__init__(f"{title} ({status}): {detail}" if detail else f"{title} ({status})")


class ExportPending(Exception):
    """The export is queued or running (``request`` is its export request); download again later."""

    def __init__(self, request: Mapping[str, Any], why: str) -> None:
        self.request = dict(request)
        super().__init__(
            f"{why}: the {self.request.get('format')} export of {self.request.get('stage')} point "
            f"{self.request.get('index')} is {self.request.get('state')} (request {self.request.get('id')})"
        )


class ExportFailed(Exception):
    """The worker could not export the point (``request["error"]`` says why)."""

    def __init__(self, request: Mapping[str, Any]) -> None:
        self.request = dict(request)
        super().__init__(
            f"the {self.request.get('format')} export of {self.request.get('stage')} point "
            f"{self.request.get('index')} failed: {self.request.get('error')}"
        )


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``event`` is snapshot / state / evaluation / log; ``data`` the decoded JSON."""

    event: str
    data: Any
    id: str | None = None


def default_url() -> str:
    return os.environ.get("AUTOPRUNE_URL") or DEFAULT_URL


def default_key() -> str | None:
    """``AUTOPRUNE_API_KEY``, else the key ``autoprune serve`` wrote into ``<data_dir>/api-key``."""
    key = os.environ.get("AUTOPRUNE_API_KEY")
    if key:
        return key
    from service.settings import Settings

    try:
        text = (Settings().data_dir / "api-key").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        response.read()
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:300] or None}
    raise ApiError(response.status_code, problem)


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from the lines of a ``text/event-stream`` (comments and ``retry`` are skipped)."""
    event, eid = "message", None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    value: Any = json.loads(raw)
                except ValueError:
                    value = raw
                yield Event(event, value, eid)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value_ = line.partition(":")
        value_ = value_[1:] if value_.startswith(" ") else value_
        if field == "event":
            event = value_
        elif field == "data":
            data.append(value_)
        elif field == "id":
            eid = value_


class Client:
    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.key = key if key is not None else default_key()
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    @staticmethod
    def _body(source: str | os.PathLike[str] | bytes | IO[bytes]) -> tuple[Any, IO[bytes] | None]:
        """(content, file to close): a path is streamed from disk (with its Content-Length)."""
        if isinstance(source, bytes | bytearray):
            return bytes(source), None
        if isinstance(source, str | os.PathLike):
            fh = Path(source).open("rb")  # noqa: SIM115 - closed by the caller after the request
            return fh, fh
        return source, None

    def _upload(self, path: str, source: Any, params: dict[str, Any]) -> Any:
        content, fh = self._body(source) if source is not None else (b"", None)
        try:
            return self._request(
                "POST",
                path,
                params={k: v for k, v in params.items() if v is not None},
                content=content,
                headers={"Content-Type": "application/octet-stream"},
            )
        finally:
            if fh is not None:
                fh.close()

    # -- meta -------------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        response = self._http.get("/health")
        if response.status_code not in (200, 503):
            _raise_for(response)
        return response.json()  # type: ignore[no-any-return]

    def catalog(self) -> dict[str, Any]:
        return self._request("GET", "/v1/catalog")  # type: ignore[no-any-return]

    # -- inputs -----------------------------------------------------------------------------------------------
    def upload_model(
        self,
        architecture: str | None = None,
        *,
        weights: str | os.PathLike[str] | bytes | IO[bytes] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        pt2: str | os.PathLike[str] | bytes | IO[bytes] | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """An architecture (+ kwargs) with optional safetensors ``weights``, or a ``pt2`` program."""
        if pt2 is not None:
            return self._upload("/v1/models", pt2, {"format": "pt2", "name": name})  # type: ignore[no-any-return]
        params = {"architecture": architecture, "name": name, "kwargs": json.dumps(dict(kwargs)) if kwargs else None}
        return self._upload("/v1/models", weights, params)  # type: ignore[no-any-return]

    def create_dataset(
        self,
        builtin: str | None = None,
        *,
        file: str | os.PathLike[str] | bytes | IO[bytes] | None = None,
        name: str | None = None,
        format: str | None = None,
    ) -> dict[str, Any]:
        """A built-in dataset by name, or an uploaded ``.npz`` / ``.safetensors`` file."""
        if builtin is not None:
            body: dict[str, Any] = {"builtin": builtin}
            if name:
                body["name"] = name
            return self._request("POST", "/v1/datasets", json=body)  # type: ignore[no-any-return]
        if file is None:
            raise ValueError("give builtin= or file=")
        if format is None and isinstance(file, str | os.PathLike):
            suffix = Path(file).suffix.lower().lstrip(".")
            format = suffix if suffix in ("npz", "safetensors") else None
        return self._upload("/v1/datasets", file, {"name": name, "format": format})  # type: ignore[no-any-return]

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{model_id}")  # type: ignore[no-any-return]

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}")  # type: ignore[no-any-return]

    # -- jobs -------------------------------------------------------------------------------------------------
    def create_job(
        self, model_id: str, dataset_id: str, *, idempotency_key: str | None = None, **spec: Any
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"model_id": model_id, "dataset_id": dataset_id, **spec}
        return self._request("POST", "/v1/jobs", json=body, headers=headers)  # type: ignore[no-any-return]

    def submit(
        self,
        model: str,
        data: str,
        *,
        weights: str | os.PathLike[str] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """Upload the inputs and create the job: ``model`` is an architecture name or a ``.pt2`` file, ``data``
        a built-in dataset name or an ``.npz`` / ``.safetensors`` file."""
        if str(model).lower().endswith(".pt2"):
            m = self.upload_model(pt2=model, name=Path(model).name)
        else:
            m = self.upload_model(model, weights=weights, kwargs=kwargs)
        if Path(data).suffix.lower() in (".npz", ".safetensors"):
            d = self.create_dataset(file=data, name=Path(data).stem)
        else:
            d = self.create_dataset(data)
        return self.create_job(m["id"], d["id"], idempotency_key=idempotency_key, **spec)

    def jobs(self, *, state: str | None = None, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state:
            params["state"] = state
        return self._request("GET", "/v1/jobs", params=params)  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def evaluations(
        self, job_id: str, *, stage: str | None = None, offset: int = 0, limit: int = 100
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if stage:
            params["stage"] = stage
        return self._request("GET", f"/v1/jobs/{job_id}/evaluations", params=params)  # type: ignore[no-any-return]

    def pareto(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/pareto")  # type: ignore[no-any-return]

    def exports(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/models")  # type: ignore[no-any-return]

    def model_meta(
        self, job_id: str, point: str | int = "best", *, format: str = "onnx", stage: str | None = None
    ) -> dict[str, Any]:
        params = {"format": format, **({"stage": stage} if stage else {})}
        return self._request("GET", f"/v1/jobs/{job_id}/models/{point}/meta", params=params)  # type: ignore[no-any-return]

    def request_export(
        self, job_id: str, point: str | int = "best", *, format: str = "onnx", stage: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/exports``: the export request (``state`` done when the file exists already)."""
        body: dict[str, Any] = {"point": point if point == "best" else int(point), "format": format}
        if stage:
            body["stage"] = stage
        return self._request("POST", f"/v1/jobs/{job_id}/exports", json=body)  # type: ignore[no-any-return]

    def export_requests(self, job_id: str) -> dict[str, Any]:
        """The job's export requests: ``items``, ``done``, ``total``, ``pending``."""
        return self._request("GET", f"/v1/jobs/{job_id}/exports")  # type: ignore[no-any-return]

    def export_request(self, job_id: str, request_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/exports/{request_id}")  # type: ignore[no-any-return]

    def wait_export(
        self,
        job_id: str,
        point: str | int = "best",
        *,
        format: str = "onnx",
        stage: str | None = None,
        wait: bool = True,
        timeout: float = 600.0,
        poll: float = 0.5,
    ) -> dict[str, Any]:
        """Request the export (if it is not there) and poll it until done: the done request. :class:`ExportPending`
        when it is not done and ``wait`` is False or ``timeout`` s passed; :class:`ExportFailed` when it failed."""
        req = self.request_export(job_id, point, format=format, stage=stage)
        deadline = time.monotonic() + timeout
        while req["state"] not in ("done", "failed"):
            if not wait:
                raise ExportPending(req, "not exported yet (queued)")
            if time.monotonic() >= deadline:
                raise ExportPending(req, f"timed out after {timeout:g} s")
            time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
            req = self.export_request(job_id, req["id"])
        if req["state"] == "failed":
            raise ExportFailed(req)
        return req

    def download(
        self,
        job_id: str,
        dest: str | os.PathLike[str],
        *,
        point: str | int = "best",
        format: str = "onnx",
        stage: str | None = None,
        wait: bool = True,
        timeout: float = 600.0,
        poll: float = 0.5,
    ) -> Path:
        """Stream an exported model to ``dest`` (written to a temporary file, then renamed). A point that was not
        exported yet (the rest of the front is exported after the job, or only on request; a cancelled or failed
        job's points) is requested and, with ``wait``, waited for up to ``timeout`` s (:class:`ExportPending`
        otherwise)."""
        try:
            return self._fetch(job_id, dest, point, format, stage)
        except ApiError as exc:
            if exc.status != 404 or not str(exc.problem.get("type", "")).endswith("/no-export"):
                raise
        req = self.wait_export(job_id, point, format=format, stage=stage, wait=wait, timeout=timeout, poll=poll)
        return self._fetch(job_id, dest, req["index"], format, req["stage"])

    def _fetch(
        self, job_id: str, dest: str | os.PathLike[str], point: str | int, format: str, stage: str | None
    ) -> Path:
        dest = Path(dest)
        params = {"format": format, **({"stage": stage} if stage else {})}
        with self._http.stream("GET", f"/v1/jobs/{job_id}/models/{point}", params=params) as response:
            _raise_for(response)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            try:
                with os.fdopen(fd, "wb") as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a downloaded file should have
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return dest

    # -- live events ------------------------------------------------------------------------------------------
    def events(
        self, job_id: str, *, last_event_id: str | None = None, reconnects: int = 5, follow_exports: bool = False
    ) -> Iterator[Event]:
        """The job's live events (a ``snapshot`` first); ends after the job reaches a terminal state (with
        ``follow_exports``: once its queued exports are made too). A dropped connection is resumed with
        ``Last-Event-ID`` (at most ``reconnects`` times in a row)."""
        tries = 0
        while True:
            done = False
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    params={"follow_exports": "true"} if follow_exports else None,
                    timeout=httpx.Timeout(60.0, read=90.0),
                ) as response:
                    _raise_for(response)
                    for ev in parse_sse(response.iter_lines()):
                        tries = 0
                        if ev.id is not None:
                            last_event_id = ev.id
                        yield ev
                        if ev.event == "state" and isinstance(ev.data, dict):
                            done = ev.data.get("to_state") in TERMINAL_STATES
                        elif ev.event == "snapshot" and isinstance(ev.data, dict):
                            done = ev.data.get("state") in TERMINAL_STATES
                # the server ends the stream when the job has finished; anything else was a dropped stream
                finished = done or self.job(job_id)["state"] in TERMINAL_STATES
                if finished and (not follow_exports or self.export_requests(job_id)["pending"] == 0):
                    return
                tries += 1
                if tries > reconnects:
                    raise ApiError(502, {"title": "Event stream ended early", "detail": "the job has not finished"})
                time.sleep(min(0.5 * 2**tries, 5.0))
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout, httpx.ConnectError):
                tries += 1
                if tries > reconnects:
                    raise
                time.sleep(min(0.5 * 2**tries, 5.0))

    def wait(self, job_id: str, *, on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
        """Follow the job's events until it finishes; the final job."""
        for ev in self.events(job_id):
            if on_event is not None:
                on_event(ev)
        return self.job(job_id)
