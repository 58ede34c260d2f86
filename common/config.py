"""Settings, declared once per service and read once at start-up: the environment beats `.env`
beats each field's one default. Field names are the code's; each field reads the variable of
README's configuration table named by its alias."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .redact import mask_urls

# Switch off a protection (the webhook's authentication, internal gRPC's mutual TLS, a service's
# refusal of a superuser or owner database role): only ever set on purpose, in the environment,
# never by a `.env` file left behind.
ENVIRONMENT_ONLY = frozenset(
    {"WHATSAPP_SKIP_SIGNATURE", "GRPC_INSECURE", "DATABASE_ALLOW_PRIVILEGED_ROLE"}
)


# Each service's PostgreSQL pool at most, when it runs alone: state and agent run many turns at
# once, dlq a worker and its operators' calls, the console its operators' pages. Replicas of a
# service share PostgreSQL: each backend costs it memory and, per backend, the warm-up of its
# caches and of every function's plans, so replicas divide this rather than multiply it
# (DATABASE_POOL_SIZE in compose and Kubernetes, which tests/unit check against a budget).
POOL_SIZES = {"state": 20, "agent": 20, "dlq": 10, "console": 10}


class ConfigError(Exception):
    """A setting is missing or malformed; the process must not start."""


class Secret(SecretStr):
    """A value that never prints (pydantic's SecretStr), revealed where it is used."""

    def reveal(self) -> str:
        return self.get_secret_value()


@functools.cache
def dotenv() -> dict[str, str]:
    """`.env` of the working directory, read once per process; empty values count as unset."""
    return {k: v for k, v in dotenv_values(".env").items() if v}


def export_otel_from_dotenv() -> None:
    """The OpenTelemetry SDK reads only the process environment: `.env`'s `OTEL_*` variables
    are copied there (the environment still wins) before telemetry starts."""
    for key, value in dotenv().items():
        if key.startswith("OTEL_"):
            os.environ.setdefault(key, value)


def env(name: str, default: Any, **constraints: Any) -> Any:
    """A field read from the variable `name`."""
    return Field(default, validation_alias=name, **constraints)


class _DotEnv(PydanticBaseSettingsSource):
    """`.env` below the environment: a variable set (even empty) in the environment hides it."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {
            k: v for k, v in dotenv().items() if k not in os.environ and k not in ENVIRONMENT_ONLY
        }


class Base(BaseSettings):
    """What every process reads: logging, the three gRPC services' ports and addresses, the
    servers, and how long work may be in flight before it is recovered."""

    model_config = SettingsConfigDict(
        case_sensitive=True, env_ignore_empty=True, extra="ignore", frozen=True
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = env("LOG_LEVEL", "INFO")
    metrics_port: int = env("METRICS_PORT", 0)
    state_port: int = env("STATE_GRPC_PORT", 50051)
    agent_port: int = env("AGENT_GRPC_PORT", 50052)
    dlq_port: int = env("DLQ_GRPC_PORT", 50053)
    # Empty: 127.0.0.1 and the service's port.
    state_target: str = env("STATE_ADDR", "")
    agent_target: str = env("AGENT_ADDR", "")
    dlq_target: str = env("DLQ_ADDR", "")
    # Internal gRPC: mutual TLS with the certificates of GRPC_TLS_DIR (empty: RUN_DIR/tls)
    # unless GRPC_INSECURE; servers listen on GRPC_HOST (README, Security).
    grpc_insecure: bool = env("GRPC_INSECURE", False)
    grpc_tls_dir: Path | None = env("GRPC_TLS_DIR", None)
    grpc_host: str = env("GRPC_HOST", "127.0.0.1")
    run_dir: Path = env("RUN_DIR", Path(".run"))
    # The owner's URL here; each service's settings read its own role's instead
    # (STATE_DATABASE_URL, ...: common/roles.py).
    database_url: str = env("DATABASE_URL", "")
    allow_privileged_role: bool = env("DATABASE_ALLOW_PRIVILEGED_ROLE", False)
    # Connections this process's PostgreSQL pool opens at most; 0: its service's own share,
    # POOL_SIZES (WA_SCALE divides it among the service's replicas: devtools/replicas.py).
    database_pool_size: int = env("DATABASE_POOL_SIZE", 0, ge=0, le=1000)
    redis_url: str = env("REDIS_URL", "")
    redis_prefix: str = env("REDIS_KEY_PREFIX", "wa:")
    stuck_timeout_seconds: float = env("STUCK_TIMEOUT_SECONDS", 120.0, gt=0)
    # false: the stock OpenTelemetry SDK span and exporter instead of fastotel's (README,
    # Observability), e.g. while an OpenTelemetry upgrade fails fastotel's tests.
    otel_fast_path: bool = env("WA_OTEL_FAST_PATH", True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _DotEnv(settings_cls)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """The process's settings, or (`env` given) those of exactly these variables."""
        try:
            if env is None:
                return cls()
            return cls.model_validate({k: v for k, v in env.items() if v != ""})
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc)) from None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def tls_dir(self) -> Path:
        return self.grpc_tls_dir or self.run_dir / "tls"

    @property
    def state_addr(self) -> str:
        return self.state_target or f"127.0.0.1:{self.state_port}"

    @property
    def agent_addr(self) -> str:
        return self.agent_target or f"127.0.0.1:{self.agent_port}"

    @property
    def dlq_addr(self) -> str:
        return self.dlq_target or f"127.0.0.1:{self.dlq_port}"

    @property
    def database_variable(self) -> str:
        """The variable `database_url` is read from (the owner's, or a service's own)."""
        return str(type(self).model_fields["database_url"].validation_alias)

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError(
                f"{self.database_variable} is not set (make run sets it; wa migrate provisions "
                "each service's role)"
            )
        return self.database_url

    def pool_size(self, service: str) -> int:
        """How many PostgreSQL connections `service`'s pool may open (DATABASE_POOL_SIZE)."""
        return self.database_pool_size or POOL_SIZES[service]

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError("REDIS_URL is not set (make run sets it for embedded servers)")
        return self.redis_url


class TurnLimits(Base):
    """A turn's model and Graph API bounds: the agent applies them, the state service derives
    each turn's deadline from them."""

    model_timeout_seconds: float = env("AGENT_TIMEOUT_SECONDS", 10.0)
    agent_max_retries: int = env("AGENT_MAX_RETRIES", 3, ge=0)
    graph_timeout_seconds: float = env("WHATSAPP_TIMEOUT_SECONDS", 10.0)
    graph_max_retries: int = env("WHATSAPP_MAX_RETRIES", 3)
    send_confirm_seconds: float = env("WHATSAPP_SEND_CONFIRM_SECONDS", 10.0)


def variables(cls: type[Base]) -> frozenset[str]:
    """The environment variables `cls` reads."""
    return frozenset(str(f.validation_alias) for f in cls.model_fields.values())


def _describe(cls: type[Base], exc: ValidationError) -> str:
    """One line naming each variable that cannot be used, and why; never a secret's value."""
    secret = {str(f.validation_alias) for f in cls.model_fields.values() if f.annotation is Secret}
    parts = []
    for error in exc.errors(include_url=False):
        msg = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            parts.append(msg)
            continue
        name = str(error["loc"][0])
        got = "" if name in secret else f", got {mask_urls(repr(error['input']))}"
        parts.append(f"{name}: {msg}{got}")
    return "; ".join(parts)
