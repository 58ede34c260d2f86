"""The pool's release without a task (common/db.py): taken when nothing is left to do, and
asyncpg's own release (ROLLBACK, close) whenever something is."""

from __future__ import annotations

import asyncio
import datetime
import decimal
from typing import Any

import asyncpg
import pytest

from common import db


@pytest.fixture
async def one(database_url: str) -> Any:
    p = await db.create_pool(database_url, min_size=1, max_size=1)
    yield p
    await p.close()


def _count_slow_releases(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    slow = asyncpg.Pool.release

    async def counted(self: Any, connection: Any, *, timeout: float | None = None) -> None:
        calls.append(1)
        await slow(self, connection, timeout=timeout)

    monkeypatch.setattr(asyncpg.Pool, "release", counted)
    return calls


async def test_a_statement_through_the_pool_is_released_at_once(
    one: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails with asyncpg's release (a shielded task per statement)."""
    slow = _count_slow_releases(monkeypatch)
    first = None
    for n in range(3):
        async with one.acquire() as con:
            raw = con._con  # type: ignore[attr-defined]
            first = first or raw
            assert raw is first  # the one connection, back in the pool each time
            assert await con.fetchval("SELECT $1::int", n) == n
        assert await one.fetchval("SELECT 1") == 1
    async with one.acquire() as con:
        async with con.transaction():
            await con.execute("SELECT 1")
    assert slow == []


async def test_a_transaction_left_open_is_rolled_back_by_asyncpg(
    one: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = _count_slow_releases(monkeypatch)
    async with one.acquire() as con:
        await con.execute("BEGIN")
        await con.execute("CREATE TEMP TABLE left_open (x int)")
    assert slow == [1]
    async with one.acquire() as con:
        assert not con.is_in_transaction()
        # Rolled back: the table made in the open transaction is gone.
        assert await con.fetchval("SELECT to_regclass('pg_temp.left_open')") is None


async def test_a_closed_connection_is_replaced(one: asyncpg.Pool) -> None:
    async with one.acquire() as con:
        pid = await con.fetchval("SELECT pg_backend_pid()")
        con._con.terminate()  # type: ignore[attr-defined]
    async with one.acquire() as con:
        assert await con.fetchval("SELECT pg_backend_pid()") != pid


async def test_a_released_proxy_is_unusable(one: asyncpg.Pool) -> None:
    async with one.acquire() as con:
        pass
    with pytest.raises(asyncpg.InterfaceError):
        await con.fetchval("SELECT 1")


async def test_new_connections_ask_the_catalog_for_no_builtin_array_type(database_url: str) -> None:
    """asyncpg learns each array type (bigint[], boolean[], timestamptz[], ...) per connection
    with a catalog query PostgreSQL plans every time (6-10 ms of its CPU each, three or four
    a connection); the pool's connections are told them instead (common/db.py)."""
    asked: list[str] = []
    when = datetime.datetime(2026, 12, 6, tzinfo=datetime.UTC)
    for _ in range(2):  # the process's first pool, and a later one
        p = await db.create_pool(database_url, min_size=2, max_size=2)
        try:
            cons = [await p.acquire(), await p.acquire()]
            for con in cons:
                con.add_query_logger(lambda record: asked.append(record.query))
                row = await con.fetchrow(
                    "SELECT $1::bigint[] AS a, $2::boolean[] AS b, $3::timestamptz[] AS t,"
                    " $4::name[] AS n, $5::numeric[] AS x, $6::jsonb[] AS j",
                    [1, 2**40],
                    [True, False],
                    [when],
                    ["wa"],
                    [decimal.Decimal("1.5")],
                    [{"k": [1, "v"]}],
                )
                assert row is not None
                assert dict(row) == {
                    "a": [1, 2**40],
                    "b": [True, False],
                    "t": [when],
                    "n": ["wa"],
                    "x": [decimal.Decimal("1.5")],
                    "j": [{"k": [1, "v"]}],
                }
            await asyncio.sleep(0)  # query loggers are called soon after, not during
            for con in cons:
                await p.release(con)
        finally:
            await p.close()
    assert len(asked) == 4
    assert not [q for q in asked if "typeinfo_tree" in q]
