"""The REST API over real HTTP: a real uvicorn (``autoprune serve --no-worker``) on 127.0.0.1 as a subprocess,
an SQLite file in a temporary directory, driven with httpx (and raw sockets where the wire matters)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest

KEY = "test-key-0123456789"
LIMIT = 3_000_000  # max_upload_bytes of the test server (ResNet-20 weights are ~1.1 MB)
PROBLEM = "application/problem+json"

if TYPE_CHECKING:
    from tests.service.conftest import ServerProcess as Server


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, running_server: Callable[..., AbstractContextManager[Server]]
) -> Iterator[Server]:
    """``serve --no-worker`` (conftest's ``running_server``: no request may crash it); ``client()`` uses KEY."""
    data = tmp_path_factory.mktemp("api") / "data"
    keys = json.dumps([KEY, "second-key-0123456789"])
    with running_server(data, "--no-worker", AUTOPRUNE_API_KEYS=keys, AUTOPRUNE_MAX_UPLOAD_BYTES=str(LIMIT)) as srv:
        yield srv


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def assert_problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == status
    assert body["type"].startswith("https://") and body["title"] and body["instance"].startswith("/")
    for w in words:
        assert w.lower() in (body.get("detail") or "").lower(), (w, body)
    return body


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real ResNet-20 weights written by the library (the test process may import torch; the server may not)."""
    import torch

    from autoprune.models.registry import build_model
    from autoprune.models.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet20.safetensors"
    save_weights(build_model("resnet20"), path)
    return path


class Evil:
    """Unpickling this writes the marker file: it proves whether the server ever unpickled an upload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def make_model(api: httpx.Client) -> str:
    r = api.post("/v1/models", params={"architecture": "resnet20"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def make_dataset(api: httpx.Client) -> str:
    r = api.post("/v1/datasets", json={"builtin": "digits"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def inputs(server: Server) -> tuple[str, str]:
    with server.client() as c:
        return make_model(c), make_dataset(c)


# --- open routes, docs, auth -------------------------------------------------------------------------------------


def test_health_openapi_and_docs_need_no_key(server: Server) -> None:
    with server.client(key=None) as anon:
        h = anon.get("/health")
        assert h.status_code == 200
        assert h.json()["status"] == "ok" and h.json()["database"] is True and h.json()["version"]
        spec = anon.get("/openapi.json")
        assert spec.status_code == 200 and spec.json()["openapi"].startswith("3.1")
        assert "/v1/jobs/{job_id}/events" in spec.json()["paths"]
        assert spec.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        # the job body is the job spec: every setting, with the spec's help text and bounds
        from autoprune.job import JobSpec

        body = spec.json()["components"]["schemas"]["JobCreate"]["properties"]
        for knob in JobSpec.knobs():
            assert body[knob.name]["description"] == knob.doc, knob.name
        assert body["max_ratio"]["maximum"] == 0.95 and body["optimizer"]["enum"] == ["adamw", "sgd"]
        docs = anon.get("/docs")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        # every URL the page loads is served by this server: nothing from a CDN
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""", docs.text)
        flat = [a or b for a, b in urls]
        assert flat and all(u.startswith("/") for u in flat), flat
        assert "http://" not in docs.text and "https://" not in docs.text
        for u in flat:
            asset = anon.get(u)
            assert asset.status_code == 200, u
            assert len(asset.content) > 500, u
        js = anon.get("/docs/assets/swagger-ui-bundle.js")
        assert "javascript" in js.headers["content-type"] and "SwaggerUIBundle" in js.text
        # the bundled Swagger UI (4.x) renders OpenAPI 3.0: the docs page gets a 3.0 rendering of the same API
        spec30 = anon.get("/docs/openapi-3.0.json").json()
        assert spec30["openapi"] == "3.0.3"
        assert spec30["paths"].keys() == spec.json()["paths"].keys()
        assert '"type": "null"' not in json.dumps(spec30)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}],
    ids=["missing", "wrong", "basic", "empty"],
)
def test_missing_or_wrong_key_is_401_problem(server: Server, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=server.url, headers=headers) as anon:
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("POST", "/v1/models"), ("GET", "/v1/catalog")):
            r = anon.request(method, path)
            assert_problem(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"


def test_every_configured_key_works(server: Server) -> None:
    for key in (KEY, "second-key-0123456789"):
        with server.client(key) as c:
            assert c.get("/v1/jobs").status_code == 200


def test_routing_errors_are_problems(api: httpx.Client) -> None:
    assert_problem(api.get("/v1/nothing-here"), 404, "no route")
    assert_problem(api.delete("/v1/jobs"), 405, "DELETE")
    assert api.delete("/v1/jobs").headers["allow"] == "GET, POST"  # every method of the path, not one route's
    assert api.get("/v1/jobs/abc/cancel").headers["allow"] == "POST"
    assert_problem(api.get("/v1/jobs/0123abc"), 404, "0123abc")
    assert_problem(api.get("/v1/models/0123abc"), 404)
    assert_problem(api.get("/v1/jobs", params={"limit": 0}), 422, "limit")
    assert_problem(api.get("/v1/jobs", params={"state": "sleeping"}), 422, "state")


def test_catalog_lists_names_the_api_accepts(api: httpx.Client) -> None:
    cat = api.get("/v1/catalog").json()
    assert "resnet20" in cat["architectures"] and cat["datasets"] == ["digits", "mnist1d"]
    assert {"random", "optuna-tpe", "sb3-ddpg"} <= {s["name"] for s in cat["strategies"]}
    assert cat["default_strategy"] == "knapsack"
    assert "accuracy" in cat["metrics"] and "mnasnet" in cat["objectives"]
    tpe = next(s for s in cat["strategies"] if s["name"] == "optuna-tpe")
    assert "n_startup_trials" in tpe["options"] and not {"storage", "study_name"} & set(tpe["options"])


# --- uploads -----------------------------------------------------------------------------------------------------


def test_upload_safetensors_weights(server: Server, api: httpx.Client, weights_file: Path) -> None:
    data = weights_file.read_bytes()
    r = api.post(
        "/v1/models",
        params={"architecture": "ResNet20", "name": "mine", "kwargs": '{"num_classes": 10}'},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["architecture"] == "resnet20" and body["kind"] == "architecture" and body["name"] == "mine"
    assert body["kwargs"] == {"num_classes": 10}
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert r.headers["location"] == f"/v1/models/{body['id']}"
    assert api.get(r.headers["location"]).json() == body
    stored = server.data_dir / "artefacts" / body["sha256"][:2] / f"{body['sha256']}.safetensors"
    assert stored.read_bytes() == data
    # a streamed body (chunked, no Content-Length) is accepted the same way
    r2 = api.post("/v1/models", params={"architecture": "resnet20"}, content=iter([data[:1000], data[1000:]]))
    assert r2.status_code == 201 and r2.json()["sha256"] == body["sha256"]


def test_model_without_weights_and_bad_parameters(api: httpx.Client) -> None:
    r = api.post("/v1/models", params={"architecture": "mlp"})
    assert r.status_code == 201 and r.json()["sha256"] is None
    assert_problem(api.post("/v1/models", params={"architecture": "resnet21"}), 422, "unknown architecture", "resnet20")
    assert_problem(api.post("/v1/models"), 422, "architecture")
    assert_problem(api.post("/v1/models", params={"architecture": "mlp", "kwargs": "[1]"}), 422, "JSON object")
    assert_problem(api.post("/v1/models", params={"architecture": "mlp", "kwargs": "{bad"}), 422, "JSON object")
    assert_problem(api.post("/v1/models", params={"format": "onnx"}), 422, "format")
    assert_problem(api.post("/v1/models", params={"format": "pt2", "architecture": "mlp"}), 422, "pt2")
    assert_problem(api.post("/v1/models", params={"format": "pt2"}), 422, "empty")


def test_multipart_upload_is_415(api: httpx.Client, weights_file: Path) -> None:
    r = api.post("/v1/models", params={"architecture": "resnet20"}, files={"file": weights_file.read_bytes()[:100]})
    assert_problem(r, 415, "multipart")
    r = api.post("/v1/datasets", content=b"x,y\n1,2\n", headers={"Content-Type": "text/csv"})
    assert_problem(r, 415, "text/csv")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: len(b) - 100],  # truncated
        lambda b: b[:8] + b"[" + b[9:],  # header not an object
        lambda b: (10**9).to_bytes(8, "little") + b[8:],  # header length past the end
        lambda b: b + b"\0" * 16,  # trailing bytes
        lambda b: b[:4],  # shorter than the length field
        lambda b: os.urandom(5000),  # noise
    ],
    ids=["truncated", "not-object", "bad-length", "trailing", "tiny", "noise"],
)
def test_corrupt_safetensors_is_refused(server: Server, api: httpx.Client, weights_file: Path, mangle: Any) -> None:
    before = sorted((server.data_dir / "artefacts").rglob("*"))
    r = api.post("/v1/models", params={"architecture": "resnet20"}, content=mangle(weights_file.read_bytes()))
    assert_problem(r, 422, "safetensors")
    assert sorted((server.data_dir / "artefacts").rglob("*")) == before  # nothing stored, no temp file left


def test_oversized_upload_declared_length_is_413_before_the_body(server: Server) -> None:
    """A Content-Length over the limit is answered at once: the client never sends the body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            (
                f"POST /v1/models?architecture=resnet20 HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {LIMIT + 1}\r\n\r\n"
            ).encode()
            + b"\0" * 1024
        )
        reply = _read_reply(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"application/problem+json" in reply and b"exceeds the limit" in reply


@pytest.mark.parametrize("path", ["/v1/models/{}", "/v1/datasets/{}", "/v1/jobs/{}", "/v1/jobs/abc/models/{}"])
def test_long_ids_are_refused_without_being_echoed(api: httpx.Client, path: str) -> None:
    r = api.get(path.format("a" * 10_000))
    assert_problem(r, 422, "at most" if "models/{}" not in path or path.startswith("/v1/models") else "pattern")
    assert len(r.content) < 2_000
    assert_problem(api.get("/v1/jobs/abc/models/12abc"), 422, "pattern")


def test_a_job_body_has_a_size_cap_declared_or_streamed(api: httpx.Client) -> None:
    from service.api.app import MAX_JSON_BODY_BYTES

    big = json.dumps({"model_id": "m", "dataset_id": "d", "strategy_options": {"x": "y" * MAX_JSON_BODY_BYTES}})
    headers = {"Content-Type": "application/json"}
    assert_problem(api.post("/v1/jobs", content=big, headers=headers), 413, "at most")

    def chunks() -> Any:  # no Content-Length: the cap holds while the body streams
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096].encode()

    assert_problem(api.post("/v1/jobs", content=chunks(), headers=headers), 413, "at most")
    assert api.get("/v1/jobs").status_code == 200  # the server carries on


def test_an_upload_the_client_abandons_is_not_a_server_error(server: Server, api: httpx.Client) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            (
                f"POST /v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
            ).encode()
            + b"\1" * 5000
        )
    # the server notices on its next read; then it goes on serving, with nothing left behind and nothing logged
    # as a crash
    deadline = time.monotonic() + 10
    while "client went away" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "client went away" in server.output()
    assert api.get("/v1/jobs").status_code == 200
    assert "Traceback" not in server.output() and "unhandled error" not in server.output()
    assert [p for p in (server.data_dir / "artefacts").rglob(".*") if p.is_file()] == []


def test_oversized_streamed_upload_is_413_once_the_limit_is_crossed(server: Server) -> None:
    """Chunked upload without a length: the server reads up to the limit, answers 413 and stops reading."""
    host, port = server.url.removeprefix("http://").split(":")
    chunk = 256 * 1024
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            (
                f"POST /v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        sent = 0
        try:
            while sent <= LIMIT + chunk:  # a little past the limit; the terminating chunk is never sent
                s.sendall(f"{chunk:x}\r\n".encode() + b"\1" * chunk + b"\r\n")
                sent += chunk
        except OSError:
            pass  # the server may close while we write: fine, its answer is already there
        reply = _read_reply(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 2 * LIMIT
    leftovers = [p for p in (server.data_dir / "artefacts").rglob(".*") if p.is_file()]
    assert leftovers == []


def test_oversized_upload_through_httpx(api: httpx.Client) -> None:
    r = api.post("/v1/models", params={"architecture": "resnet20"}, content=b"\0" * (LIMIT + 10))
    assert_problem(r, 413, "limit")


def _read_reply(s: socket.socket) -> bytes:
    s.settimeout(10)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 20:
            part = s.recv(65536)
            if not part:
                break
            data += part
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_pickles_disguised_as_models_are_refused_and_never_run(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    import torch

    marker = tmp_path / "unpickled"
    raw_pickle = pickle.dumps({"state_dict": Evil(marker)})
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(3), "payload": Evil(marker)}, buf)  # a zip with archive/data.pkl
    torch_zip = buf.getvalue()
    assert not marker.exists()
    assert "data.pkl" in "".join(zipfile.ZipFile(io.BytesIO(torch_zip)).namelist())

    assert_problem(api.post("/v1/models", params={"architecture": "resnet20"}, content=raw_pickle), 422, "safetensors")
    assert_problem(api.post("/v1/models", params={"architecture": "resnet20"}, content=torch_zip), 422, "safetensors")
    assert_problem(api.post("/v1/models", params={"format": "pt2"}, content=raw_pickle), 415, "not a zip")
    assert_problem(api.post("/v1/models", params={"format": "pt2"}, content=torch_zip), 422, "pickle")
    assert_problem(api.post("/v1/datasets", content=raw_pickle), 415, "unrecognised")
    assert_problem(api.post("/v1/datasets", content=torch_zip), 422, "not a .npy array")
    # an .npz whose array needs unpickling (np.savez pickles object arrays)
    obj = io.BytesIO()
    np.savez(obj, x=np.array([Evil(marker), 1], dtype=object), y=np.zeros(2, dtype=np.int64))
    assert_problem(api.post("/v1/datasets", content=obj.getvalue()), 422, "unpickling")
    time.sleep(0.2)
    assert not marker.exists(), "an upload was unpickled"


def test_pt2_upload(api: httpx.Client, tmp_path: Path) -> None:
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(2, 4),)), str(path))
    r = api.post("/v1/models", params={"format": "pt2", "name": "tiny"}, content=path.read_bytes())
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "pt2" and r.json()["architecture"] is None
    # an AOTInductor entry (native code) in an otherwise valid archive is refused
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w") as dst:
        top = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(f"{top}/data/aotinductor/model/lib.so", b"\x7fELF")
    assert_problem(api.post("/v1/models", params={"format": "pt2"}, content=buf.getvalue()), 422, "native code")


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_dataset_uploads(api: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    r = api.post("/v1/datasets", params={"name": "mine"}, content=_npz(x=x, y=y))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "file" and body["name"] == "mine" and body["info"]["samples"] == 40
    assert body["info"]["arrays"]["x"] == {"shape": [40, 1, 8, 8], "dtype": "float32"}
    assert body["info"]["labelled"] is True
    assert api.get(r.headers["location"]).json()["id"] == body["id"]

    from safetensors.numpy import save

    st = save({"x_train": x[:30], "y_train": y[:30], "x_val": x[30:], "y_val": y[30:]})
    r = api.post("/v1/datasets", params={"format": "safetensors"}, content=st)
    assert r.status_code == 201, r.text
    assert r.json()["info"]["format"] == "safetensors" and r.json()["info"]["samples"] == 40
    assert r.json()["sha256"] == hashlib.sha256(st).hexdigest()

    unlabelled = api.post("/v1/datasets", content=_npz(x=x)).json()
    assert unlabelled["info"]["labelled"] is False

    assert_problem(api.post("/v1/datasets", content=_npz(x=x, y=-y - 1)), 422, "negative")
    assert_problem(api.post("/v1/datasets", content=_npz(x=x[:0], y=y[:0])), 422, "holds 0 sample(s)")
    assert_problem(api.post("/v1/datasets", content=_npz(x_train=x, x_val=x[:1])), 422, "x_val holds 1 sample")
    assert_problem(api.post("/v1/datasets", content=_npz(x=x, y=y * 0 + 10**9)), 422, "100000 classes")
    split = {"x_train": x[:20], "y_train": y[:20], "x_val": x[20:30], "y_val": y[20:30]}
    tested = api.post("/v1/datasets", content=_npz(**split, x_test=x[30:], y_test=y[30:]))
    assert tested.status_code == 201 and tested.json()["info"]["samples"] == 40, tested.text
    assert_problem(api.post("/v1/datasets", content=_npz(**split, x_test=x[30:])), 422, "labels some splits")
    assert_problem(api.post("/v1/datasets", content=_npz(x_train=x, x_test=x)), 422, "no 'x_val'")
    assert_problem(api.post("/v1/datasets", content=_npz(x=x, y=y[:5])), 422, "labels")
    assert_problem(api.post("/v1/datasets", content=_npz(x=x, y=y.astype(np.float32))), 422, "integers")
    assert_problem(api.post("/v1/datasets", content=_npz(images=x)), 422, "no known arrays")
    assert_problem(api.post("/v1/datasets", content=_npz(x=x, x_train=x)), 422, "mixes")
    assert_problem(api.post("/v1/datasets", content=_npz(x=np.arange(5.0))), 422, "batch dimension")
    assert_problem(api.post("/v1/datasets", content=_npz(x=x * np.nan)), 422, "NaN")
    assert_problem(api.post("/v1/datasets", content=b"PK\x03\x04 not really a zip"), 415, "npz")
    assert_problem(api.post("/v1/datasets", content=b""), 422, "empty")


def test_builtin_dataset_json(api: httpx.Client) -> None:
    r = api.post("/v1/datasets", json={"builtin": "mnist1d"})
    assert r.status_code == 201 and r.json()["builtin"] == "mnist1d" and r.json()["kind"] == "builtin"
    body = assert_problem(api.post("/v1/datasets", json={"builtin": "cifar"}), 422, "builtin")
    assert body["errors"][0]["loc"] == ["body", "builtin"]
    assert_problem(api.post("/v1/datasets", json={"builtin": "digits", "extra": 1}), 422, "extra")
    assert_problem(
        api.post("/v1/datasets", content=b"{nope", headers={"Content-Type": "application/json"}), 400, "JSON"
    )


# --- jobs --------------------------------------------------------------------------------------------------------


def test_create_job(api: httpx.Client, inputs: tuple[str, str]) -> None:
    model_id, dataset_id = inputs
    r = api.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "budget": 4, "seed": 3})
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["progress"] == {"done": 0, "total": 4}
    assert job["spec"]["seed"] == 3 and job["spec"]["strategy"] == "knapsack" and job["attempts"] == 0
    assert "model_id" not in job["spec"]
    assert api.get(f"/v1/jobs/{job['id']}").json() == job


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"strategy": "annealing"}, 422, ["unknown strategy", "random"]),
        ({"budget": 0}, 422, ["budget"]),
        ({"budget": None, "seconds": None}, 422, ["budget"]),
        ({"budget": "many"}, 422, ["budget"]),
        ({"budget": True}, 422, ["budget"]),
        ({"distill": 1}, 422, ["distill"]),
        ({"target": True}, 422, ["target"]),
        ({"learning_rate": 0.1}, 422, ["learning_rate", "extra"]),
        ({"strategy": "random", "strategy_options": {"n_startup_trials": 3}}, 422, ["no option"]),
        ({"metric": "f1"}, 422, ["metric"]),
        ({"objective": "speed"}, 422, ["reward form"]),
        ({"target": 5.0}, 422, ["target"]),
        ({"criterion": "l3"}, 422, ["criterion"]),
        ({"runtime": "tensorrt"}, 422, ["runtime"]),
        ({"max_ratio": 1.5}, 422, ["max_ratio"]),
        ({"export_formats": ["tflite"]}, 422, ["export_formats"]),
        ({"model_id": "nope"}, 422, ["no model"]),
        ({"dataset_id": "nope"}, 422, ["no dataset"]),
        ({"workers": 0}, 422, ["workers"]),
        ({"optimizer": "lion"}, 422, ["unknown optimizer", "adamw"]),
        ({"lr_schedule": "step"}, 422, ["lr_schedule"]),
        ({"finetune_epochs": -1}, 422, ["finetune_epochs"]),
        ({"warmup_steps": 1.5}, 422, ["warmup_steps"]),
        ({"workers": 2}, 422, ["workers"]),  # random search cannot share a study
        ({"workers": 2, "strategy": "optuna-tpe"}, 422, ["PostgreSQL"]),  # this test server runs on SQLite
        # where studies live is the operator's: a caller must not make the worker create files or probe hosts
        ({"strategy": "optuna-tpe", "strategy_options": {"storage": "sqlite:////tmp/x.db"}}, 422, ["operator"]),
        ({"strategy": "optuna-nsga2", "strategy_options": {"storage": "postgresql://10.0.0.1:22/x"}}, 422, ["storage"]),
        ({"strategy": "optuna-tpe", "strategy_options": {"study_name": "autoprune-other"}}, 422, ["study_name"]),
    ],
)
def test_invalid_jobs_are_422_problems(
    api: httpx.Client, inputs: tuple[str, str], body: dict[str, Any], status: int, words: list[str]
) -> None:
    model_id, dataset_id = inputs
    r = api.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, **body})
    assert_problem(r, status, *words)


