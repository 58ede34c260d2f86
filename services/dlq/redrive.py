"""Redrive: hand dead-lettered messages back to the state service, the normal path, so
exactly-once and per-conversation order still hold.

An item is `retrying` from its claim until its message's outcome: replied or skipped (the state
service resolves it) or failed again (it is enqueued again: pending or dead). The automatic
worker claims due items one at a time with `FOR UPDATE SKIP LOCKED` (safe with several
replicas) and hands each over at once, so an item is `retrying` without having been handed over
for at most one hand-over. One stranded anyway (its dlq process died mid-redrive, or a Resolve
was lost) is recovered by the worker after STUCK_TIMEOUT_SECONDS.

While the model's circuit breaker is open, due items are deferred without using attempts;
when it is half-open, one item goes through as its probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from prometheus_client import Counter, Gauge

from common import retry, telemetry

from . import store

log = logging.getLogger(__name__)

DLQ_ITEMS = Gauge("wa_dlq_items", "Dead-letter items by status", ["status"])
DLQ_OLDEST = Gauge("wa_dlq_oldest_pending_seconds", "Age of the oldest pending dead-letter item")
DLQ_STRANDED = Gauge(
    "wa_dlq_stranded_items",
    "Items retrying for over STUCK_TIMEOUT_SECONDS while their message is not in flight",
)
REDRIVES = Counter("wa_dlq_redrives_total", "Redrives by result", ["result"])
DEFERRED = Counter(
    "wa_dlq_deferred_total", "Due redrives deferred while the model's breaker was open"
)
RECOVERED = Counter(
    "wa_dlq_recovered_total", "Items recovered from a stranded `retrying`, by result", ["result"]
)

# Breaker states as Agent.GetStatus reports them ("" when the agent did not answer).
OPEN, HALF_OPEN = "open", "half_open"
# A refused redrive of a message in one of these states resolves its item; in any other
# (received, processing, failed) the message is being processed again already.
DONE = frozenset({"replied", "skipped"})


@dataclass(frozen=True)
class Handed:
    accepted: bool  # put back in its conversation's queue
    status: str  # the message's state when the state service refused (not accepted)


class StatePort(Protocol):
    async def redrive(
        self, message_id: str, reason: str, correlation_id: str, *, operator: bool
    ) -> Handed:
        """Hands the message back to its conversation's queue. Raises RedriveUnavailable."""
        ...


class AgentStatusPort(Protocol):
    async def breaker_state(self) -> str:
        """closed, half_open or open; "" when unknown."""
        ...


class RedriveUnavailable(Exception):
    """The hand-over did not happen and may later: `unreachable` when the state service did
    not answer at all (else it answered with an error that may pass)."""

    def __init__(self, said: str, *, unreachable: bool = True) -> None:
        super().__init__(said)
        self.unreachable = unreachable


class RedriveRefused(Exception):
    """The state service answered that the message cannot be redriven, now or ever (it does
    not exist any more): the item is dead, for an operator to see and purge."""


async def redrive_items(
    pool: asyncpg.Pool,
    state: StatePort,
    items: list[store.Claimed],
    reason: str,
    *,
    operator: bool = False,
) -> tuple[list[int], list[str], str]:
    """Hands the items over; returns those handed, an error line per item that was not and,
    when the state service did not answer, what it said (the items after it are not tried:
    each would wait for it too)."""
    done: list[int] = []
    errors: list[str] = []
    for item in items:
        # A redrive continues the message's own trace: one trace shows its whole life.
        with telemetry.continued(
            "dlq.redrive", item.traceparent, item.correlation_id, message_id=item.message_id
        ) as span:
            span.set_attribute("wa.dlq_id", item.id)
            span.set_attribute("wa.operator", operator)
            error, unavailable = await _redrive_one(pool, state, item, reason, operator, done)
            if error:
                errors.append(error)
            if unavailable:
                return done, errors, unavailable
    return done, errors, ""


