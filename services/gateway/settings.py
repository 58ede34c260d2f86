"""What the gateway reads (README, Configuration)."""

from __future__ import annotations

from typing import Self

from pydantic import field_validator, model_validator

from common import config

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_BODY_BYTES_LIMIT = 16 * 1024 * 1024


class GatewaySettings(config.Base):
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

    @field_validator("max_body_bytes")
    @classmethod
    def _within_grpc_limit(cls, value: int) -> int:
        if value > MAX_BODY_BYTES_LIMIT:
            raise ValueError(f"must be between 1 and {MAX_BODY_BYTES_LIMIT}")
        return value

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> Self:
        if self.skip_signature and self.app_secret:
            raise ValueError(
                "WHATSAPP_SKIP_SIGNATURE=true is refused while WHATSAPP_APP_SECRET is set"
            )
        return self
