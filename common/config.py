"""Settings, read once at start-up: environment beats `.env` beats defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values


class ConfigError(Exception):
    """A setting is missing or malformed; the process must not start."""


class Secret:
    """A value that never prints."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


def _env() -> dict[str, str]:
    merged = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    merged.update(os.environ)
    return merged


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_BODY_BYTES_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    app_secret: Secret = field(default_factory=lambda: Secret(""))
    skip_signature: bool = False
    verify_token: Secret = field(default_factory=lambda: Secret(""))
    access_token: Secret = field(default_factory=lambda: Secret(""))
    api_base_url: str = "https://graph.facebook.com"
    api_version: str = "v23.0"
    gateway_host: str = "0.0.0.0"
    gateway_port: int = 8080
    # Meta documents deliveries of up to 3 MB.
    max_body_bytes: int = MAX_BODY_BYTES
    state_port: int = 50051
    agent_port: int = 50052
    dlq_port: int = 50053
    state_addr: str = "127.0.0.1:50051"
    agent_addr: str = "127.0.0.1:50052"
    dlq_addr: str = "127.0.0.1:50053"
    metrics_port: int = 0
    database_url: str = ""
    redis_url: str = ""
    redis_prefix: str = "wa:"
    run_dir: Path = Path(".run")
    agent_backend: str = "rules"
    agent_config: Path = Path("config/agents.toml")
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: Secret = field(default_factory=lambda: Secret(""))
    agent_model: str = "gpt-4o-mini"
    agent_token_limit: int = 4000
    agent_max_retries: int = 3
    breaker_threshold: int = 5
    breaker_reset_seconds: float = 30.0
    model_timeout_seconds: float = 10.0
    graph_timeout_seconds: float = 10.0
    graph_max_retries: int = 3
    send_confirm_seconds: float = 10.0
    dlq_max_attempts: int = 3
    dlq_retry_base_seconds: float = 30.0
    dlq_max_defer_seconds: float = 1800.0
    dlq_poll_seconds: float = 1.0
    stuck_timeout_seconds: float = 120.0
    lock_ttl_seconds: float = 120.0
    enhanced_processing: bool = True
    max_concurrent_conversations: int = 64
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = _env() if env is None else env
        state_port = _int(e, "STATE_GRPC_PORT", 50051)
        agent_port = _int(e, "AGENT_GRPC_PORT", 50052)
        dlq_port = _int(e, "DLQ_GRPC_PORT", 50053)
        backend = e.get("AGENT_BACKEND", "rules") or "rules"
        if backend not in {"rules", "openai"}:
            raise ConfigError(f"AGENT_BACKEND must be 'rules' or 'openai', got {backend!r}")
        level = (e.get("LOG_LEVEL", "INFO") or "INFO").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"LOG_LEVEL must be a logging level, got {level!r}")
        settings = cls(
            app_secret=Secret(e.get("WHATSAPP_APP_SECRET", "")),
            skip_signature=_bool(e, "WHATSAPP_SKIP_SIGNATURE", False),
            verify_token=Secret(e.get("WHATSAPP_VERIFY_TOKEN", "")),
            access_token=Secret(e.get("WHATSAPP_ACCESS_TOKEN", "")),
            api_base_url=(e.get("WHATSAPP_API_BASE_URL") or "https://graph.facebook.com").rstrip(
                "/"
            ),
            api_version=e.get("WHATSAPP_API_VERSION") or "v23.0",
            gateway_host=e.get("GATEWAY_HOST") or "0.0.0.0",
            gateway_port=_int(e, "GATEWAY_PORT", 8080),
            max_body_bytes=_int(e, "GATEWAY_MAX_BODY_BYTES", MAX_BODY_BYTES),
            state_port=state_port,
            agent_port=agent_port,
            dlq_port=dlq_port,
            state_addr=e.get("STATE_ADDR") or f"127.0.0.1:{state_port}",
            agent_addr=e.get("AGENT_ADDR") or f"127.0.0.1:{agent_port}",
            dlq_addr=e.get("DLQ_ADDR") or f"127.0.0.1:{dlq_port}",
            metrics_port=_int(e, "METRICS_PORT", 0),
            database_url=e.get("DATABASE_URL", ""),
            redis_url=e.get("REDIS_URL", ""),
            redis_prefix=e.get("REDIS_KEY_PREFIX") or "wa:",
            run_dir=Path(e.get("RUN_DIR") or ".run"),
            agent_backend=backend,
            agent_config=Path(e.get("AGENT_CONFIG") or "config/agents.toml"),
            openai_base_url=(e.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/"),
            openai_api_key=Secret(e.get("OPENAI_API_KEY", "")),
            agent_model=e.get("AGENT_MODEL") or "gpt-4o-mini",
            agent_token_limit=_int(e, "AGENT_TOKEN_LIMIT", 4000),
            agent_max_retries=_int(e, "AGENT_MAX_RETRIES", 3),
            breaker_threshold=_int(e, "AGENT_BREAKER_THRESHOLD", 5),
            breaker_reset_seconds=_float(e, "AGENT_BREAKER_RESET_SECONDS", 30.0),
            model_timeout_seconds=_float(e, "AGENT_TIMEOUT_SECONDS", 10.0),
            graph_timeout_seconds=_float(e, "WHATSAPP_TIMEOUT_SECONDS", 10.0),
            graph_max_retries=_int(e, "WHATSAPP_MAX_RETRIES", 3),
            send_confirm_seconds=_float(e, "WHATSAPP_SEND_CONFIRM_SECONDS", 10.0),
            dlq_max_attempts=_int(e, "DLQ_MAX_ATTEMPTS", 3),
            dlq_retry_base_seconds=_float(e, "DLQ_RETRY_BASE_SECONDS", 30.0),
            dlq_max_defer_seconds=_float(e, "DLQ_MAX_DEFER_SECONDS", 1800.0),
            dlq_poll_seconds=_float(e, "DLQ_POLL_SECONDS", 1.0),
            stuck_timeout_seconds=_float(e, "STUCK_TIMEOUT_SECONDS", 120.0),
            lock_ttl_seconds=_float(e, "CONVERSATION_LOCK_TTL_SECONDS", 120.0),
            enhanced_processing=_bool(e, "WA_ENHANCED_PROCESSING", True),
            max_concurrent_conversations=_int(e, "MAX_CONCURRENT_CONVERSATIONS", 64),
            log_level=level,
        )
        if settings.dlq_max_defer_seconds < 0:
            raise ConfigError("DLQ_MAX_DEFER_SECONDS must be zero or more")
        for name, value in (
            ("AGENT_TOKEN_LIMIT", settings.agent_token_limit),
            ("CONVERSATION_LOCK_TTL_SECONDS", settings.lock_ttl_seconds),
            ("STUCK_TIMEOUT_SECONDS", settings.stuck_timeout_seconds),
            ("DLQ_MAX_ATTEMPTS", settings.dlq_max_attempts),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if settings.agent_max_retries < 0:
            raise ConfigError("AGENT_MAX_RETRIES must be zero or more")
        if not 0 < settings.max_body_bytes <= MAX_BODY_BYTES_LIMIT:
            # One message (its text and its payload, each up to the body) must fit the
            # internal gRPC message limit.
            raise ConfigError(
                f"GATEWAY_MAX_BODY_BYTES must be between 1 and {MAX_BODY_BYTES_LIMIT}, "
                f"got {settings.max_body_bytes}"
            )
        return settings

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set (make run sets it for embedded servers)")
        return self.database_url

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError("REDIS_URL is not set (make run sets it for embedded servers)")
        return self.redis_url
