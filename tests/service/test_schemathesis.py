"""schemathesis against the live OpenAPI schema: no 5xx, responses conform to the schema (status codes, content
types, bodies, headers), every error is problem+json.

``positive_data_acceptance`` is excluded on purpose: a schema-valid request can still be refused for reasons the
schema cannot express (random bytes are a valid "binary" body but not a valid safetensors file; a well-formed
``model_id`` may name no model), and those refusals are correct."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

pytestmark = pytest.mark.slow
KEY = "schemathesis-key-0123456789"

if TYPE_CHECKING:
    from tests.service.conftest import ServerProcess


@pytest.fixture(scope="module")
def url(
    tmp_path_factory: pytest.TempPathFactory, running_server: Callable[..., AbstractContextManager[ServerProcess]]
) -> Iterator[str]:
    """A real `autoprune serve --no-worker` on SQLite (nothing runs jobs: the API alone is under test)."""
    data = tmp_path_factory.mktemp("st") / "data"
    with running_server(
        data, "--no-worker", AUTOPRUNE_API_KEYS=f'["{KEY}"]', AUTOPRUNE_MAX_UPLOAD_BYTES="3000000"
    ) as s:
        yield s.url


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
