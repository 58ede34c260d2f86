"""Waiting, in a test, until PostgreSQL shows a backend waiting for a row lock: there is nothing
else to await when a statement is meant to block behind another transaction."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from asyncpg.transaction import Transaction

from common.db import Conn


async def until(pool: asyncpg.Pool, query: str, *args: object) -> None:
    """Until `query` answers true."""
    for _ in range(250):
        if await pool.fetchval(query, *args):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never true: {query}")


async def waiting_for_a_lock(pool: asyncpg.Pool, pid: int) -> None:
    """Until the backend `pid` waits for a lock."""
    await until(pool, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid)


async def waiters(pool: asyncpg.Pool, n: int) -> None:
    """Until `n` backends of this database wait for a lock."""
    await until(
        pool,
        "SELECT count(*) >= $1 FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'",
        n,
    )


async def holding(conn: Conn, query: str, *args: Any) -> Transaction:
    """`query` run in a transaction left open: its rows stay locked until the test ends it."""
    tx = conn.transaction()
    await tx.start()
    await conn.execute(query, *args)
    return tx
