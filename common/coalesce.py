"""Group commit for statements: concurrent calls of one operation go together in one round trip.

The turns of many conversations run at once, each issuing the same few statements (start a turn,
save it, finish it, take or give back a lease). Each statement has a fixed price on both sides
(a round trip, a transaction and its commit, the driver's encoding and the event loop's wake-ups)
that is larger than its row work. A `Coalescer` pays it once for whatever callers are waiting:

- nothing waits for a timer: while no batch runs, a call runs at once, alone, from its caller's
  own task (no task or future of ours: in an idle process the batcher costs nothing);
- while a batch runs, new calls queue, and the next batch takes them all (up to `max_batch`),
  run by a task of ours in a fresh context (it belongs to no one caller's trace);
- one batch at a time, normally, so that under load batches grow by themselves: a second one
  (up to `max_in_flight`) starts only when the latest has run longer than `stall_seconds`, so
  that one batch held up (a row lock, a slow commit) does not hold every call behind it. Two
  batches side by side as a rule halved the batches and cost a burst about a tenth more CPU
  a message (docs/benchmarks.md, "one batch at a time"); the gateway's acknowledgements
  batch the same way (services/gateway/batcher.py);
- each caller gets its own result, or its own exception, as if it had called alone.

`run` receives the arguments of one batch and returns one outcome per argument, in order: a
result, or an exception instance for that argument alone. An exception raised by `run` itself
fails every call of the batch.

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
        stall_seconds: float = 0.05,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        if stall_seconds < 0:
            raise ValueError("stall_seconds must not be negative")
        self.name = name
        self._run = run
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: deque[tuple[A, asyncio.Future[R]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stall_seconds = stall_seconds
        self._in_flight = 0  # batches running: callers' own and our tasks
        self._starts: list[float] = []  # of the batches running, by the loop's clock
        self._timer: asyncio.TimerHandle | None = None  # when the latest batch counts as stalled
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._size = BATCH_SIZE.labels(name)

    async def submit(self, arg: A) -> R:
        if self._in_flight == 0:
            # (Nothing queues while no batch runs: see _more.)
            self._in_flight += 1
            try:
                (outcome,) = await self._call([arg])
            finally:
                self._in_flight -= 1
                self._more()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((arg, future))
        self._more()
        return await future

    def _stalled(self) -> bool:
        """Whether every batch running has run for `stall_seconds` at least."""
        return not self._starts or (
            asyncio.get_running_loop().time() - self._starts[-1] >= self.stall_seconds
        )

    def _arm(self) -> None:
        """Calls wait behind a running batch: look again when it would count as stalled."""
        if self._queue and self._starts and self._in_flight < self.max_in_flight:
            loop = asyncio.get_running_loop()
            if self._timer is not None and self._timer_loop is loop:
                return
            self._timer_loop = loop
            self._timer = loop.call_at(self._starts[-1] + self.stall_seconds, self._stall)

    def _stall(self) -> None:
        self._timer = None
        self._more()  # (a batch started since the timer was set: arms it anew for that one)

    async def _call(self, args: list[A]) -> Sequence[R | BaseException]:
        self._size.observe(len(args))
        start = asyncio.get_running_loop().time()
        self._starts.append(start)
        if self._queue:  # (never on the alone path) what this batch left: relief when it stalls
            self._arm()
        try:
            outcomes = await self._run(args)
        finally:
            self._starts.remove(start)
        if len(outcomes) != len(args):
            raise RuntimeError(f"{self.name}: {len(outcomes)} outcomes for {len(args)} calls")
        return outcomes

    def _more(self) -> None:
        """The calls that queued go in a batch of their own now if none runs (one ended), or
        if the latest has stalled and another may start."""
        if not self._queue or self._in_flight >= self.max_in_flight:
            return
        if self._in_flight > len(self._starts):
            return  # a drain of ours has not started yet: it takes the queue
        if self._in_flight and not self._stalled():
            self._arm()
            return
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
                else:
                    for (_, future), outcome in zip(batch, outcomes, strict=True):
                        if future.done():
                            continue  # its caller stopped waiting
                        if isinstance(outcome, BaseException):
                            future.set_exception(outcome)
                        else:
                            future.set_result(outcome)
                if self._in_flight - 1 > len(self._starts) or not self._stalled():
                    # Another batch runs (started while this one stalled, or the other way
                    # round) and has not stalled itself: what queues waits for it, one batch
                    # at a time again.
                    break
        finally:
            self._in_flight -= 1
            # (A drain closed after its loop ended, at shutdown, has no loop to start one on.)
            with contextlib.suppress(RuntimeError):
                self._more()

    async def close(self, timeout: float = 5.0) -> None:
        """Waits (at most `timeout` seconds) until no call is queued and no batch of ours
        runs; new calls still run. (A call running alone is its caller's to wait for.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A drain may leave the queue to a batch started after this began (`break`), or to a
        # call running alone whose end starts the next drain: wait for those too.
        while (self._tasks or self._queue) and loop.time() < deadline:
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
            else:
                await asyncio.sleep(0.005)
        if self._timer is not None and not self._queue:
            self._timer.cancel()
            self._timer = None
