"""docker-compose.yml cannot be started here (no compose plugin, no registry access for images): check what can be
checked — it parses, the dependency chain is db (healthy) -> migrate (completed) -> api + worker, every service
runs an `autoprune` command that exists, and its settings are ones the service reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_dependency_chain(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"db", "migrate", "api", "worker"}
    assert "healthcheck" in services["db"]
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["worker"]["deploy"]["replicas"] >= 2
    images = {services[n].get("image") for n in ("migrate", "api", "worker")}
    assert len(images) == 1  # one image, built once by the migrate service
    assert services["migrate"]["build"] == "."


@pytest.mark.parametrize("name", ["migrate", "api", "worker"])
def test_every_command_exists(compose: dict[str, Any], name: str) -> None:
    command = compose["services"][name]["command"]
    words = [w for w in command if not w.startswith("-")][:2]
    # the subcommand path (e.g. ["db", "upgrade"], ["serve"]) with every flag the service passes, and --help
    flags = [w for w in command if w.startswith("--")]
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *words, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for flag in flags:
        assert flag in proc.stdout, f"{name}: {flag} is not an option of `autoprune {' '.join(words)}`"


def test_environment_names_settings_the_service_reads(compose: dict[str, Any]) -> None:
    from service.settings import Settings

    fields = set(Settings.model_fields)
    for name in ("migrate", "api", "worker"):
        for key in compose["services"][name]["environment"]:
            assert key.startswith("AUTOPRUNE_")
            assert key.removeprefix("AUTOPRUNE_").lower() in fields, key


def test_dockerfile_pins_the_cpu_torch_and_the_constraints() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "-c /tmp/constraints.txt" in text
    assert 'ENTRYPOINT ["autoprune"]' in text
