"""docker-compose.yml cannot run here; it is kept correct by construction and checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from opentelemetry.sdk import environment_variables as otel_environment

from cli.run import SERVICES, service_command
from cli.settings import CliSettings
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


def known_variables() -> frozenset[str]:
    """What the services read: every variable of the settings model, and OpenTelemetry's own
    (the SDK reads `OTEL_*` from the environment)."""
    otel = {
        value
        for name, value in vars(otel_environment).items()
        if name.startswith("OTEL_") and isinstance(value, str)
    }
    return config.variables(CliSettings) | otel


def _app_environments() -> dict[str, dict[str, Any]]:
    """The environment of every container running our image (the services and migrate)."""
    return {
        name: spec.get("environment") or {}
        for name, spec in _compose()["services"].items()
        if spec.get("image") == "wa-agents:latest"
    }


def test_compose_sets_only_variables_the_services_read() -> None:
    known = known_variables()
    environments = _app_environments()
    assert set(environments) >= {"migrate", *SERVICES}
    for name, env in environments.items():
        unknown = sorted(set(env) - known)
        assert unknown == [], f"{name}: {unknown} (misspelt, or read by nothing)"


def test_compose_environment_is_a_configuration_the_services_accept() -> None:
    env = _compose()["x-service-env"]
    assert env["DATABASE_URL"].startswith("postgresql://")
    settings = CliSettings.from_env(
        {
            k: str(v).split(":-")[-1].rstrip("}") if "${" in str(v) else str(v)
            for k, v in env.items()
            if k in config.variables(CliSettings)
        }
    )
    assert settings.state_addr == "dns:///state:50051"
    assert settings.agent_addr == "dns:///agent:50052"
    assert settings.dlq_addr == "dns:///dlq:50053"
    assert settings.database_url == env["DATABASE_URL"]
    assert settings.redis_url == env["REDIS_URL"]
    assert settings.metrics_port == 9100


def test_dockerfile_generates_code_and_installs_from_the_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen" in text
    assert "python -m devtools.codegen" in text