async def _redrive_one(
    pool: asyncpg.Pool,
    state: StatePort,
    item: store.Claimed,
    reason: str,
    operator: bool,
    done: list[int],
) -> tuple[str, str]:
    """Hands one claimed item over; returns an error text ("" when handed) and, when the
    state service did not answer, what it said."""
    try:
        handed = await state.redrive(
            item.message_id, reason, item.correlation_id, operator=operator
        )
    except RedriveUnavailable as exc:
        REDRIVES.labels("unavailable").inc()
        delay = retry.full_jitter(item.attempts, 1.0, 30.0) + 1.0
        await store.back_to_pending(pool, item.id, delay, str(exc))
        log.warning("redrive could not be handed over: %s", exc, extra={"dlq_id": item.id})
        return f"{item.id}: {exc}", str(exc) if exc.unreachable else ""
    except RedriveRefused as exc:
        # Never again: retried, it would come back every few seconds for ever.
        REDRIVES.labels("refused").inc()
        await store.refused(pool, item.id, str(exc))
        log.warning("redrive refused, the item is dead: %s", exc, extra={"dlq_id": item.id})
        return f"{item.id}: refused: {exc}", ""
    except asyncio.CancelledError:
        # The caller gave up (an operator's retry past its deadline): due again now rather
        # than `retrying` for nothing. Had the hand-over happened after all, the next one
        # finds the message in flight and leaves it be.
        with contextlib.suppress(Exception):
            await asyncio.shield(
                store.back_to_pending(pool, item.id, 0.0, "the redrive was cut off")
            )
        raise
    if handed.accepted:
        REDRIVES.labels("redriven").inc()
        log.info("redriven", extra={"dlq_id": item.id, "message_id": item.message_id})
    elif handed.status in DONE:
        # Processed meanwhile: nothing to redo, and nothing may be sent twice.
        REDRIVES.labels("already_done").inc()
        await store.resolve_id(pool, item.id)
    else:
        # Being processed again already: its outcome resolves or re-enqueues the item.
        REDRIVES.labels("in_flight").inc()
        log.info(
            "message already in flight, left to its outcome",
            extra={"dlq_id": item.id, "message_id": item.message_id, "status": handed.status},
        )
    done.append(item.id)
    return "", ""


class Worker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        state: StatePort,
        *,
        poll_seconds: float,
        agent: AgentStatusPort | None = None,
        stuck_timeout: float = 120.0,
        retry_base_seconds: float = 30.0,
        max_defer_seconds: float = 1800.0,
        batch: int = 20,
    ) -> None:
        self.pool = pool
        self.state = state
        self.agent = agent
        self.poll_seconds = poll_seconds
        self.stuck_timeout = stuck_timeout
        self.retry_base_seconds = retry_base_seconds
        self.max_defer_seconds = max_defer_seconds
        self.batch = batch
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        log.info("dlq worker started", extra={"poll_seconds": self.poll_seconds})
        with telemetry.untraced():
            await self._loop()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("dlq worker run failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):  # no task per poll
                    await self._stop.wait()

    async def run_once(self) -> int:
        """Recovers stranded items, then redrives (or defers) due ones; returns how many were
        handed over. An empty queue (nearly always) costs one statement: the gauges' count,
        read first, says there is nothing to recover or redrive, and the model's breaker is
        not asked (a gRPC call to an agent every poll of every dlq replica)."""
        if not await self.update_gauges():
            return 0
        await self.recover_stranded()
        n = await self.redrive_due()
        await self.update_gauges()
        return n

    async def recover_stranded(self) -> int:
        rows = await store.recover_retrying(self.pool, self.stuck_timeout, self.batch * 5)
        for r in rows:
            result = "pending" if r["status"] == "pending" else "resolved"
            RECOVERED.labels(result).inc()
            log.warning(
                "recovered a dead-letter item stranded in retrying: %s",
                "due again, no attempt used"
                if result == "pending"
                else f"its message was {r['message_status']} meanwhile",
                extra={"dlq_id": r["id"], "message_id": r["message_id"], "result": result},
            )
        return len(rows)

    async def redrive_due(self) -> int:
        breaker = await self.agent.breaker_state() if self.agent is not None else ""
        if breaker == OPEN:
            await self._defer_due()
            return 0
        if breaker == HALF_OPEN:
            probe = await store.claim_probe(self.pool, self.stuck_timeout)
            if probe is None:
                return 0
            log.info("probing the model's half-open breaker", extra={"dlq_id": probe.id})
            await redrive_items(self.pool, self.state, [probe], "automatic redrive (probe)")
            return 1
        n = 0
        while n < self.batch and not self._stop.is_set():
            item = await store.claim_due(self.pool)
            if item is None:
                break
            await redrive_items(self.pool, self.state, [item], "automatic redrive")
            n += 1
        return n

    async def _defer_due(self) -> None:
        rows = await store.defer_due(
            self.pool, self.batch, self.retry_base_seconds, self.max_defer_seconds
        )
        DEFERRED.inc(len(rows))
        if rows:
            log.info(
                "the model's circuit breaker is open: due redrives deferred, no attempt used",
                extra={"dlq_ids": [r["id"] for r in rows]},
            )
        for r in rows:
            if r["status"] == "dead":
                log.warning(
                    "dead-letter item is dead: the model stayed unavailable for over %.0f s",
                    self.max_defer_seconds,
                    extra={"dlq_id": r["id"], "message_id": r["message_id"]},
                )

    async def update_gauges(self) -> bool:
        """Sets the gauges; returns whether any item is pending or retrying (work for the
        worker: due, or to be recovered)."""
        rows = {r["status"]: r for r in await store.gauges(self.pool, self.stuck_timeout)}
        for status in ("pending", "retrying", "dead"):
            DLQ_ITEMS.labels(status).set(rows[status]["n"] if status in rows else 0)
        pending = rows.get("pending")
        DLQ_OLDEST.set(float(pending["oldest_seconds"]) if pending else 0.0)
        DLQ_STRANDED.set(rows["stranded"]["n"] if "stranded" in rows else 0)
        return "pending" in rows or "retrying" in rows
