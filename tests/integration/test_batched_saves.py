"""The agent's saves of many turns at once (services/agent/saves.py, db/migrations/0023), against
real PostgreSQL and connected as the agent's own role: they go in fewer transactions than saves,
and each keeps its own outcome, as if it had been saved alone."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import cast

import asyncpg
import pytest

from common import db, roles
from services.agent.saves import Save, Saves
from services.state import store
from tests.support.inbound import inbound


@pytest.fixture
async def agent_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The agent's pool, as the agent's role (db/privileges.sql)."""
    urls = await roles.provision(database_url)
    p = await db.create_pool(urls["agent"], min_size=1, max_size=10)
    yield p
    await p.close()


async def started(pool: asyncpg.Pool, n: int) -> list[tuple[str, int, int]]:
    """`n` conversations, each with one message whose turn a driver started: (message,
    conversation, fence token) each."""
    out = []
    for i in range(n):
        message_id = f"wamid.B{i}"
        await store.ingest(pool, [inbound(message_id, wa_id=f"1555000{i:04d}")], [], "c", "")
        conversation = await pool.fetchval(
            "SELECT conversation_id FROM processed_webhook_messages WHERE message_id = $1",
            message_id,
        )
        token = await store.claim_conversation(pool, conversation, "driver-a")
        assert await store.next_message(pool, conversation, token) is not None
        out.append((message_id, int(conversation), token))
    return out


def save(message_id: str, conversation: int, token: int, *, burst: bool = False) -> Save:
    return Save(
        conversation_id=conversation,
        token=token,
        message_id=message_id,
        agent_type="support",
        previous_agent_type=None,
        appended=[
            {"role": "user", "content": "hi", "message_id": message_id, "tokens": 3},
            {"role": "assistant", "content": f"reply to {message_id}", "tokens": 5},
        ],
        keep=100,
        token_count=8,
        reply_text=f"reply to {message_id}",
        tokens_in=3,
        tokens_out=5,
        latency_ms=7,
        correlation_id=f"c-{message_id}",
        send_started=True,
        reply_payload={"kind": "buttons", "body": "b"} if burst else None,
        absorbed=[f"{message_id}.later"] if burst else None,
    )


async def saved(pool: asyncpg.Pool, message_ids: list[str]) -> dict[str, asyncpg.Record]:
    """Each message's stored reply and its context, with the transaction that wrote them."""
    rows = await pool.fetch(
        "SELECT m.message_id, m.reply_text, m.reply_payload, m.absorbed_message_ids,"
        "       m.send_started_at IS NOT NULL AS send_started, m.xmin::text AS m_xact,"
        "       (SELECT c::json FROM wa_context(m.conversation_id) c) AS messages,"
        "       a.xmin::text AS a_xact, s.turns, s.tokens_out"
        "  FROM processed_webhook_messages m"
        "  LEFT JOIN agent_contexts a ON a.conversation_id = m.conversation_id"
        "  LEFT JOIN agent_sessions s ON s.conversation_id = m.conversation_id"
        " WHERE m.message_id = ANY($1::text[])",
        message_ids,
    )
    return {r["message_id"]: r for r in rows}


async def test_concurrent_saves_go_in_fewer_transactions_each_with_its_own_outcome(
    pool: asyncpg.Pool, agent_pool: asyncpg.Pool
) -> None:
    turns = await started(pool, 12)
    saves = Saves(agent_pool)
    # Newest conversation first: the batch saves in conversation order, each outcome still
    # goes to its own caller. Every other turn has a burst and an interactive reply.
    calls = [save(m, c, t, burst=i % 2 == 0) for i, (m, c, t) in enumerate(reversed(turns))]
    fences = await asyncio.gather(*(saves.save(s) for s in calls))
    assert fences == [s.token for s in calls]
    rows = await saved(pool, [m for m, _, _ in turns])
    for s in calls:
        row = rows[s.message_id]
        assert row["reply_text"] == s.reply_text and row["send_started"]
        assert row["messages"] == s.appended
        assert row["reply_payload"] == s.reply_payload
        assert row["absorbed_message_ids"] == s.absorbed
        assert (row["turns"], row["tokens_out"]) == (1, 5)
        assert row["m_xact"] == row["a_xact"]  # a turn's save is one transaction
    # Twelve saves, fewer commits (each alone: twelve).
    assert len({r["m_xact"] for r in rows.values()}) < len(calls)


async def test_a_stale_save_in_a_batch_fails_alone(
    pool: asyncpg.Pool, agent_pool: asyncpg.Pool
) -> None:
    turns = await started(pool, 6)
    # The last: the first calls run at once, alone; those made meanwhile go together.
    stale_message, stale_conversation, stale_token = turns[-1]
    # Its driver is taken for dead: another one holds the conversation now.
    newer = await store.claim_conversation(pool, stale_conversation, "driver-b")
    assert newer is not None and newer != stale_token
    saves = Saves(agent_pool)
    fences = await asyncio.gather(*(saves.save(save(m, c, t)) for m, c, t in turns))
    assert fences == [newer if m == stale_message else t for m, _, t in turns]
    rows = await saved(pool, [m for m, _, _ in turns])
    assert rows[stale_message]["reply_text"] is None
    assert rows[stale_message]["messages"] is None and rows[stale_message]["turns"] is None
    fresh = [rows[m] for m, _, _ in turns if m != stale_message]
    assert all(r["reply_text"] == f"reply to {r['message_id']}" for r in fresh)
    assert len({r["m_xact"] for r in fresh}) < len(fresh)


async def test_a_batch_that_fails_as_a_whole_saves_each_alone_and_fails_only_the_bad_one(
    pool: asyncpg.Pool, agent_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    turns = await started(pool, 6)
    bad_message = turns[-1][0]  # (the last, to be in the batch: see above)
    # The database refuses this save halfway through the batch's statement (a context needs an
    # agent): the whole statement is rolled back.
    calls = [
        dataclasses.replace(save(m, c, t), agent_type=cast(str, None))
        if m == bad_message
        else save(m, c, t)
        for m, c, t in turns
    ]
    saves = Saves(agent_pool)
    outcomes = await asyncio.gather(*(saves.save(s) for s in calls), return_exceptions=True)
    for s, outcome in zip(calls, outcomes, strict=True):
        if s.message_id == bad_message:
            assert isinstance(outcome, asyncpg.NotNullViolationError)
        else:
            assert outcome == s.token
    assert "saves failed" in caplog.text  # the bad one went in a batch first
    rows = await saved(pool, [m for m, _, _ in turns])
    assert rows[bad_message]["reply_text"] is None and rows[bad_message]["messages"] is None
    good = [rows[s.message_id] for s in calls if s.message_id != bad_message]
    assert all(r["reply_text"] == f"reply to {r['message_id']}" for r in good)
    assert all(r["turns"] == 1 for r in good)
