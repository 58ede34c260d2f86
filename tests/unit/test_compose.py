"""docker-compose.yml cannot run here; it is kept correct by construction and checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cli.run import SERVICES, service_command
from common import config

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def test_compose_parses_and_every_service_has_a_healthcheck() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "jaeger", "migrate", *SERVICES} <= set(services)
    for name, spec in services.items():
        check = spec.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name


def test_compose_runs_what_make_run_runs() -> None:
    services = _compose()["services"]
    images = set()
    for name in SERVICES:
        spec = services[name]
        assert spec["command"] == service_command(name, "python")
        images.add(spec["image"])
        assert spec["build"] == "."
    assert services["migrate"]["command"] == ["python", "-m", "common.migrate"]
    images.add(services["migrate"]["image"])
    assert len(images) == 1, "one image for every service"


def test_compose_environment_names_settings_that_exist() -> None:
    env = _compose()["x-service-env"]
    known = config.variables()
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert env["STATE_ADDR"] == "dns:///state:50051"
    settings = config.CliSettings.from_env(
        {
            k: str(v).split(":-")[-1].rstrip("}") if "${" in str(v) else str(v)
            for k, v in env.items()
        }
    )
    assert settings.agent_addr == "dns:///agent:50052"
    assert settings.database_url and settings.redis_url and known


def test_dockerfile_generates_code_and_installs_from_the_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen" in text
    assert "python -m devtools.codegen" in text
