"""What the state service reads (README, Configuration)."""

from __future__ import annotations

from common import config


class StateSettings(config.TurnLimits):
    # Its own login role (common/roles.py), never the owner's DATABASE_URL.
    database_url: str = config.env("STATE_DATABASE_URL", "")
    lock_ttl_seconds: float = config.env("CONVERSATION_LOCK_TTL_SECONDS", 120.0, gt=0)
    enhanced_processing: bool = config.env("WA_ENHANCED_PROCESSING", True)
    max_concurrent_conversations: int = config.env("MAX_CONCURRENT_CONVERSATIONS", 64)