def test_malformed_job_requests(api: httpx.Client) -> None:
    headers = {"Content-Type": "application/json"}
    assert_problem(api.post("/v1/jobs", content=b'{"model_id": ', headers=headers), 400, "not valid JSON")
    assert_problem(api.post("/v1/jobs", content=b"[1, 2]", headers=headers), 422)
    assert_problem(api.post("/v1/jobs", content=b"", headers=headers), 422)
    body = assert_problem(api.post("/v1/jobs", json={}), 422, "model_id")
    assert {tuple(e["loc"]) for e in body["errors"]} == {("body", "model_id"), ("body", "dataset_id")}


def test_accuracy_needs_labels(api: httpx.Client, inputs: tuple[str, str]) -> None:
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    unlabelled = api.post("/v1/datasets", content=_npz(x=x)).json()["id"]
    r = api.post("/v1/jobs", json={"model_id": inputs[0], "dataset_id": unlabelled})
    assert_problem(r, 422, "labels")
    r = api.post("/v1/jobs", json={"model_id": inputs[0], "dataset_id": unlabelled, "metric": "agreement"})
    assert r.status_code == 201


def test_idempotency_key(api: httpx.Client, inputs: tuple[str, str]) -> None:
    body = {"model_id": inputs[0], "dataset_id": inputs[1], "budget": 5}
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    # the same settings written out in full are the same request
    same = api.post("/v1/jobs", json={**body, "strategy": "knapsack", "seed": 0}, headers={"Idempotency-Key": "k-1"})
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    assert_problem(api.post("/v1/jobs", json={**body, "budget": 6}, headers={"Idempotency-Key": "k-1"}), 409)
    other = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    plain = [api.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
    assert plain[0] != plain[1]
    # a retried submit re-uploads its inputs (new ids, same content): still the same request
    retry = {**body, "model_id": make_model(api), "dataset_id": make_dataset(api)}
    assert retry["model_id"] != body["model_id"]
    again = api.post("/v1/jobs", json=retry, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other_model = api.post("/v1/models", params={"architecture": "resnet32"}).json()["id"]
    assert_problem(
        api.post("/v1/jobs", json={**retry, "model_id": other_model}, headers={"Idempotency-Key": "k-1"}), 409
    )


def test_list_get_cancel(api: httpx.Client, inputs: tuple[str, str]) -> None:
    ids = [api.post("/v1/jobs", json={"model_id": inputs[0], "dataset_id": inputs[1]}).json()["id"] for _ in range(3)]
    page = api.get("/v1/jobs", params={"state": "queued", "limit": 2}).json()
    assert page["limit"] == 2 and page["offset"] == 0 and len(page["items"]) == 2 and page["total"] >= 3
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]  # newest first
    nxt = api.get("/v1/jobs", params={"state": "queued", "limit": 2, "offset": 2}).json()
    assert nxt["items"][0]["id"] == ids[0]

    r = api.post(f"/v1/jobs/{ids[1]}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["finished_at"]
    assert api.post(f"/v1/jobs/{ids[1]}/cancel").json()["state"] == "cancelled"  # idempotent
    cancelled = {j["id"] for j in api.get("/v1/jobs", params={"state": "cancelled", "limit": 500}).json()["items"]}
    assert ids[1] in cancelled and ids[0] not in cancelled
    assert_problem(api.post("/v1/jobs/unknown/cancel"), 404)


def _sse(client: httpx.Client, path: str, headers: dict[str, str] | None = None) -> list[tuple[str, str, Any]]:
    """(event, id, data) of every event until the server closes the stream."""
    from service.client import parse_sse

    with client.stream("GET", path, headers=headers or {}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [(e.event, e.id or "", e.data) for e in parse_sse(r.iter_lines())]


def test_events_snapshot_then_state_events_until_cancelled(api: httpx.Client, inputs: tuple[str, str]) -> None:
    job_id = api.post("/v1/jobs", json={"model_id": inputs[0], "dataset_id": inputs[1]}).json()["id"]
    got: list[tuple[str, str, Any]] = []
    reader = threading.Thread(target=lambda: got.extend(_sse(api, f"/v1/jobs/{job_id}/events")))
    reader.start()
    time.sleep(1.5)  # the stream is open and idle (the job is queued)
    assert reader.is_alive()
    api.post(f"/v1/jobs/{job_id}/cancel")
    reader.join(timeout=15)
    assert not reader.is_alive(), "the stream did not end after the terminal state"
    kinds = [(e, d.get("state") or (d.get("from_state"), d.get("to_state"))) for e, _, d in got]
    assert kinds == [("snapshot", "queued"), ("state", (None, "queued")), ("state", ("queued", "cancelled"))]
    ids = [int(i) for e, i, _ in got if e == "state"]
    assert ids == sorted(ids) and all(d["job_id"] == job_id for e, _, d in got if e == "state")

    # reconnecting with Last-Event-ID replays only what came after it; the stream ends at once (job finished)
    again = _sse(api, f"/v1/jobs/{job_id}/events", {"Last-Event-ID": str(ids[0])})
    assert [(e, i) for e, i, _ in again] == [("snapshot", ""), ("state", str(ids[1]))]
    assert again[0][2]["state"] == "cancelled"
    after_all = _sse(api, f"/v1/jobs/{job_id}/events?after={ids[1]}")
    assert [e for e, _, _ in after_all] == ["snapshot"]
    assert_problem(api.get("/v1/jobs/missing/events"), 404)


def test_results_of_a_job_without_evaluations(api: httpx.Client, inputs: tuple[str, str]) -> None:
    job_id = api.post("/v1/jobs", json={"model_id": inputs[0], "dataset_id": inputs[1]}).json()["id"]
    page = api.get(f"/v1/jobs/{job_id}/evaluations", params={"limit": 10}).json()
    assert page == {"items": [], "total": 0, "offset": 0, "limit": 10}
    pareto = api.get(f"/v1/jobs/{job_id}/pareto").json()
    assert pareto["points"] == [] and pareto["best"] is None and pareto["state"] == "queued"
    assert api.get(f"/v1/jobs/{job_id}/models").json() == []
    assert_problem(api.get(f"/v1/jobs/{job_id}/evaluations", params={"stage": "later"}), 422)
    assert_problem(api.get("/v1/jobs/missing/evaluations"), 404)
    assert_problem(api.get("/v1/jobs/missing/pareto"), 404)

    # downloads: best is a 409 while the job has not finished; a numbered point is a 404 until it is exported
    assert_problem(api.get(f"/v1/jobs/{job_id}/models/best", params={"format": "onnx"}), 409, "queued")
    meta = assert_problem(api.get(f"/v1/jobs/{job_id}/models/3/meta"), 404, "exports")  # not exported (yet)
    assert meta["type"].endswith("/no-export")
    api.post(f"/v1/jobs/{job_id}/cancel")
    assert_problem(api.get(f"/v1/jobs/{job_id}/models/best"), 404, "best point")
    assert_problem(api.get(f"/v1/jobs/{job_id}/models/3", params={"format": "pt2"}), 404, "not exported")
    assert_problem(api.get(f"/v1/jobs/{job_id}/models/first"), 422, "point")
    assert_problem(api.get(f"/v1/jobs/{job_id}/models/best", params={"format": "tflite"}), 422, "format")
    assert_problem(api.get("/v1/jobs/missing/models/best"), 404)


# --- the API process stays torch-free ----------------------------------------------------------------------------


HEAVY = ("torch", "optuna", "stable_baselines3", "torch_pruning", "onnxruntime")


def test_api_never_imports_torch_in_process(
    tmp_path: Path, weights_file: Path, clean_env: Callable[..., dict[str, str]]
) -> None:
    """A fresh interpreter builds the app and exercises it (uploads, job validation, SSE, downloads)."""
    code = f"""
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from service.api.app import create_app
from service.db.engine import upgrade
from service.settings import Settings

s = Settings(data_dir=Path({str(tmp_path)!r}), api_keys=["k" * 20])
upgrade(s.db_url)
c = TestClient(create_app(s, sse_poll_seconds=0.05), headers={{"Authorization": "Bearer " + "k" * 20}})
assert c.get("/health").status_code == 200
assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200
m = c.post("/v1/models", params={{"architecture": "resnet20"}}, content=Path({str(weights_file)!r}).read_bytes())
assert m.status_code == 201, m.text
d = c.post("/v1/datasets", json={{"builtin": "digits"}}).json()["id"]
for bad in ({{"strategy": "sb3-ddpg", "strategy_options": {{"gamma": 0.9}}, "budget": 0}},
            {{"strategy": "optuna-nsga2", "criterion": "nope"}}, {{"strategy": "nope"}}):
    assert c.post("/v1/jobs", json={{"model_id": m.json()["id"], "dataset_id": d, **bad}}).status_code == 422
for strategy in ("sb3-ppo", "optuna-tpe", "random"):
    j = c.post("/v1/jobs", json={{"model_id": m.json()["id"], "dataset_id": d, "strategy": strategy}})
    assert j.status_code == 201, j.text
jid = j.json()["id"]
assert c.get(f"/v1/jobs/{{jid}}/models/best").status_code == 409
c.post(f"/v1/jobs/{{jid}}/cancel")
with c.stream("GET", f"/v1/jobs/{{jid}}/events") as r:
    assert "cancelled" in r.read().decode()
assert c.get("/v1/catalog").status_code == 200
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_server_process_has_no_torch_loaded(server: Server, api: httpx.Client, weights_file: Path) -> None:
    """The real uvicorn process, after serving uploads and jobs: no torch shared library is mapped in it."""
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("no /proc on this platform")
    api.post("/v1/models", params={"architecture": "resnet20"}, content=weights_file.read_bytes())
    mapped = maps.read_text()
    assert "libtorch" not in mapped and "/torch/" not in mapped
    assert "/onnxruntime/" not in mapped


def test_builtin_architecture_names_match_the_registry() -> None:
    """The API's torch-free list equals what ``list_architectures()`` (which imports torch) reports."""
    from service.api import catalog

    code = (
        "import json; from autoprune.models.registry import list_architectures; print(json.dumps(list_architectures()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == catalog.architectures()
    assert set(catalog.BUILTIN_ARCHITECTURES) <= set(json.loads(out.stdout))


def test_pt2_allow_list_has_one_torch_free_home() -> None:
    code = (
        "import sys, autoprune.models.pt2_archive, service.api.uploads as u;"
        "assert u.archive_entries is autoprune.models.pt2_archive.archive_entries;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_openapi_30_conversion() -> None:
    from service.api.app import openapi_30

    doc = openapi_30(
        {
            "openapi": "3.1.0",
            "components": {
                "schemas": {
                    "A": {
                        "properties": {
                            "n": {"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "null"}]},
                            "r": {"anyOf": [{"$ref": "#/components/schemas/B"}, {"type": "null"}]},
                            "c": {"const": "x", "type": "string"},
                            "t": {"type": ["string", "null"], "examples": ["a"]},
                        }
                    }
                }
            },
        }
    )
    props = doc["components"]["schemas"]["A"]["properties"]
    assert doc["openapi"] == "3.0.3"
    assert props["n"] == {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "nullable": True}
    assert props["r"] == {"allOf": [{"$ref": "#/components/schemas/B"}], "nullable": True}
    assert props["c"] == {"enum": ["x"], "type": "string"}
    assert props["t"] == {"type": "string", "nullable": True, "example": "a"}
