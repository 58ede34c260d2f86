"""Redrive: hand dead-lettered messages back to the state service, the normal path, so
exactly-once and per-conversation order still hold. The automatic worker claims due items with
`FOR UPDATE SKIP LOCKED` (safe with several replicas) and at most `batch` per run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import asyncpg
from prometheus_client import Counter, Gauge

from common import retry, telemetry

from . import store

log = logging.getLogger(__name__)

DLQ_ITEMS = Gauge("wa_dlq_items", "Dead-letter items by status", ["status"])
DLQ_OLDEST = Gauge("wa_dlq_oldest_pending_seconds", "Age of the oldest pending dead-letter item")
REDRIVES = Counter("wa_dlq_redrives_total", "Redrives by result", ["result"])


class StatePort(Protocol):
    async def redrive(
        self, message_id: str, reason: str, correlation_id: str, *, operator: bool
    ) -> bool:
        """True when the message was put back in its conversation's queue; False when it needs
        no redrive (already replied or skipped). Raises RedriveUnavailable."""
        ...


class RedriveUnavailable(Exception):
    pass


async def redrive_items(
    pool: asyncpg.Pool,
    state: StatePort,
    items: list[store.Claimed],
    reason: str,
    *,
    operator: bool = False,
) -> tuple[list[int], list[str]]:
    done: list[int] = []
    errors: list[str] = []
    for item in items:
        # A redrive continues the message's own trace: one trace shows its whole life.
        with telemetry.continued(
            "dlq.redrive", item.traceparent, item.correlation_id, message_id=item.message_id
        ) as span:
            span.set_attribute("wa.dlq_id", item.id)
            span.set_attribute("wa.operator", operator)
            error = await _redrive_one(pool, state, item, reason, operator, done)
            if error:
                errors.append(error)
    return done, errors


async def _redrive_one(
    pool: asyncpg.Pool,
    state: StatePort,
    item: store.Claimed,
    reason: str,
    operator: bool,
    done: list[int],
) -> str:
    """Hands one item back to the state service; returns an error text, or "" when handed."""
    try:
        accepted = await state.redrive(
            item.message_id, reason, item.correlation_id, operator=operator
        )
    except RedriveUnavailable as exc:
        REDRIVES.labels("unavailable").inc()
        delay = retry.full_jitter(item.attempts, 1.0, 30.0) + 1.0
        await store.back_to_pending(pool, item.id, delay, str(exc))
        log.warning("redrive could not be handed over: %s", exc, extra={"dlq_id": item.id})
        return f"{item.id}: {exc}"
    if accepted:
        REDRIVES.labels("redriven").inc()
        log.info("redriven", extra={"dlq_id": item.id, "message_id": item.message_id})
    else:
        # Processed meanwhile: nothing to redo, and nothing may be sent twice.
        REDRIVES.labels("already_done").inc()
        await store.resolve_id(pool, item.id)
    done.append(item.id)
    return ""


class Worker:
    def __init__(
        self, pool: asyncpg.Pool, state: StatePort, *, poll_seconds: float, batch: int = 20
    ) -> None:
        self.pool = pool
        self.state = state
        self.poll_seconds = poll_seconds
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
                await asyncio.wait_for(self._stop.wait(), timeout=self.poll_seconds)

    async def run_once(self) -> int:
        due = await store.claim_due(self.pool, self.batch)
        if due:
            await redrive_items(self.pool, self.state, due, "automatic redrive")
        await self.update_gauges()
        return len(due)

    async def update_gauges(self) -> None:
        rows = {r["status"]: r for r in await store.gauges(self.pool)}
        for status in ("pending", "retrying", "dead"):
            DLQ_ITEMS.labels(status).set(rows[status]["n"] if status in rows else 0)
        pending = rows.get("pending")
        DLQ_OLDEST.set(float(pending["oldest_seconds"]) if pending else 0.0)
