"""A circuit breaker per backend: after repeated failures it fails fast, then lets one call
through to probe whether the backend is back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger(__name__)

BREAKER_STATE = Gauge(
    "wa_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open", ["backend"]
)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_LEVEL = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class BreakerOpen(Exception):
    pass


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self.clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state = CLOSED
        self._probing = False
        BREAKER_STATE.labels(name).set(0)

    @property
    def state(self) -> str:
        if self._state == OPEN and self.clock() - self._opened_at >= self.reset_after:
            return HALF_OPEN
        return self._state

    def _set(self, state: str) -> None:
        if state != self._state:
            log.warning("circuit breaker %s: %s -> %s", self.name, self._state, state)
        self._state = state
        BREAKER_STATE.labels(self.name).set(_LEVEL[state])

    def before_call(self, *, probe: bool = False) -> None:
        """Raises BreakerOpen when calls must fail fast. A `probe` (an operator's explicit
        retry) goes through an open breaker, as the half-open probe would."""
        state = self.state
        if probe and state != CLOSED:
            self._probing = True
            self._set(HALF_OPEN)
            return
        if state == OPEN:
            raise BreakerOpen(f"circuit breaker for {self.name} is open")
        if state == HALF_OPEN:
            if self._probing:
                raise BreakerOpen(f"circuit breaker for {self.name} is probing")
            self._probing = True
            self._set(HALF_OPEN)

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._set(CLOSED)

    def failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self.clock()
            self._set(OPEN)
