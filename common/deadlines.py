"""Futures awaited until a deadline, all kept by one coarse timer.

An `asyncio.timeout` per await (its object, a timer handle set and cancelled, the task's
cancellation state) costs more than the rest of a small request on a kept-alive connection or
of a turn sent on an open stream. Where many such awaits are in flight and a deadline may be
kept a little late, one timer per `Deadlines` looks at them every `every` seconds instead, and
fails each one past its deadline with the error its owner gives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Makes the error an await past its deadline fails with, from the seconds it was given.
Late = Callable[[float], BaseException]


class Deadlines:
    """Awaits futures until their deadlines, kept at most `every` seconds late."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._due: dict[asyncio.Future[object], tuple[float, float, Late]] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self, future: asyncio.Future[T], seconds: float, late: Late) -> T:
        """`future`'s result; past `seconds`, `future` fails with `late(seconds)` (so does
        this await), at most `every` seconds late."""
        self._due[future] = (time.monotonic() + seconds, seconds, late)  # type: ignore[index]
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.every, self._expire)
        try:
            return await future
        finally:
            del self._due[future]  # type: ignore[arg-type]

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        for future, (deadline, seconds, late) in list(self._due.items()):
            if deadline <= now and not future.done():
                future.set_exception(late(seconds))
        if self._due:
            self._timer = asyncio.get_running_loop().call_later(self.every, self._expire)

    def close(self) -> None:
        """Stops the timer: the awaits still in flight are no longer kept to their deadlines
        (their owner is closing and fails them itself)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
