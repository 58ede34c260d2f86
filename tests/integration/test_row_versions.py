"""What each message costs PostgreSQL in row versions (db/migrations/0021): the updates that
can be HOT are, and a turn's context is stored without a compression attempt."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import asyncpg
import orjson
import pytest

from common import db
from common.domain import Message, Status
from services.state import store


async def _conversation(pool: asyncpg.Pool) -> int:
    return int(
        await pool.fetchval(
            "INSERT INTO webhook_conversations (phone_number_id, wa_id) VALUES ('1', '2')"
            " RETURNING id"
        )
    )


async def _hot_updates(conn: db.Conn, table: str) -> tuple[int, int]:
    # The backend's counters reach the shared statistics when it goes idle, forced here.
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1", table
    )
    assert row is not None
    return int(row["n_tup_upd"]), int(row["n_tup_hot_upd"])


async def test_a_turns_session_metrics_are_a_hot_update(pool: asyncpg.Pool) -> None:
    conversation = await _conversation(pool)
    async with pool.acquire() as conn:
        await conn.execute(
            "SELECT increment_session_metrics($1, 'a', 1, 10, 20, 300, 0, 'c')", conversation
        )
        before = await _hot_updates(conn, "agent_sessions")
        for _ in range(3):
            await conn.execute(
                "SELECT increment_session_metrics($1, 'a', 1, 10, 20, 300, 0, 'c')", conversation
            )
        after = await _hot_updates(conn, "agent_sessions")
    # No index names last_active_at, which every turn moves on.
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


async def test_a_context_is_stored_as_is_without_a_compression_attempt(
    pool: asyncpg.Pool,
) -> None:
    conversation = await _conversation(pool)
    # Three kilobytes that pglz would compress well: stored as written all the same.
    context = orjson.dumps([{"role": "user", "content": "hello " * 50}] * 10).decode()
    await pool.execute(
        "INSERT INTO agent_contexts (conversation_id, agent_type, messages)"
        " VALUES ($1, 'a', $2::jsonb)",
        conversation,
        context,
    )
    row = await pool.fetchrow(
        "SELECT pg_column_compression(messages) AS compression,"
        " pg_column_size(messages) AS size FROM agent_contexts WHERE conversation_id = $1",
        conversation,
    )
    assert row is not None
    assert row["compression"] is None and row["size"] >= len(context) - 100, dict(row)


async def test_a_delivery_status_moves_its_reply_on_with_a_hot_update(database_url: str) -> None:
    # One connection: the statistics read are those its own statements left.
    one = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        now = int(time.time())
        inbound = Message("wamid.in", "100", "15550001111", "", "text", now, "hi", "{}")
        await store.ingest_many(one, [store.DeliveryIn([inbound], [], "c", "")])
        await one.execute(
            "UPDATE processed_webhook_messages SET reply_message_id = 'wamid.out',"
            " reply_status = 'sent' WHERE message_id = 'wamid.in'"
        )
        async with one.acquire() as conn:
            before = await _hot_updates(conn, "processed_webhook_messages")
        for status in ("delivered", "read"):
            update = Status("wamid.out", "100", "15550001111", status, now, "{}")
            await store.ingest_many(one, [store.DeliveryIn([], [update], "c", "")])
        async with one.acquire() as conn:
            after = await _hot_updates(conn, "processed_webhook_messages")
        reply_status = await one.fetchval(
            "SELECT reply_status FROM processed_webhook_messages WHERE message_id = 'wamid.in'"
        )
    finally:
        await one.close()
    assert reply_status == "read"
    # No index names reply_status (db/migrations/0021).
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


def _batch(ids: list[str], wa_id: str) -> tuple[object, ...]:
    """ingest_messages' arguments for messages of one customer."""
    n = len(ids)
    now = dt.datetime.now(dt.UTC)
    text = [""] * n
    return (
        ids,
        ["100"] * n,
        [wa_id] * n,
        text,
        ["c"] * n,
        [now] * n,
        ["text"] * n,
        ["hi"] * n,
        ["{}"] * n,
        ["received"] * n,
        text,
        text,
        text,
        text,
        text,
        text,
    )


async def _message_count(pool: asyncpg.Pool, wa_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT message_count FROM webhook_conversations WHERE wa_id = $1", wa_id
        )
    )


@pytest.mark.parametrize("existing", [True, False])
async def test_concurrent_deliveries_of_the_same_messages_count_each_once(
    pool: asyncpg.Pool, existing: bool
) -> None:
    # The ingest counts a conversation's new messages in its one update of the row, from what
    # its statement saw; one that waited for the row while another delivery of the same
    # messages committed counts them again, with a fresh snapshot.
    if existing:
        await store.ingest_many(
            pool,
            [store.DeliveryIn([Message("m0", "100", "1", "", "text", 0, "hi", "{}")], [], "c", "")],
        )
    first, second = await pool.acquire(), await pool.acquire()
    try:
        async with first.transaction():
            await first.fetch(store.Q["ingest_messages"], *_batch(["m1", "m2"], "1"))
            waiting = asyncio.create_task(
                second.fetch(store.Q["ingest_messages"], *_batch(["m1", "m3"], "1"))
            )
            await asyncio.sleep(0.3)
            assert not waiting.done()  # for the conversation row the first one holds
        rows = await waiting
    finally:
        await pool.release(first)
        await pool.release(second)
    assert [r["status"] for r in rows] == [None, "received"]  # m1 a duplicate, m3 stored
    assert await _message_count(pool, "1") == (4 if existing else 3)
