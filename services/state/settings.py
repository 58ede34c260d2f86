"""What the state service reads (README, Configuration)."""

from __future__ import annotations

from pydantic import field_validator

from common import config

# Meta delivers a message again for up to 7 days: a message id pruned sooner than this could
# come back and be processed a second time (wa_retention_min_days() in the database agrees).
MIN_RETENTION_DAYS = 8


class StateSettings(config.TurnLimits):
    # Its own login role (common/roles.py), never the owner's DATABASE_URL.
    database_url: str = config.env("STATE_DATABASE_URL", "")
    lock_ttl_seconds: float = config.env("CONVERSATION_LOCK_TTL_SECONDS", 120.0, gt=0)
    enhanced_processing: bool = config.env("WA_ENHANCED_PROCESSING", True)
    max_concurrent_conversations: int = config.env("MAX_CONCURRENT_CONVERSATIONS", 64)
    # On SIGTERM, how long the turns in flight may take to finish before they are cut off and
    # their conversations handed back to the other replicas: long enough for a model's usual
    # answer, within the orchestrator's grace (45 s in compose and Kubernetes; `make run`
    # gives 2 s).
    drain_seconds: float = config.env("DRAIN_SECONDS", 15.0, ge=0)
    retention_days: int = config.env("RETENTION_DAYS", 90)
    retention_interval_seconds: float = config.env("RETENTION_INTERVAL_SECONDS", 3600.0, gt=0)
    retention_batch_size: int = config.env("RETENTION_BATCH_SIZE", 500, ge=1, le=10_000)

    @field_validator("retention_days")
    @classmethod
    def _keeps_duplicate_guards(cls, value: int) -> int:
        if value < MIN_RETENTION_DAYS:
            raise ValueError(
                f"must be at least {MIN_RETENTION_DAYS}: Meta delivers a message again for up "
                "to 7 days, and a message id pruned sooner would be processed a second time"
            )
        return value
