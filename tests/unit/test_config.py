"""Settings: typed, validated at start-up, secrets never printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from common.config import ConfigError, Secret, Settings
from services.gateway.app import create_app

ROOT = Path(__file__).resolve().parent.parent.parent


def test_defaults_follow_the_contract() -> None:
    s = Settings.from_env({})
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
        ({"AGENT_TOKEN_LIMIT": "0"}, "AGENT_TOKEN_LIMIT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"DLQ_MAX_DEFER_SECONDS": "-1"}, "DLQ_MAX_DEFER_SECONDS"),
        ({"DLQ_MAX_DEFER_SECONDS": "soon"}, "DLQ_MAX_DEFER_SECONDS"),
    ],
)
def test_bad_values_fail_start_up_naming_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Settings.from_env(env)


def test_secrets_never_print() -> None:
    s = Settings.from_env({"WHATSAPP_APP_SECRET": "hunter2", "OPENAI_API_KEY": "sk-live"})
    assert "hunter2" not in repr(s) and "sk-live" not in str(s)
    assert s.app_secret.reveal() == "hunter2"
    assert not Secret("")


def test_the_gateway_refuses_to_start_without_a_secret() -> None:
    with pytest.raises(ConfigError, match="WHATSAPP_APP_SECRET"):
        create_app(Settings.from_env({}))
    create_app(Settings.from_env({"WHATSAPP_SKIP_SIGNATURE": "true"}))
    create_app(Settings.from_env({"WHATSAPP_APP_SECRET": "s"}))


@pytest.mark.parametrize(
    ("argv", "env", "variable"),
    [
        (["-m", "services.state"], {"METRICS_PORT": "abc"}, "METRICS_PORT"),
        (["-m", "services.agent"], {"METRICS_PORT": "abc"}, "METRICS_PORT"),
        (["-m", "services.dlq"], {"DLQ_MAX_ATTEMPTS": "0"}, "DLQ_MAX_ATTEMPTS"),
        (["-m", "services.gateway"], {"GATEWAY_PORT": "x"}, "GATEWAY_PORT"),
        (["-m", "services.state"], {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
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
