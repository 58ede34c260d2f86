"""The one deadline of a turn, end to end: the state service's gRPC deadline, less a margin to
answer in, bounds every model and Graph API call of the turn, every retry's sleep (Retry-After
included) and the wait for a send's confirmation. A turn that outlives it could overlap the next
turn of the same message, so past it nothing is sent."""

from __future__ import annotations

import math
import time


class TurnTimeout(Exception):
    """The turn ran out of time before it could finish: a failed, retryable attempt."""

    error_class = "TurnTimeout"


# Time kept back from the caller's deadline to record the outcome and answer before it.
ANSWER_MARGIN_SECONDS = 1.0
# A send is only started with at least this much time left: one that the deadline cuts off
# leaves the customer maybe answered and us not knowing.
SEND_MARGIN_SECONDS = 0.5


class Deadline:
    def __init__(self, at: float | None = None) -> None:
        self.at = at  # time.monotonic() value; None: unbounded (tests, tools)

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        """From a gRPC `time_remaining()` (None when the caller set no deadline)."""
        if seconds is None:
            return cls(None)
        margin = min(ANSWER_MARGIN_SECONDS, seconds * 0.1)
        return cls(time.monotonic() + seconds - margin)

    def remaining(self) -> float:
        if self.at is None:
            return math.inf
        return max(0.0, self.at - time.monotonic())

    def bound(self, timeout: float) -> float:
        """`timeout`, or what remains of the turn when that is less."""
        return min(timeout, self.remaining())

    def allows(self, seconds: float) -> bool:
        """Whether `seconds` more (a sleep, a call) still end before the deadline."""
        return seconds < self.remaining()

    def check(self, what: str, margin: float = 0.0) -> None:
        if self.remaining() <= margin:
            raise TurnTimeout(f"the turn's deadline left no time to {what}")


UNBOUNDED = Deadline(None)
