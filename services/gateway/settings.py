"""What the gateway reads (README, Configuration)."""

from __future__ import annotations

from typing import Self

from pydantic import field_validator, model_validator

from common import config

from . import signature

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_BODY_BYTES_LIMIT = 16 * 1024 * 1024
# The old and the new secret while Meta's app secret is rotated.
MAX_APP_SECRETS = 2


class GatewaySettings(config.Base):
    # One secret, or two comma-separated during a rotation (README, Security).
    app_secret: config.Secret = config.env("WHATSAPP_APP_SECRET", config.Secret(""))
    skip_signature: bool = config.env("WHATSAPP_SKIP_SIGNATURE", False)
    verify_token: config.Secret = config.env("WHATSAPP_VERIFY_TOKEN", config.Secret(""))
    gateway_host: str = config.env("GATEWAY_HOST", "0.0.0.0")
    gateway_port: int = config.env("GATEWAY_PORT", 8080)
    # Replicas on one machine share GATEWAY_PORT (SO_REUSEPORT; `WA_SCALE` sets it). Off by
    # default: a second gateway started by mistake on a taken port then fails instead.
    reuse_port: bool = config.env("GATEWAY_REUSE_PORT", False)
    # Meta documents deliveries of up to 3 MB. One message (its text and its payload, each up
    # to the body) must fit the internal gRPC message limit.
    max_body_bytes: int = config.env("GATEWAY_MAX_BODY_BYTES", MAX_BODY_BYTES, gt=0)
    # Against a hostile internet (README, Security): requests served at once (connections or
    # requests in progress) before the next is answered 503 at once.
    max_concurrency: int = config.env("GATEWAY_MAX_CONCURRENCY", 1000, gt=0)
    # A connection whose request line and headers are not complete this long after it opened
    # (or after its previous response) is closed: slowloris.
    header_timeout_seconds: float = config.env("GATEWAY_HEADER_TIMEOUT_SECONDS", 10.0, gt=0)
    max_header_bytes: int = config.env("GATEWAY_MAX_HEADER_BYTES", 64 * 1024, gt=0)
    # A body not complete this long after its headers is answered 408 and its connection closed.
    body_timeout_seconds: float = config.env("GATEWAY_BODY_TIMEOUT_SECONDS", 30.0, gt=0)
    # Deliveries waiting for the group commit: beyond either bound a delivery is answered 503
    # with Retry-After at once instead of queueing (memory stays bounded while state is slow).
    queue_max_deliveries: int = config.env("GATEWAY_QUEUE_MAX_DELIVERIES", 1024, gt=0)
    queue_max_bytes: int = config.env("GATEWAY_QUEUE_MAX_BYTES", 64 * 1024 * 1024, gt=0)
    # A delivery of statuses only (no customer waits on it) may wait this long for others to
    # share its call to the state service and its transaction (services/gateway/batcher.py).
    status_linger_seconds: float = config.env("GATEWAY_STATUS_LINGER_SECONDS", 0.05, ge=0, le=1)
    retry_after_seconds: int = config.env("GATEWAY_RETRY_AFTER_SECONDS", 1, ge=0)
    # /readyz answers from a check made in the background this often.
    ready_refresh_seconds: float = config.env("GATEWAY_READY_REFRESH_SECONDS", 2.0, gt=0)

    @field_validator("max_body_bytes")
    @classmethod
    def _within_grpc_limit(cls, value: int) -> int:
        if value > MAX_BODY_BYTES_LIMIT:
            raise ValueError(f"must be between 1 and {MAX_BODY_BYTES_LIMIT}")
        return value

    @field_validator("app_secret")
    @classmethod
    def _at_most_two(cls, value: config.Secret) -> config.Secret:
        if len(signature.secrets_of(value.reveal())) > MAX_APP_SECRETS:
            raise ValueError(
                f"at most {MAX_APP_SECRETS} comma-separated secrets (the old and the new)"
            )
        return value

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> Self:
        if self.skip_signature and self.app_secret:
            raise ValueError(
                "WHATSAPP_SKIP_SIGNATURE=true is refused while WHATSAPP_APP_SECRET is set"
            )
        return self

    def app_secrets(self) -> tuple[str, ...]:
        """The app secrets a delivery may be signed with; the first is the one to sign with."""
        return signature.secrets_of(self.app_secret.reveal())
