"""schemathesis against the live OpenAPI schema: no 5xx, responses conform to the schema (status codes, content
types, bodies, headers), every error is problem+json.

``positive_data_acceptance`` is excluded on purpose: a schema-valid request can still be refused for reasons the
schema cannot express (random bytes are a valid "binary" body but not a valid safetensors file; a well-formed
``model_id`` may name no model), and those refusals are correct."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY = "schemathesis-key-0123456789"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `autoprune serve --no-worker` on SQLite (nothing runs jobs: the API alone is under test)."""
    root = tmp_path_factory.mktemp("st")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPRUNE_")}
    env.update(AUTOPRUNE_API_KEYS=f'["{KEY}"]', AUTOPRUNE_MAX_UPLOAD_BYTES="3000000")
    log = root / "server.log"
    args = [sys.executable, "-m", "service.cli", "serve", "--no-worker", "--port", str(port)]
    with log.open("wb") as fh:
        proc = subprocess.Popen([*args, "--data-dir", str(root / "data")], stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_no_server_errors_and_responses_match_the_schema(url: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--generation-deterministic",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    problems = [line for line in proc.stdout.splitlines() if "Server error" in line or "500" in line.split()]
    assert not problems, problems
