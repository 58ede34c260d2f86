"""What each message costs PostgreSQL in row versions (db/migrations/0021, 0025): the updates
that can be HOT are (a turn's context: tests/integration/test_context_entries.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time

import asyncpg
import orjson
import pytest

from common import db, sqlfile
from common.domain import Message, Status
from services.agent.saves import Save, Saves
from services.state import store


async def _conversation(pool: asyncpg.Pool) -> int:
    return int(
        await pool.fetchval(
            "INSERT INTO webhook_conversations (phone_number_id, wa_id) VALUES ('1', '2')"
            " RETURNING id"
        )
    )


async def _fresh_statistics(conn: db.Conn) -> None:
    # The backend's counters reach the shared statistics when it goes idle, forced here.
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")


async def _hot_updates(conn: db.Conn, table: str) -> tuple[int, int]:
    await _fresh_statistics(conn)
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


def _as_meta_sends_it(message_id: str, wa_id: str) -> Message:
    """A text message with the payload the gateway stores: Meta's message object."""
    now = int(time.time())
    payload = {
        "from": wa_id,
        "id": message_id,
        "timestamp": str(now),
        "type": "text",
        "text": {"body": f"{message_id} please help"},
    }
    return Message(
        message_id,
        "100",
        wa_id,
        "Ann",
        "text",
        now,
        f"{message_id} please help",
        orjson.dumps(payload).decode(),
    )


def _reply(item: store.WorkItem) -> Save:
    return Save(
        conversation_id=item.conversation_id,
        token=item.fence_token,
        message_id=item.message_id,
        agent_type="support",
        previous_agent_type=None,
        appended=[{"role": "assistant", "content": "Thanks, we are on it.", "tokens": 5}],
        keep=100,
        token_count=5,
        reply_text="Thanks for your message, we will get back to you shortly with help.",
        tokens_in=3,
        tokens_out=5,
        latency_ms=7,
        correlation_id=item.correlation_id,
        send_started=True,
        reply_payload=None,
        absorbed=None,
    )


# PostgreSQL prunes a page's dead versions (the room a HOT update needs) only past the oldest
# transaction id running anywhere on the server: on a server shared with another test worker,
# that worker's transactions in its own database hold the pruning back (PostgreSQL 15: 18 of
# 120 saves HOT while one transaction stayed open in another database). The embedded server
# is each worker's own, and `-n 0` against a shared one runs it.
@pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL"))
    and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1,
    reason="page pruning on a PostgreSQL server shared with other test workers is theirs too",
)
async def test_every_reply_is_saved_with_a_hot_update(database_url: str) -> None:
    # The bench's order of things over 40 conversations, three messages each: every
    # conversation's message stored, its turn started, its reply saved (before sending), the
    # turn finished. No index names what the save writes: with room on the page for its new
    # version, it writes no index entry (db/migrations/0025); without, it enters every index.
    one = await db.create_pool(database_url, min_size=1, max_size=1)
    saves = Saves(one)
    conversations = 40
    try:
        saved = hot = 0
        for n in range(3):
            messages = [
                _as_meta_sends_it(f"wamid.R{n}x{c:02d}", f"1555000{c:04d}")
                for c in range(conversations)
            ]
            items = await _turns_started(one, messages)
            async with one.acquire() as conn:
                before = await _hot_updates(conn, "processed_webhook_messages")
            for item in items:
                assert await saves.save(_reply(item)) == item.fence_token
            async with one.acquire() as conn:
                after = await _hot_updates(conn, "processed_webhook_messages")
            saved += after[0] - before[0]
            hot += after[1] - before[1]
            await _replied(one, items)
    finally:
        await saves.close()
        await one.close()
    # Every save HOT, but for one now and then without room: the room comes from pruning the
    # page's dead versions, which a snapshot held meanwhile anywhere on the server (an
    # autovacuum ANALYZE) can put off (117 of 120 once in the full suite, 120 alone). An index
    # naming what the save writes makes none of them HOT.
    assert saved == 3 * conversations
    assert hot >= saved - 6, (saved, hot)


async def _turns_started(pool: asyncpg.Pool, messages: list[Message]) -> list[store.WorkItem]:
    """Each message stored, its conversation claimed and its turn started (one per
    conversation)."""
    await store.ingest_many(pool, [store.DeliveryIn(messages, [], "c", "")])
    items = []
    for m in messages:
        conversation = await pool.fetchval(
            "SELECT conversation_id FROM processed_webhook_messages WHERE message_id = $1",
            m.message_id,
        )
        token = await store.claim_conversation(pool, conversation, "driver")
        item = await store.next_message(pool, conversation, token)
        assert item is not None and item.message_id == m.message_id
        items.append(item)
    return items


async def _replied(pool: asyncpg.Pool, items: list[store.WorkItem]) -> None:
    for item in items:
        finished = await store.finish_turn(
            pool, item, "replied", "replied", item.fence_token, start_next=False
        )
        assert finished.from_state == "processing", finished


async def _index_reads(conn: db.Conn, index: str) -> int:
    await _fresh_statistics(conn)
    return int(
        await conn.fetchval(
            "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = $1", index
        )
    )


