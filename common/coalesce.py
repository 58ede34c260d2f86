"""Group commit for statements: concurrent calls of one operation go together in one round trip.

The turns of many conversations run at once, each issuing the same few statements (start a turn,
save it, finish it, take or give back a lease). Each statement has a fixed price on both sides
(a round trip, a transaction and its commit, the driver's encoding and the event loop's wake-ups)
that is larger than its row work. A `Coalescer` pays it once for whatever callers are waiting:

- nothing waits for a timer: while fewer than `max_in_flight` batches run, a call runs at once,
  alone, from its caller's own task (no task or future of ours: in an idle process the batcher
  costs nothing);
- while `max_in_flight` batches are running, new calls queue, and the next batch takes them all
  (up to `max_batch`), run by a task of ours in a fresh context (it belongs to no one caller's
  trace);
- each caller gets its own result, or its own exception, as if it had called alone.

`run` receives the arguments of one batch and returns one outcome per argument, in order: a
result, or an exception instance for that argument alone. An exception raised by `run` itself
fails every call of the batch. The gateway's acknowledgement batches the same way
(services/gateway/batcher.py).

A caller that is cancelled while its batch runs stops waiting; its part of a queued batch still
runs (as a call cut off by a crash would have); a call running alone is cancelled with it.
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
        self._in_flight = 0  # batches running: callers' own and our tasks
        self._size = BATCH_SIZE.labels(name)

    async def submit(self, arg: A) -> R:
        if self._in_flight < self.max_in_flight:
            # (Nothing queues while a batch could start: see _more.)
            self._in_flight += 1
            try:
                (outcome,) = await self._call([arg])
            finally:
                self._in_flight -= 1
                self._more()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((arg, future))
        return await future

    async def _call(self, args: list[A]) -> Sequence[R | BaseException]:
        self._size.observe(len(args))
        outcomes = await self._run(args)
        if len(outcomes) != len(args):
            raise RuntimeError(f"{self.name}: {len(outcomes)} outcomes for {len(args)} calls")
        return outcomes

    def _more(self) -> None:
        """A batch ended: the calls that queued meanwhile go in the next one."""
        if self._queue and self._in_flight < self.max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(
                self._drain(), name=f"coalesce-{self.name}", context=contextvars.Context()
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))
                ]
                try:
                    outcomes = await self._call([arg for arg, _ in batch])
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
        finally:
            self._in_flight -= 1

    async def close(self, timeout: float = 5.0) -> None:
        """Waits (at most `timeout` seconds) for the queued batches in flight; new calls still
        run. (A call running alone is its caller's to wait for.)"""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(set(self._tasks), timeout=timeout)
