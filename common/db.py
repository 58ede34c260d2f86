"""The PostgreSQL pool every service uses: bounded, with timeouts on connect and on every query."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionHolder, PoolConnectionProxy

# What `pool.acquire()` hands out, or a plain connection.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0


# Arrays of built-in types (bigint[], boolean[], timestamptz[], ...). asyncpg knows the scalars
# but learns each of these per connection, the first time a statement passes or returns one, by
# a catalog query that PostgreSQL plans at every call: 6-10 ms of its CPU each, three or four a
# connection (a pool reopens its connections after a minute idle, and every replica has its own
# pool). Their descriptions are the same on every server (built-in types have fixed OIDs), so a
# process asks once, for all of them, and tells every later connection.
_BUILTIN_ARRAYS = (
    1000, 1001, 1002, 1003, 1005, 1007, 1009, 1015, 1016, 1021, 1022, 1028,
    1115, 1182, 1185, 1187, 1231, 2951, 199, 3807,
)  # fmt: skip
_builtin_array_types: list[Any] | None = None


async def _learn_builtin_arrays(conn: asyncpg.Connection) -> None:
    global _builtin_array_types
    # (asyncpg's private API, hence Any; an asyncpg without it learns them as before.)
    raw: Any = conn
    try:
        settings = raw._protocol.get_settings()
        if _builtin_array_types is None:
            missing = [oid for oid in _BUILTIN_ARRAYS if settings.get_data_codec(oid) is None]
            rows, _ = await raw._introspect_types(missing, CONNECT_TIMEOUT)
            _builtin_array_types = list(rows)
        settings.register_data_types(_builtin_array_types)
    except AttributeError:
        return


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )
    # After the codecs: setting one forgets every type learnt.
    await _learn_builtin_arrays(conn)


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """Our code leaves no session state behind (no LISTEN, cursors, advisory locks or SET on
    pooled connections), so the default reset query is a wasted round trip on every release.
    asyncpg still rolls back a transaction left open before calling this."""


_ASYNCPG_HAS_WHAT_RELEASE_USES = all(
    hasattr(cls, name)
    for cls, names in (
        (PoolConnectionHolder, ("_release", "_setup_inactive_callback")),
        (asyncpg.Connection, ("_on_release", "is_in_transaction")),
    )
    for name in names
)


class _Pool(asyncpg.Pool):  # type: ignore[misc]
    """asyncpg's pool, with a release that costs no task when nothing is left to do.

    asyncpg releases a connection inside `asyncio.shield` (a new task, and a turn of the event
    loop, for every statement run through the pool) so that a cancel cannot interrupt the
    awaits of a release: a ROLLBACK of a transaction left open, a close at `max_queries`, the
    wait for a cancelled query, the reset hook. A connection with none of those to do (nearly
    every one: our reset hook does nothing, see `_no_session_state`) is released here at once,
    without an await, so no cancel can land in it; any other goes asyncpg's way. Half the CPU
    of a one-row `pool.fetchval` (about 60 -> 30 us in a microbenchmark), and every service
    runs its statements through the pool.

    What is skipped is exactly what `PoolConnectionHolder.release` and `Connection._reset` do in
    that case (asyncpg 0.32, the locked version; an asyncpg without the private attributes read
    here gets its own release); tests/integration/test_db_pool.py checks the fast path is
    taken, and that every other case still goes asyncpg's way."""

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        if not _releasable_at_once(self, connection):
            return await super().release(connection, timeout=timeout)  # type: ignore[no-any-return]
        pool: Any = self
        pool._check_init()
        holder: Any = connection._holder
        con: Any = connection._con
        con._on_release()
        holder._timeout = None
        con._listeners.clear()
        con._log_listeners.clear()
        holder._release()
        holder._setup_inactive_callback()
        return None


def _releasable_at_once(pool: Any, connection: Any) -> bool:
    # (asyncpg's private attributes, hence Any.)
    if type(connection) is not PoolConnectionProxy or pool._reset is not _no_session_state:
        return False
    proxy: Any = connection
    try:
        holder, con = proxy._holder, proxy._con
        if con is None or holder._pool is not pool or holder._in_use is None or con.is_closed():
            return False
        protocol = con._protocol
        return bool(
            holder._generation == pool._generation
            and protocol.queries_count < holder._max_queries
            and not protocol._is_cancelling()
            and not protocol.is_in_transaction()
            and con._top_xact is None
            and con._listeners is not None
            and con._log_listeners is not None
            and _ASYNCPG_HAS_WHAT_RELEASE_USES
        )
    except AttributeError:
        return False


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, application_name: str = ""
) -> asyncpg.Pool:
    """`application_name` (e.g. `wa-state`) names the connections in pg_stat_activity."""
    pool = _Pool(
        dsn,
        server_settings={"application_name": application_name} if application_name else None,
        min_size=min(min_size, max_size),
        max_size=max_size,
        max_queries=50_000,  # asyncpg's default
        timeout=CONNECT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
        setup=None,
        init=_init_connection,
        reset=_no_session_state,
        # A conversation's work is spread over few statements; prepared statements cache well.
        max_inactive_connection_lifetime=60.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
    )
    await pool
    return pool


async def ping(pool: asyncpg.Pool) -> None:
    async with pool.acquire(timeout=2.0) as conn:
        await conn.fetchval("SELECT 1", timeout=2.0)