async def test_a_turns_final_transition_finds_its_message_by_its_key_on_a_small_table(
    database_url: str,
) -> None:
    # A new deployment's tables are small, and a plan made then is kept by the connection. The
    # final transition's lookup by message id must not read the partial index on the kind of
    # message, whose entries grow with the table (db/migrations/0026): one connection, so one
    # cached plan serves every finish.
    one = await db.create_pool(database_url, min_size=1, max_size=1)
    conversations = 12
    try:
        messages = [
            _as_meta_sends_it(f"wamid.K{c:02d}", f"1556000{c:04d}") for c in range(conversations)
        ]
        items = await _turns_started(one, messages)
        async with one.acquire() as conn:
            before = await _index_reads(conn, "processed_messages_customer_last_idx")
        await _replied(one, items)
        async with one.acquire() as conn:
            after = await _index_reads(conn, "processed_messages_customer_last_idx")
    finally:
        await one.close()
    assert after - before == 0


async def _conversation_index_reads(conn: db.Conn) -> int:
    await _fresh_statistics(conn)
    return int(
        await conn.fetchval(
            "SELECT sum(idx_tup_read) FROM pg_stat_user_indexes"
            " WHERE relname = 'webhook_conversations'"
        )
    )


async def test_an_ingest_finds_each_conversation_by_its_key_on_a_small_table(
    database_url: str,
) -> None:
    # A new deployment's first burst: conversations created faster than autovacuum analyzes
    # them, and one connection's cached plan for every ingest. Each message that names its
    # customer by BSUID and phone number looks for a conversation keyed by the number to adopt;
    # that lookup must probe the unique (business number, customer) key, and a message with
    # only a phone number the index of phone numbers, not read every conversation of the
    # business number (db/migrations/0027).
    one = await db.create_pool(database_url, min_size=1, max_size=1)
    customers, now = 200, int(time.time())

    def message(message_id: str, c: int) -> Message:
        return Message(
            message_id,
            "100",
            f"1557000{c:04d}",
            "Ann",
            "text",
            now,
            "hi",
            "{}",
            # (every third message of a burst without it: its conversation is then found by
            # the phone number that came with the BSUID before)
            user_id="" if c % 3 == 0 and message_id.startswith("wamid.B") else f"US.1349{c:04d}",
        )

    try:
        await store.ingest_many(
            one,
            [
                store.DeliveryIn(
                    [message(f"wamid.A{c:03d}", c) for c in range(customers)], [], "c", ""
                )
            ],
        )
        async with one.acquire() as conn:
            before = await _conversation_index_reads(conn)
        stored = 0
        for burst in range(6):
            batch = [message(f"wamid.B{burst}{c:03d}", c) for c in range(burst, customers, 7)]
            await store.ingest_many(one, [store.DeliveryIn(batch, [], "c", "")])
            stored += len(batch)
        async with one.acquire() as conn:
            read = await _conversation_index_reads(conn) - before
    finally:
        await one.close()
    # Per message a few probes of a key (the upsert's, the adoption's and its check, the
    # count's re-read by id, the BSUID's lookup) and the dead versions they step over: about
    # 4.3 entries; reading the business number's conversations instead is over 70.
    assert read <= 6 * stored, (read, stored)


async def _table_reads(conn: db.Conn) -> tuple[int, int]:
    """Rows the messages table's scans and index entries its index scans have read."""
    await _fresh_statistics(conn)
    row = await conn.fetchrow(
        "SELECT t.seq_tup_read AS scanned,"
        " (SELECT sum(i.idx_tup_read) FROM pg_stat_user_indexes i"
        "   WHERE i.relid = t.relid) AS entries"
        " FROM pg_stat_user_tables t WHERE t.relname = 'processed_webhook_messages'"
    )
    assert row is not None
    return int(row["scanned"]), int(row["entries"])


async def test_a_calls_replies_looked_at_again_are_found_by_their_keys_on_a_small_table(
    database_url: str,
) -> None:
    # The agent looks again at every Turns call's sent replies once the call has ended
    # (services/agent/server.py, _SentReplies) and nearly always finds them recorded: on a new
    # deployment's small tables too (one connection's cached plan for every call), that costs
    # a probe of each message's key, not a read of the table or of a partial index on the kind
    # of message, whose entries grow with it.
    one = await db.create_pool(database_url, min_size=1, max_size=1)
    conversations, calls, per_call = 40, 30, 4
    agent_q = sqlfile.load("services.agent", "queries.sql")
    try:
        messages = [
            _as_meta_sends_it(f"wamid.L{c:02d}", f"1558000{c:04d}") for c in range(conversations)
        ]
        await _replied(one, await _turns_started(one, messages))
        await one.execute(
            "UPDATE processed_webhook_messages SET reply_message_id = 'wamid.OUT.' || message_id"
            " WHERE kind = 'message'"
        )
        ids = [m.message_id for m in messages]
        async with one.acquire() as conn:
            before = await _table_reads(conn)
            for n in range(calls):
                chunk = ids[n * per_call % conversations :][:per_call]
                recorded = await conn.fetch(
                    agent_q["record_unanswered_sends"], chunk, [f"wamid.OUT.{m}" for m in chunk]
                )
                assert recorded == []
            after = await _table_reads(conn)
    finally:
        await one.close()
    # A probe reads the message's key entries: its live version's and those of the versions
    # the turn and the test left (claimed, replied, recorded: up to four in all) until a probe
    # finds them dead to every snapshot and marks them; while anything else holds a snapshot
    # of this database (an autovacuum's ANALYZE on a shared server), none is marked. Reading
    # the partial index on kind instead would be 40 entries a probe.
    scanned, entries = after[0] - before[0], after[1] - before[1]
    assert scanned == 0 and entries <= 4 * calls * per_call, (scanned, entries)
