"""The dead-letter queue's table: idempotent enqueue, due items claimed with SKIP LOCKED."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from common import sqlfile

Q = sqlfile.load("services.dlq", "queries.sql")


@dataclass(frozen=True)
class Claimed:
    id: int
    message_id: str
    correlation_id: str
    attempts: int
    traceparent: str = ""


async def enqueue(
    pool: asyncpg.Pool,
    *,
    message_id: str,
    conversation_id: int | None,
    error_class: str,
    error_message: str,
    retryable: bool,
    correlation_id: str,
    max_attempts: int,
    base_seconds: float,
    max_defer_seconds: float,
) -> asyncpg.Record:
    async with pool.acquire() as conn, conn.transaction():
        payload = await conn.fetchval(Q["message_payload"], message_id)
        row = await conn.fetchrow(
            Q["enqueue"],
            message_id,
            conversation_id or None,
            payload if payload is not None else {},
            error_class,
            error_message,
            retryable,
            max_attempts,
            base_seconds,
            correlation_id,
            max_defer_seconds,
        )
        assert row is not None
        return row


def _claimed(rows: list[asyncpg.Record]) -> list[Claimed]:
    return [
        Claimed(
            r["id"], r["message_id"], r["correlation_id"], r["attempts"], r["traceparent"] or ""
        )
        for r in rows
    ]


async def claim_due(pool: asyncpg.Pool) -> Claimed | None:
    """The next due item, now `retrying`; the caller hands it over at once."""
    rows = _claimed(await pool.fetch(Q["claim_due"]))
    return rows[0] if rows else None


async def claim_probe(pool: asyncpg.Pool, probe_timeout: float) -> Claimed | None:
    """A due item to go through the model's half-open breaker, unless one of ours is probing."""
    rows = _claimed(await pool.fetch(Q["claim_probe"], probe_timeout))
    return rows[0] if rows else None


async def defer_due(
    pool: asyncpg.Pool, limit: int, base_seconds: float, max_defer_seconds: float
) -> list[asyncpg.Record]:
    """Due items wait while the model's breaker is open: no attempt used."""
    return list(await pool.fetch(Q["defer_due"], limit, base_seconds, max_defer_seconds))


async def claim_ids(pool: asyncpg.Pool, ids: list[int]) -> list[Claimed]:
    return _claimed(await pool.fetch(Q["claim_ids"], ids))


async def retry_candidates(pool: asyncpg.Pool, statuses: list[str], limit: int) -> list[int]:
    return [r["id"] for r in await pool.fetch(Q["retry_candidates"], statuses, limit)]


async def recover_retrying(
    pool: asyncpg.Pool, older_than: float, limit: int
) -> list[asyncpg.Record]:
    """Stranded `retrying` items back to pending (their message is still dead-lettered) or
    resolved (it was replied or skipped meanwhile)."""
    return list(await pool.fetch(Q["recover_retrying"], older_than, limit))


async def back_to_pending(pool: asyncpg.Pool, item_id: int, delay: float, error: str) -> None:
    await pool.execute(Q["back_to_pending"], item_id, delay, error)


async def refused(pool: asyncpg.Pool, item_id: int, error: str) -> None:
    await pool.execute(Q["refused"], item_id, error)


async def resolve_message(pool: asyncpg.Pool, message_id: str) -> bool:
    return bool(await pool.fetch(Q["resolve_message"], message_id))


async def resolve_id(pool: asyncpg.Pool, item_id: int) -> None:
    await pool.execute(Q["resolve_id"], item_id)


async def purge(pool: asyncpg.Pool, ids: list[int]) -> int:
    return len(await pool.fetch(Q["purge"], ids))


async def list_items(
    pool: asyncpg.Pool, status: str, limit: int, message_id: str = "", customer: str = ""
) -> list[asyncpg.Record]:
    return list(await pool.fetch(Q["list"], status, limit, message_id, customer))


async def get(pool: asyncpg.Pool, item_id: int) -> asyncpg.Record | None:
    return await pool.fetchrow(Q["get"], item_id)


async def gauges(pool: asyncpg.Pool, stranded_after: float) -> list[asyncpg.Record]:
    return list(await pool.fetch(Q["gauges"], stranded_after))
