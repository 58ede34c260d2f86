"""The PostgreSQL pool every service uses: bounded, with timeouts on connect and on every query."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

# What `pool.acquire()` hands out, or a plain connection.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """Our code leaves no session state behind (no LISTEN, cursors, advisory locks or SET on
    pooled connections), so the default reset query is a wasted round trip on every release.
    asyncpg still rolls back a transaction left open before calling this."""


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, application_name: str = ""
) -> asyncpg.Pool:
    """`application_name` (e.g. `wa-state`) names the connections in pg_stat_activity."""
    pool = await asyncpg.create_pool(
        dsn,
        server_settings={"application_name": application_name} if application_name else None,
        min_size=min_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
        init=_init_connection,
        reset=_no_session_state,
        # A conversation's work is spread over few statements; prepared statements cache well.
        max_inactive_connection_lifetime=60.0,
    )
    assert pool is not None
    return pool


async def ping(pool: asyncpg.Pool) -> None:
    async with pool.acquire(timeout=2.0) as conn:
        await conn.fetchval("SELECT 1", timeout=2.0)
