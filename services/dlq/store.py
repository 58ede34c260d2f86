"""The dead-letter queue's table: idempotent enqueue, due items claimed with SKIP LOCKED."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from common import sqlfile

Q = sqlfile.load("services.dlq", "queries.sql")

STATUSES = ("pending", "retrying", "dead", "resolved", "purged")


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


async def claim_due(pool: asyncpg.Pool, limit: int) -> list[Claimed]:
    return _claimed(await pool.fetch(Q["claim_due"], limit))


async def claim_ids(pool: asyncpg.Pool, ids: list[int]) -> list[Claimed]:
    return _claimed(await pool.fetch(Q["claim_ids"], ids))


async def claim_status(pool: asyncpg.Pool, statuses: list[str]) -> list[Claimed]:
    return _claimed(await pool.fetch(Q["claim_status"], statuses))


async def back_to_pending(pool: asyncpg.Pool, item_id: int, delay: float, error: str) -> None:
    await pool.execute(Q["back_to_pending"], item_id, delay, error)


async def resolve_message(pool: asyncpg.Pool, message_id: str) -> bool:
    return bool(await pool.fetch(Q["resolve_message"], message_id))


async def resolve_id(pool: asyncpg.Pool, item_id: int) -> None:
    await pool.execute(Q["resolve_id"], item_id)


async def purge(pool: asyncpg.Pool, ids: list[int]) -> int:
    return len(await pool.fetch(Q["purge"], ids))


async def list_items(
    pool: asyncpg.Pool, status: str, limit: int, message_id: str = ""
) -> list[asyncpg.Record]:
    return list(await pool.fetch(Q["list"], status, limit, message_id))


async def get(pool: asyncpg.Pool, item_id: int) -> asyncpg.Record | None:
    return await pool.fetchrow(Q["get"], item_id)


async def gauges(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch(Q["gauges"]))
