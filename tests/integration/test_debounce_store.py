"""A debounced burst's final transition against real PostgreSQL (wa_save_turn and
wa_finish_turn, migration 0018): only the messages saved with the reply, of the same
conversation and still waiting, move to replied with the turn, audited and fenced."""

from __future__ import annotations

import time

import asyncpg
import pytest

from common import sqlfile
from services.state import machine, store
from tests.support.inbound import inbound


async def save_reply(
    pool: asyncpg.Pool, conv: int, token: int, message_id: str, burst: list[str]
) -> int:
    """The agent's save of a reply and its burst (services/agent/queries.sql, save_turn)."""
    query = sqlfile.load("services.agent", "queries.sql")["save_turn"]
    fence = await pool.fetchval(
        query,
        conv,
        token,
        message_id,
        "concierge",
        "concierge",
        [],
        0,
        "ok",
        0,
        0,
        0,
        "c",
        False,
        burst,
        None,  # a text reply: no structured one (reply_payload)
        100,  # the context's bound (keep)
    )
    return int(fence)


async def test_only_the_saved_waiting_messages_of_the_conversation_move_with_the_turn(
    pool: asyncpg.Pool,
) -> None:
    now = int(time.time())
    rows, _ = await store.ingest(
        pool, [inbound(f"wamid.B{n}", ts=now + n) for n in range(1, 5)], [], "c", ""
    )
    other, _ = await store.ingest(pool, [inbound("wamid.X1", wa_id="15559990000")], [], "c", "")
    conv = rows[0].conversation_id
    assert other[0].conversation_id != conv
    token, first = await store.claim_turn(pool, conv, "me")
    assert first is not None and first.message_id == "wamid.B1"
    # The agent saved B2, B3 and (wrongly) another conversation's message with the reply.
    assert await save_reply(pool, conv, token, "wamid.B1", ["wamid.B2", "wamid.B3", "wamid.X1"])
    assert await save_reply(pool, conv, token - 1, "wamid.B1", ["wamid.B4"]) == token
    # B3 stopped waiting meanwhile.
    await store.transition(pool, "wamid.B3", machine.SKIPPED, "not waiting any more")

    done = await store.finish_turn(
        pool,
        first,
        machine.REPLIED,
        "replied",
        token,
        start_next=True,
        # B4 was never saved with the reply.
        absorbed=("wamid.B2", "wamid.B3", "wamid.X1", "wamid.B4"),
    )
    assert done.absorbed == ("wamid.B2",)
    assert isinstance(done.next, store.WorkItem) and done.next.message_id == "wamid.B4"
    statuses = {
        r["message_id"]: r["status"]
        for r in await pool.fetch("SELECT message_id, status FROM processed_webhook_messages")
    }
    assert statuses == {
        "wamid.B1": "replied",
        "wamid.B2": "replied",
        "wamid.B3": "skipped",
        "wamid.B4": "processing",
        "wamid.X1": "received",
    }
    (moved,) = await pool.fetch(
        "SELECT from_state, to_state, reason, fence_token FROM conversation_state_transitions"
        " WHERE message_id = 'wamid.B2' AND to_state = 'replied'"
    )
    assert tuple(moved) == (
        "received",
        "replied",
        "replied together with wamid.B1 (debounced burst)",
        token,
    )


async def test_a_stale_turn_moves_none_of_its_burst(pool: asyncpg.Pool) -> None:
    now = int(time.time())
    rows, _ = await store.ingest(
        pool, [inbound(f"wamid.S{n}", ts=now + n) for n in range(1, 3)], [], "c", ""
    )
    conv = rows[0].conversation_id
    token, first = await store.claim_turn(pool, conv, "me")
    assert first is not None
    await save_reply(pool, conv, token, "wamid.S1", ["wamid.S2"])
    await pool.execute(
        "UPDATE webhook_conversations SET fence_token = fence_token + 1 WHERE id = $1", conv
    )
    with pytest.raises(store.StaleFence):
        await store.finish_turn(
            pool, first, machine.REPLIED, "replied", token, start_next=True, absorbed=("wamid.S2",)
        )
    status = await pool.fetchval(
        "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.S2'"
    )
    assert status == "received"
