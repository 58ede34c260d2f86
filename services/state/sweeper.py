"""Recovers acknowledged work that nobody is driving: never started, or stuck in flight.

Safe with several replicas: dispatching is guarded by the conversation lease, and a lease is only
broken when its holder's process heartbeat has expired (or the turn overran the stuck timeout);
fencing refuses any late write of the holder it replaced.

One sweep per interval for the whole cluster, not one per replica: a sweep looks at every
conversation, so a second replica's sweep in the same interval finds nothing the first did not
(and each costs PostgreSQL two scans). The replica that takes a Redis token (`SET NX PX`,
`token_key`) sweeps; the others look again when it expires. The token lasts one tick less than
the interval, so however many replicas run, and whichever of them dies (even right after taking
it), the next sweep starts at most `interval` after the last one: the bound a single replica
has always had. Every replica still heartbeats every tick (its leases' liveness is its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from common import telemetry

from . import metrics, store
from .dispatcher import Dispatcher, dead_letter
from .locks import Locks
from .ports import DlqPort, Failure

log = logging.getLogger(__name__)

# Work younger than this is still in the hands of whoever acknowledged it.
UNSTARTED_GRACE_SECONDS = 3.0
# A conversation found free with work waiting is looked at again this long after, before it is
# taken as abandoned: one just released and about to be taken again (by its holder, which looks
# for work after each release, or by the replica a stopping one handed it to) is not.
SETTLE_SECONDS = 0.1
# A process whose heartbeat is older than this is gone; its leases can be broken.
HEARTBEAT_TTL_SECONDS = 5.0
# How often each replica heartbeats and looks whether a sweep is due.
TICK_SECONDS = 1.0


class Sweeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        locks: Locks,
        dispatcher: Dispatcher,
        dlq: DlqPort,
        *,
        stuck_timeout: float,
    ) -> None:
        self.pool = pool
        self.locks = locks
        self.dispatcher = dispatcher
        self.dlq = dlq
        self.stuck_timeout = stuck_timeout
        # Runs often enough that stuck work resumes well within 1.5 x the timeout.
        self.interval = max(1.0, min(stuck_timeout / 4, 15.0))
        # Held one tick less than the interval: a replica that looks at the first tick after it
        # expires starts the next sweep no later than `interval` after this one.
        self.token_ms = int(1000 * max(self.interval - TICK_SECONDS, TICK_SECONDS / 2))
        self.token_key = f"{locks.prefix}sweep"
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Heartbeats every second (so other replicas know our leases are live) and sweeps
        every `interval`, until stopped."""
        log.info("sweeper started", extra={"interval": self.interval})
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        with telemetry.untraced():
            await self._loop(loop, next_sweep)

    async def _loop(self, loop: asyncio.AbstractEventLoop, next_sweep: float) -> None:
        while not self._stop.is_set():
            try:
                if loop.time() < next_sweep:
                    await self.locks.heartbeat(HEARTBEAT_TTL_SECONDS)
                else:
                    wait = await self.heartbeat_and_take_turn()
                    next_sweep = loop.time() + (self.interval if wait is None else wait)
                    if wait is None:
                        await self._sweep()
            except Exception as exc:
                metrics.SWEEPS.labels("error").inc()
                log.warning("sweep failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_SECONDS):  # no task per tick, unlike wait_for
                    await self._stop.wait()

    async def heartbeat_and_take_turn(self) -> float | None:
        """Heartbeats and tries to take the cluster's sweep token, in one round trip (a
        pipeline: the two keys need not share a Redis Cluster slot). None: this replica sweeps
        now; else the seconds until the token is free."""
        async with self.locks.client.pipeline(transaction=False) as pipe:
            pipe.set(
                self.locks.heartbeat_key(self.locks.instance),
                "1",
                px=int(HEARTBEAT_TTL_SECONDS * 1000),
            )
            pipe.set(self.token_key, self.locks.instance, nx=True, px=self.token_ms)
            pipe.pttl(self.token_key)
            _, taken, left_ms = await pipe.execute()
        left = int(left_ms)
        # -1: a token without expiry (never set so here): sweeping beside it is always safe.
        if taken or left == -1:
            return None
        return max(0, left) / 1000  # -2: gone since: look again at the next tick

    async def _sweep(self) -> None:
        recovered = await self.sweep_once()
        metrics.SWEEPS.labels("ok").inc()
        if recovered:
            log.info("sweeper recovered work", extra={"conversations": recovered})

    def stop(self) -> None:
        self._stop.set()

    async def sweep_once(self) -> list[int]:
        recovered: list[int] = []
        candidates = await store.sweep_candidates(
            self.pool, UNSTARTED_GRACE_SECONDS, self.stuck_timeout
        )
        rows = [r for r in candidates if not self.dispatcher.driving(int(r["conversation_id"]))]
        owners = await self.locks.holders([int(r["conversation_id"]) for r in rows])
        free: list[int] = []
        for row, owner in zip(rows, owners, strict=True):
            conv = int(row["conversation_id"])
            if owner is None:
                free.append(conv)
                continue
            alive = await self.locks.holder_alive(owner)
            if alive and not row["stuck"]:
                continue
            if not await self.locks.break_lock(conv, owner):
                continue
            why = "stuck past the timeout" if alive else "its holder's process is gone"
            log.warning("broke a conversation lease: %s", why, extra={"conversation_id": conv})
            metrics.RECOVERED.labels("lease").inc()
            recovered.append(conv)
            self.dispatcher.notify(conv)
        if free:
            await asyncio.sleep(SETTLE_SECONDS)
            for conv, owner in zip(free, await self.locks.holders(free), strict=True):
                if owner is not None or self.dispatcher.driving(conv):
                    continue
                metrics.RECOVERED.labels("unstarted").inc()
                recovered.append(conv)
                self.dispatcher.notify(conv)
        for row in await store.failed_not_dead_lettered(self.pool, UNSTARTED_GRACE_SECONDS):
            reason = row["status_reason"] or "failed"
            error_class, _, error_message = reason.partition(": ")
            failure = Failure(
                message_id=row["message_id"],
                conversation_id=row["conversation_id"],
                error_class=error_class,
                error_message=error_message,
                retryable=True,
                correlation_id=row["correlation_id"],
            )
            # A recovery of one message's work: it goes into that message's trace.
            with telemetry.continued(
                "state.dead_letter_handoff",
                row["traceparent"],
                row["correlation_id"],
                message_id=row["message_id"],
            ):
                if await dead_letter(self.pool, self.dlq, failure):
                    metrics.RECOVERED.labels("dead_letter_handoff").inc()
        return recovered
