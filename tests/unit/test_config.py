"""Settings: typed, validated at start-up, secrets never printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cli.settings import CliSettings
from common import config
from common.config import ConfigError, Secret
from services.dlq.settings import DlqSettings
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent.parent.parent


def test_defaults_follow_the_contract() -> None:
    s = CliSettings.from_env({})
    assert (s.gateway_port, s.state_port, s.agent_port, s.dlq_port) == (8080, 50051, 50052, 50053)
    assert s.agent_addr == "127.0.0.1:50052"
    assert (s.agent_backend, s.agent_token_limit, s.agent_max_retries) == ("rules", 4000, 3)
    assert (s.dlq_max_attempts, s.dlq_retry_base_seconds) == (3, 30.0)
    assert s.dlq_max_defer_seconds == 1800.0
    assert (s.stuck_timeout_seconds, s.lock_ttl_seconds) == (120.0, 120.0)
    assert s.enhanced_processing and s.api_base_url == "https://graph.facebook.com"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({"AGENT_BACKEND": "magic"}, "AGENT_BACKEND"),
        ({"WA_ENHANCED_PROCESSING": "maybe"}, "WA_ENHANCED_PROCESSING"),
        ({"WA_OTEL_FAST_PATH": "fast"}, "WA_OTEL_FAST_PATH"),
        ({"AGENT_TOKEN_LIMIT": "0"}, "AGENT_TOKEN_LIMIT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"DLQ_MAX_DEFER_SECONDS": "-1"}, "DLQ_MAX_DEFER_SECONDS"),
        ({"DLQ_MAX_DEFER_SECONDS": "soon"}, "DLQ_MAX_DEFER_SECONDS"),
        ({"GATEWAY_MAX_BODY_BYTES": "16777217"}, "GATEWAY_MAX_BODY_BYTES"),
        ({"AGENT_MAX_RETRIES": "-1"}, "AGENT_MAX_RETRIES"),
        ({"STUCK_TIMEOUT_SECONDS": "0"}, "STUCK_TIMEOUT_SECONDS"),
    ],
)
def test_bad_values_fail_start_up_naming_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        CliSettings.from_env(env)


def test_secrets_never_print() -> None:
    s = CliSettings.from_env({"WHATSAPP_APP_SECRET": "hunter2", "OPENAI_API_KEY": "sk-live"})
    assert "hunter2" not in repr(s) and "sk-live" not in str(s)
    assert s.app_secret.reveal() == "hunter2"
    assert not Secret("")


def test_the_gateway_refuses_to_start_without_a_secret() -> None:
    with pytest.raises(ConfigError, match="WHATSAPP_APP_SECRET"):
        create_app(CliSettings.from_env({}))
    create_app(CliSettings.from_env({"WHATSAPP_SKIP_SIGNATURE": "true"}))
    create_app(CliSettings.from_env({"WHATSAPP_APP_SECRET": "s"}))


def test_skipping_the_signature_is_refused_while_a_secret_is_set() -> None:
    with pytest.raises(ConfigError, match="WHATSAPP_SKIP_SIGNATURE"):
        GatewaySettings.from_env({"WHATSAPP_SKIP_SIGNATURE": "true", "WHATSAPP_APP_SECRET": "s"})


def test_a_secret_that_cannot_be_used_is_named_never_printed() -> None:
    with pytest.raises(ConfigError) as caught:
        GatewaySettings.from_env(
            {"WHATSAPP_SKIP_SIGNATURE": "yes", "WHATSAPP_APP_SECRET": "hunter2"}
        )
    assert "hunter2" not in str(caught.value)


def test_each_service_reads_only_its_own_settings() -> None:
    # A dead-letter setting the gateway does not use cannot keep the gateway from starting.
    assert GatewaySettings.from_env({"DLQ_MAX_ATTEMPTS": "0"}).gateway_port == 8080
    with pytest.raises(ConfigError, match="DLQ_MAX_ATTEMPTS"):
        DlqSettings.from_env({"DLQ_MAX_ATTEMPTS": "0"})
    assert "DLQ_MAX_ATTEMPTS" not in config.variables(GatewaySettings)
    assert "WHATSAPP_APP_SECRET" not in config.variables(DlqSettings)


def test_the_environment_wins_over_dotenv_which_wins_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "GATEWAY_PORT=9001\nGATEWAY_HOST=10.0.0.1\nWHATSAPP_VERIFY_TOKEN=\n"
        "WHATSAPP_SKIP_SIGNATURE=true\nGRPC_INSECURE=true\nDLQ_POLL_SECONDS=5\n"
    )
    monkeypatch.chdir(tmp_path)
    for name in config.variables(CliSettings):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GATEWAY_PORT", "9002")
    # A variable set empty in the environment hides .env's value: the default applies.
    monkeypatch.setenv("DLQ_POLL_SECONDS", "")
    config.dotenv.cache_clear()
    try:
        s = CliSettings.from_env()
    finally:
        config.dotenv.cache_clear()
    assert (s.gateway_port, s.gateway_host, s.dlq_poll_seconds) == (9002, "10.0.0.1", 1.0)
    # Authentication is switched off in the environment only, never by a file.
    assert not s.skip_signature and not s.grpc_insecure and not s.verify_token


def test_otel_variables_of_dotenv_reach_the_sdk(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9\nOTEL_SERVICE_NAME=from-dotenv\n"
    )
    script = (
        "import os\n"
        "from common import config, runtime, telemetry\n"
        "runtime.load_settings(config.Base, 'probe')\n"
        "print(telemetry.export_enabled(), os.environ['OTEL_SERVICE_NAME'])\n"
        "telemetry.shutdown_telemetry()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={
            **env,
            "PYTHONPATH": str(ROOT),
            "OTEL_SERVICE_NAME": "from-environment",
            "GRPC_INSECURE": "true",  # no certificates in this folder
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "from-environment"]


@pytest.mark.parametrize(
    ("argv", "env", "variable"),
    [
        (["-m", "services.state"], {"METRICS_PORT": "abc"}, "METRICS_PORT"),
        (["-m", "services.agent"], {"METRICS_PORT": "abc"}, "METRICS_PORT"),
        (["-m", "services.dlq"], {"DLQ_MAX_ATTEMPTS": "0"}, "DLQ_MAX_ATTEMPTS"),
        (["-m", "services.gateway"], {"GATEWAY_PORT": "x"}, "GATEWAY_PORT"),
        (["-m", "services.state"], {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        # Without its certificate a service says which file and how to make it.
        (["-m", "services.agent"], {}, ".run/tls/ca.crt (No such file or directory)"),
        (["-m", "services.gateway"], {}, "`wa certs create --dir .run/tls`"),
        (["-m", "services.dlq"], {"GRPC_TLS_DIR": "/nowhere"}, "cannot read /nowhere/ca.crt"),
    ],
)
def test_a_service_with_a_setting_it_cannot_parse_logs_one_critical_line_and_exits_2(
    argv: list[str], env: dict[str, str], variable: str, tmp_path: Path
) -> None:
    # The process starts in an empty folder (no .env) and stops before it opens anything.
    done = subprocess.run(
        [sys.executable, *argv],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [orjson.loads(line) for line in done.stderr.splitlines() if line.strip()]
    (critical,) = [line for line in lines if line["level"] == "CRITICAL"]
    assert variable in critical["msg"]


def test_wa_without_the_operators_certificate_says_which_file_in_one_line_and_exits_2(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "wa"), "dlq", "list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cannot read .run/tls/ca.crt" in done.stderr and "wa certs create" in done.stderr


@pytest.mark.parametrize(
    "args",
    [["dlq", "list"], ["health"], ["stats"], ["trace", "wamid.X"], ["migrate"]],
)
def test_wa_with_a_setting_it_cannot_parse_says_so_in_one_line_and_exits_2(
    args: list[str], tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "wa"), *args],
        env={**os.environ, "METRICS_PORT": "abc"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "METRICS_PORT" in done.stderr
