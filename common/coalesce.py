"""Group commit for statements: concurrent calls of one operation go together in one round trip.

The turns of many conversations run at once, each issuing the same few statements (start a turn,
save it, finish it, take or give back a lease). Each statement has a fixed price on both sides
(a round trip, a transaction and its commit, the driver's encoding and the event loop's wake-ups)
that is larger than its row work. A `Coalescer` pays it once for whatever callers are waiting:

- nothing waits for a timer: an idle process runs each call at once, alone;
- while `max_in_flight` batches are running, new calls queue, and the next batch takes them all
  (up to `max_batch`);
- each caller gets its own result, or its own exception, as if it had called alone.

`run` receives the arguments of one batch and returns one outcome per argument, in order: a
result, or an exception instance for that argument alone. An exception raised by `run` itself
fails every call of the batch. The gateway's acknowledgement batches the same way
(services/gateway/batcher.py).

A caller that is cancelled while its batch runs stops waiting; its part of the batch still runs
(as a call cut off by a crash would have).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")

BATCH_SIZE = Histogram(
    "wa_coalesced_batch_size",
    "Calls run together in one round trip, by operation",
    ["operation"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


class Coalescer(Generic[A, R]):
    def __init__(
        self,
        name: str,
        run: Callable[[list[A]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 64,
        max_in_flight: int = 2,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self.name = name
        self._run = run
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: deque[tuple[A, asyncio.Future[R]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._size = BATCH_SIZE.labels(name)

    async def submit(self, arg: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((arg, future))
        if len(self._tasks) < self.max_in_flight:
            # A fresh context: a batch serves many callers and must not run in (or be traced
            # as part of) whichever one happened to start it.
            task = asyncio.create_task(
                self._drain(), name=f"coalesce-{self.name}", context=contextvars.Context()
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self._size.observe(len(batch))
            try:
                outcomes = await self._run([arg for arg, _ in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(
                        f"{self.name}: {len(outcomes)} outcomes for {len(batch)} calls"
                    )
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # handed to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue  # its caller stopped waiting
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def close(self, timeout: float = 5.0) -> None:
        """Waits (at most `timeout` seconds) for the batches in flight; new calls still run."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(set(self._tasks), timeout=timeout)
