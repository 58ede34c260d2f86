"""What the agent service reads (README, Configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from common import config

from . import limits, replies

# AGENT_FALLBACK_REPLY's default.
FALLBACK_REPLY = (
    "Sorry, I can't open this kind of message here. "
    "Could you write what you need in a text message?"
)


class AgentSettings(config.TurnLimits):
    # Its own login role (common/roles.py), never the owner's DATABASE_URL.
    database_url: str = config.env("AGENT_DATABASE_URL", "")
    access_token: config.Secret = config.env("WHATSAPP_ACCESS_TOKEN", config.Secret(""))
    api_base_url: str = config.env("WHATSAPP_API_BASE_URL", "https://graph.facebook.com")
    api_version: str = config.env("WHATSAPP_API_VERSION", "v23.0")
    agent_backend: Literal["rules", "openai"] = config.env("AGENT_BACKEND", "rules")
    agent_config: Path = config.env("AGENT_CONFIG", Path("config/agents.toml"))
    openai_base_url: str = config.env("OPENAI_BASE_URL", "https://api.openai.com/v1")
    openai_api_key: config.Secret = config.env("OPENAI_API_KEY", config.Secret(""))
    agent_model: str = config.env("AGENT_MODEL", "gpt-4o-mini")
    agent_token_limit: int = config.env("AGENT_TOKEN_LIMIT", 4000, gt=0)
    # The stored context keeps this many newest messages (user and assistant); older ones are
    # dropped, so the context's size and each turn's write of it stop growing.
    context_max_messages: int = config.env("AGENT_CONTEXT_MAX_MESSAGES", 100, ge=2, le=10_000)
    # On SIGTERM, how long the turns in flight may take to finish and be answered before they
    # are cut off (and asked again on another replica): the gRPC server's grace. Within the
    # orchestrator's (30 s in compose and Kubernetes; `make run` gives 2 s).
    drain_seconds: float = config.env("AGENT_DRAIN_SECONDS", 20.0, ge=0)
    breaker_threshold: int = config.env("AGENT_BREAKER_THRESHOLD", 5)
    breaker_reset_seconds: float = config.env("AGENT_BREAKER_RESET_SECONDS", 30.0)
    # Sent instead of a reply outside WhatsApp's 24-hour customer service window (an approved
    # template without parameters); empty: such a message is dead-lettered, not answered.
    window_template: str = config.env("WHATSAPP_WINDOW_TEMPLATE", "")
    window_template_language: str = config.env("WHATSAPP_WINDOW_TEMPLATE_LANGUAGE", "en_US")

    # Voice notes: an OpenAI-compatible /audio/transcriptions root; empty: not transcribed,
    # answered with the fallback reply.
    transcription_url: str = config.env("TRANSCRIPTION_URL", "")
    transcription_api_key: config.Secret = config.env("TRANSCRIPTION_API_KEY", config.Secret(""))
    transcription_model: str = config.env("TRANSCRIPTION_MODEL", "whisper-1")
    # A customer's media is held in memory for its turn: larger files are refused unread.
    media_max_bytes: int = config.env("MEDIA_MAX_BYTES", 16 * 1024 * 1024, gt=0)
    # Sent, without calling the model, for a message that cannot be read (README, "What
    # customers can send").
    fallback_reply: str = config.env("AGENT_FALLBACK_REPLY", FALLBACK_REPLY)

    @field_validator("api_base_url", "openai_base_url", "transcription_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("fallback_reply")
    @classmethod
    def _sendable(cls, value: str) -> str:
        value = value.strip()
        if not value or limits.length(value) > limits.TEXT_BODY_MAX:
            raise ValueError(f"must be 1 to {limits.TEXT_BODY_MAX} characters")
        return value

    def window_template_reply(self) -> replies.Structured | None:
        if not self.window_template.strip():
            return None
        return replies.template(self.window_template, self.window_template_language)
