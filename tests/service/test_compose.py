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


def compose_config(**env: str) -> dict[str, Any]:
    """``docker-compose config`` (the compose tool's own validation and interpolation) with ``env`` as the
    only AUTOPRUNE_ variables. The README's ``make test`` installs the tool; CI fails without it."""
    import os
    import shutil

    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed: `make test` installs it (Debian package docker-compose)")
        pytest.skip("docker-compose is not installed (`make test` installs it)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPRUNE_")}
    proc = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)  # type: ignore[no-any-return]


def test_compose_validates_and_publishes_the_api_on_loopback_only() -> None:
    config = compose_config()
    api = config["services"]["api"]
    assert [str(p).split(":")[0] for p in api["ports"]] == ["127.0.0.1"]
    for name in ("db", "migrate", "worker"):
        assert not config["services"][name].get("ports"), name


def test_compose_ships_no_key_and_the_api_generates_one() -> None:
    from service.settings import Settings, weak_key_reason

    config = compose_config()
    for name in ("migrate", "api", "worker"):
        env = config["services"][name]["environment"]
        assert Settings(**{"api_keys": env["AUTOPRUNE_API_KEYS"]}).api_keys == [], name  # serve generates one
    mounts = [str(v) for v in config["services"]["api"]["volumes"]]
    assert any(v.split(":")[1] == "/data" for v in mounts)  # the generated key lands on the shared volume
    key = "an-operator-key-0123456789"
    assert weak_key_reason(key) is None
    given = compose_config(AUTOPRUNE_API_KEYS=key)["services"]["api"]["environment"]["AUTOPRUNE_API_KEYS"]
    assert Settings(api_keys=given).api_keys == [key]


def test_workers_share_the_measurement_lock_folder(compose: dict[str, Any]) -> None:
    """Replicas on one host take turns to time latency only if they see the same lock files: a named volume."""
    services = compose["services"]
    folder = services["worker"]["environment"]["AUTOPRUNE_MEASURE_LOCK_DIR"]
    mounts = [str(v).split(":") for v in services["worker"]["volumes"]]
    shared = [name for name, path, *_ in mounts if path == folder]
    assert shared and shared[0] in compose["volumes"]  # named, so every replica mounts the same one
