"""What the dlq service reads (README, Configuration)."""

from __future__ import annotations

from common import config


class DlqSettings(config.Base):
    # Its own login role (common/roles.py), never the owner's DATABASE_URL.
    database_url: str = config.env("DLQ_DATABASE_URL", "")
    dlq_max_attempts: int = config.env("DLQ_MAX_ATTEMPTS", 3, gt=0)
    dlq_retry_base_seconds: float = config.env("DLQ_RETRY_BASE_SECONDS", 30.0)
    dlq_max_defer_seconds: float = config.env("DLQ_MAX_DEFER_SECONDS", 1800.0, ge=0)
    dlq_poll_seconds: float = config.env("DLQ_POLL_SECONDS", 1.0)
