"""The statements a turn runs inside its functions are planned once per connection, not at every
call: planning one of them (an UPDATE of a table of eleven indexes, a read of the context)
cost PostgreSQL more than running it. Counted by pg_stat_statements, which must be preloaded,
so on a server of this test's own (embedded, whatever DATABASE_URL says)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from common import db
from services.state import machine, store
from tests.support.inbound import inbound
from tests.support.servers import Postgres

TURNS = 40
# A connection's first five runs of a statement are planned for their parameters (custom
# plans); then PostgreSQL keeps a generic plan if it costs no more, else plans at every run.
PLANS_AT_MOST = 7


@pytest.fixture
async def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[asyncpg.Pool]:
    # No autovacuum: an ANALYZE mid-test would invalidate the plans and count them again.
    monkeypatch.setenv(
        "WA_PG_SETTINGS",
        "fsync=off synchronous_commit=off autovacuum=off"
        " shared_preload_libraries=pg_stat_statements pg_stat_statements.track=all"
        " pg_stat_statements.track_planning=on",
    )
    server = Postgres(tmp_path, embedded_only=True)
    await asyncio.to_thread(server.start)  # it waits for the server with asyncio.run
    try:
        monkeypatch.delenv("WA_PG_SETTINGS")
        url = await server.create_database(await server.create_template())
        # One connection: one backend, whose plan cache is the one counted.
        pool = await db.create_pool(url, min_size=1, max_size=1)
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_turns_statements_are_not_planned_again_at_every_call(
    counted: asyncpg.Pool,
) -> None:
    pool = counted
    # A business with a history, analyzed: 20,000 customers, 200,000 answered messages.
    await pool.execute(
        """
        INSERT INTO webhook_conversations (id, phone_number_id, wa_id, customer_id)
        SELECT i, '100', '1666' || i, '1666' || i FROM generate_series(1, 20000) i;
        SELECT setval(pg_get_serial_sequence('webhook_conversations', 'id'), 20000);
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, finished_at, reply_message_id,
             reply_status)
        SELECT 'old' || i, 'message', 1 + i % 20000, '100', '1666' || (1 + i % 20000), 'text',
               now() - i * interval '1 second', '{}', 'replied', 'c', now(), 'out' || i, 'read'
          FROM generate_series(1, 200000) i;
        -- Each reply's delivery statuses, as Meta sends them.
        INSERT INTO processed_webhook_messages
            (message_id, kind, phone_number_id, wa_id, message_type, wa_timestamp, payload,
             status, correlation_id, reply_message_id, reply_status)
        SELECT 'status' || i || s, 'status', '100', '1666' || (1 + i % 20000), 'status', now(),
               '{}', 'skipped', 'c', 'out' || i, s
          FROM generate_series(1, 200000) i, unnest(ARRAY['sent', 'read']) s;
        INSERT INTO agent_contexts (conversation_id, agent_type, last_seq)
        SELECT i, 'concierge', 10 FROM generate_series(1, 20000) i;
        INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
        SELECT c, 2 * s - 1, 2,
               '{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}'
          FROM generate_series(1, 5) s, generate_series(1, 20000) c;
        ANALYZE;
    """,
        timeout=300,
    )
    await pool.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    await pool.execute("SELECT pg_stat_statements_reset()")

    now = int(time.time())
    for n in range(TURNS):
        rows, _ = await store.ingest(
            pool, [inbound(f"wamid.P{n}", wa_id=f"1666{n + 1}", ts=now)], [], "c", ""
        )
        conversation = rows[0].conversation_id
        token = await store.claim_conversation(pool, conversation, "me")
        item = await store.next_message(pool, conversation, token)
        assert item is not None and item.message_id == f"wamid.P{n}"
        done = await store.finish_turn(
            pool, item, machine.REPLIED, "replied", token, start_next=False
        )
        assert done.from_state == machine.PROCESSING

    counts = await pool.fetch(
        "SELECT calls, plans, regexp_replace(left(query, 90), '\\s+', ' ', 'g') AS q"
        " FROM pg_stat_statements WHERE NOT toplevel AND calls >= $1",
        TURNS,
    )
    # The turn's own statements ran: the message's move, and the read of its context.
    queries = " | ".join(r["q"] for r in counts)
    assert "UPDATE processed_webhook_messages m SET status" in queries, queries
    assert "wa_context(p_conversation_id)" in queries, queries
    planned_again = [(r["q"], r["plans"], r["calls"]) for r in counts if r["plans"] > PLANS_AT_MOST]
    assert not planned_again, planned_again
