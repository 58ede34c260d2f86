"""What a message costs PostgreSQL to plan: each statement of its way (the ingest of it and of
its reply's statuses, the turn's claim, save and final move, alone or batched, and the
statements inside their functions) is planned once per connection, not at every run. On tables
with a business's history, PostgreSQL planned several at every run, and planning one (the
ingest, an UPDATE of a table of eleven indexes) cost it more than running it
(db/migrations/0032_generic_turn_plans.sql). Counted by pg_stat_statements, which must be
preloaded, so on a server of this test's own (embedded, whatever DATABASE_URL says)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from common import db
from common.domain import Status
from devtools import history, turns
from services.agent.saves import Saves
from services.state import machine, store
from tests.support.inbound import inbound
from tests.support.servers import Postgres

ROUNDS = 20
# More than a replica sends alone at once (two statements in flight, common/coalesce.py).
PER_ROUND = 5
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
    # A business with a history, analyzed: 20,000 customers `1666<n>`, 200,000 answered
    # messages, 400,000 delivery statuses, contexts of ten messages.
    await history.write(pool, "100", 200_000, context_entries=5)
    await pool.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    await pool.execute("SELECT pg_stat_statements_reset()")

    now = int(time.time())
    saves = Saves(pool)
    for r in range(ROUNDS):
        # Customers write at once, as to a busy replica: their messages come in one
        # delivery, their turns' claims, saves and final moves go to PostgreSQL together
        # (batched, services/state/store.py _TurnBatches and services/agent/saves.py) or alone
        # (the first of each, and those of a quiet replica).
        customers = [PER_ROUND * r + k + 1 for k in range(PER_ROUND)]
        rows, _ = await store.ingest(
            pool, [inbound(f"wamid.P{c}", wa_id=f"1666{c}", ts=now) for c in customers], [], "c", ""
        )
        conversations = [row.conversation_id for row in rows]
        claims = await asyncio.gather(
            *(store.claim_turn_or_release(pool, c, "me") for c in conversations)
        )
        # Each claim started its conversation's turn (a missing one fails the comparison).
        turns = [item for _, item in claims if isinstance(item, store.WorkItem)]
        assert [t.message_id for t in turns] == [f"wamid.P{c}" for c in customers], claims
        assert [t.fence_token for t in turns] == [token for token, _ in claims]
        await asyncio.gather(*(_save(saves, turn) for turn in turns))
        # Half the replies recorded by the agent before the turn's final move, half left to it
        # (sent, and left to the transition to record).
        replies = {c: f"wamid.R{c}" for c in customers}
        for c, turn in zip(customers, turns, strict=True):
            if c % 2:
                await pool.execute(
                    "UPDATE processed_webhook_messages SET reply_message_id = $1"
                    " WHERE message_id = $2",
                    replies[c],
                    turn.message_id,
                )
        finished = await asyncio.gather(
            *(
                store.finish_turn(
                    pool,
                    turn,
                    machine.REPLIED,
                    "replied",
                    turn.fence_token,
                    start_next=True,
                    reply_message_id=None if c % 2 else replies[c],
                    release=True,
                )
                for c, turn in zip(customers, turns, strict=True)
            )
        )
        assert [f.from_state for f in finished] == [machine.PROCESSING] * PER_ROUND
        # Then Meta's statuses of the replies, a webhook for each.
        for status in ("sent", "delivered", "read"):
            for c in customers:
                update = Status(replies[c], "100", f"1666{c}", status, now, "{}")
                await store.ingest(pool, [], [update], "c", "")
    await saves.close()

    counts = await pool.fetch(
        "SELECT calls, plans, regexp_replace(left(query, 90), '\\s+', ' ', 'g') AS q"
        " FROM pg_stat_statements WHERE calls >= $1",
        ROUNDS // 2,
    )
    # Every way ran: alone and batched, and the statements inside the functions.
    queries = " | ".join(r["q"] for r in counts)
    for ran in (
        "WITH given AS",  # the ingest of messages
        "WITH stored AS",  # the ingest of statuses: stored, their messages found and updated
        "SELECT array_agg(DISTINCT t.id)",
        "UPDATE processed_webhook_messages m SET reply_status",
        "wa_claim_turn(",
        "wa_claim_turns(",
        "wa_save_turn(",
        "wa_save_turns(",
        "wa_finish_turn(",
        "wa_finish_turns(",
        "UPDATE processed_webhook_messages m SET status",
        "wa_context(p_conversation_id)",
    ):
        assert ran in queries, (ran, queries)
    # (Except the foreign keys' checks: one text, `SELECT $2 FROM ONLY ...`, stands for the
    # check of each table that refers to the conversation, each with its own plans.)
    planned_again = [
        (r["q"], r["plans"], r["calls"])
        for r in counts
        if r["plans"] > PLANS_AT_MOST and " FROM ONLY " not in r["q"]
    ]
    assert not planned_again, planned_again


async def _save(saves: Saves, item: store.WorkItem) -> None:
    """The agent's save of a turn's reply before it sends it (services/agent/turn.py)."""
    saved = await saves.save(turns.answer_save(item))
    assert saved == item.fence_token
