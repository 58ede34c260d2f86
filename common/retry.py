"""Bounded retries: exponential backoff with full jitter."""

from __future__ import annotations

import random


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number `attempt` (1-based): uniform in [0, min(cap, base * 2^(n-1))]."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt - 1)))


def parse_retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds form), capped; None when absent/bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, min(seconds, cap))
