"""What the state service reads (README, Configuration)."""

from __future__ import annotations

from common import config


class StateSettings(config.TurnLimits):
    lock_ttl_seconds: float = config.env("CONVERSATION_LOCK_TTL_SECONDS", 120.0, gt=0)
    enhanced_processing: bool = config.env("WA_ENHANCED_PROCESSING", True)
    max_concurrent_conversations: int = config.env("MAX_CONCURRENT_CONVERSATIONS", 64)
    # On SIGTERM, how long the turns in flight may take to finish before they are cut off and
    # their conversations handed back to the other replicas (within the orchestrator's grace).
    drain_seconds: float = config.env("DRAIN_SECONDS", 3.0, ge=0)
