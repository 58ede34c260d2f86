"""A delivery status, the agent's own record of the replies it sent, and a batch of turns'
final statements take message rows in one order.

Meta sends a reply's `sent` status moments after the send, often while the turn that sent it is
still recording it: the status (through our callback data, `confirm` in ingest_statuses) and
the batch of final statements (wa_finish_turns) then lock the same messages. Taken in opposite
orders, each held one row the other waited for, and PostgreSQL broke the cycle after
`deadlock_timeout` by failing one of the two: a stalled batch of turns, or a status delivery
answered 503. So with the agent's record of a Turns call's sent replies (record_unanswered_sends,
services/agent/server.py _SentReplies), which looks at every call's replies shortly after the
call ends, while the state service may still be recording them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass

import asyncpg
import pytest

from common import sqlfile
from common.domain import Status
from services.state import machine, store
from tests.support.inbound import inbound
from tests.support.locks import holding, waiters, waiting_for_a_lock

pytestmark = pytest.mark.asyncio
AGENT_Q = sqlfile.load("services.agent", "queries.sql")


def sent(outbound_id: str, inbound_id: str, wa_id: str) -> Status:
    return Status(
        message_id=outbound_id,
        phone_number_id="100",
        recipient_id=wa_id,
        status="sent",
        timestamp=int(time.time()),
        payload_json="{}",
        callback_data=inbound_id,
    )


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Two connections of their own: another transaction's, holding what the test has it
    hold, and the state service's for a batch of final statements."""
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        yield conns
    finally:
        for conn in conns:
            await conn.close()


@dataclass(frozen=True)
class Turns:
    a: store.Ingested
    b: store.Ingested
    token_a: int
    token_b: int


async def two_turns(pool: asyncpg.Pool) -> Turns:
    """A turn running in each of two conversations of one business number, A's and B's: a
    batch of final statements takes A's rows before B's. (B's message stored first: whether a
    status's updates are planned by scan or by index, they then come to B's message first, the
    wrong way round.)"""
    (b,), _ = await store.ingest(pool, [inbound("wamid.B1", "15550000002")], [], "c", "")
    (a,), _ = await store.ingest(pool, [inbound("wamid.A1", "15550000001")], [], "c", "")
    token_a, item_a = await store.claim_turn(pool, a.conversation_id, "me")
    token_b, item_b = await store.claim_turn(pool, b.conversation_id, "me")
    assert item_a is not None and item_b is not None
    return Turns(a, b, token_a, token_b)


async def finish_a_then_b(conn: asyncpg.Connection, t: Turns) -> list[asyncpg.Record]:
    """Both turns' final statements in one batch, as the state service sends them, each
    recording the reply it sent."""
    return await conn.fetch(
        "SELECT * FROM wa_finish_turns($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        ["wamid.A1", "wamid.B1"],
        [machine.REPLIED] * 2,
        machine.message_sources(machine.REPLIED),
        ["replied"] * 2,
        [t.token_a, t.token_b],
        ["", ""],
        [t.a.conversation_id, t.b.conversation_id],
        [False, False],
        ["wamid.OUT-A", "wamid.OUT-B"],
    )


async def statuses_b_first(pool: asyncpg.Pool) -> int:
    """The replies' `sent` statuses arrive, B's first; how many it stored."""
    statuses = [
        sent("wamid.OUT-B", "wamid.B1", "15550000002"),
        sent("wamid.OUT-A", "wamid.A1", "15550000001"),
    ]
    _, stored = await store.ingest(pool, [], statuses, "c", "")
    return stored


async def agent_records_b_first(pool: asyncpg.Pool) -> int:
    """The agent looks again at the replies its Turns call's turns sent, B's first; how many
    it recorded itself."""
    recorded = await pool.fetch(
        AGENT_Q["record_unanswered_sends"],
        ["wamid.B1", "wamid.A1"],
        ["wamid.OUT-B", "wamid.OUT-A"],
    )
    return len(recorded)


@pytest.mark.parametrize(
    ("recording", "writes"),
    [(statuses_b_first, 2), (agent_records_b_first, 0)],
    ids=["status", "agent"],
)
async def test_what_records_replies_being_recorded_waits_for_their_turns_without_deadlock(
    pool: asyncpg.Pool,
    connections: list[asyncpg.Connection],
    recording: Callable[[asyncpg.Pool], Coroutine[None, None, int]],
    writes: int,
) -> None:
    """A status (which stores itself), or the agent's own record (which writes nothing once
    the batch has recorded both replies)."""
    blocker, finisher = connections
    turns = await two_turns(pool)
    # Message B's row is held elsewhere (as by another status of B's reply being stored), so
    # the batch stops between A's message and B's. (It takes both conversations' rows first,
    # db/migrations/0037, then the messages in the same order.)
    hold = await holding(
        blocker,
        "SELECT 1 FROM processed_webhook_messages WHERE message_id = $1 FOR NO KEY UPDATE",
        turns.b.message_id,
    )
    finishing = asyncio.create_task(finish_a_then_b(finisher, turns))
    await waiting_for_a_lock(pool, finisher.get_server_pid())  # holds A, waits for B
    storing = asyncio.create_task(recording(pool))
    await asyncio.sleep(0.3)
    assert not storing.done()  # it waits for message A, which the batch holds...
    await hold.rollback()  # ...and the batch goes on to B
    # Neither is failed as a deadlock's victim (deadlock_timeout is 1 s).
    finished = await asyncio.wait_for(finishing, timeout=10)
    stored = await asyncio.wait_for(storing, timeout=10)
    assert [r["finished"] for r in finished] == ["done", "done"]
    assert stored == writes
    rows = await pool.fetch(
        "SELECT message_id, status, reply_message_id, reply_status"
        " FROM processed_webhook_messages WHERE kind = 'message' ORDER BY message_id"
    )
    assert [tuple(r) for r in rows] == [
        ("wamid.A1", "replied", "wamid.OUT-A", "sent"),
        ("wamid.B1", "replied", "wamid.OUT-B", "sent"),
    ]


async def test_a_status_delivered_with_a_message_does_not_hold_the_messages_conversation(
    pool: asyncpg.Pool, connections: list[asyncpg.Connection]
) -> None:
    """A batch of deliveries with a message of conversation B and the `sent` status of A's
    reply, while a batch of final statements records A's reply and then B's: the status must
    not wait for A's message while B's conversation row is held for the new message."""
    blocker, finisher = connections
    turns = await two_turns(pool)
    # Another delivery of B's new message is being stored, not yet committed: the batch
    # below stores it after B's conversation row (which it updates) and waits here.
    hold = await holding(
        blocker,
        """INSERT INTO processed_webhook_messages
               (message_id, kind, phone_number_id, wa_id, message_type, wa_timestamp,
                payload, status, correlation_id)
           VALUES ('wamid.B2', 'message', '100', '15550000002', 'text', now(), '{}',
                   'skipped', 'blocker')""",
    )
    storing = asyncio.create_task(
        store.ingest(
            pool,
            [inbound("wamid.B2", "15550000002")],
            [sent("wamid.OUT-A", "wamid.A1", "15550000001")],
            "c",
            "",
        )
    )
    await waiters(pool, 1)
    finishing = asyncio.create_task(finish_a_then_b(finisher, turns))
    await waiting_for_a_lock(pool, finisher.get_server_pid())  # holds A, waits for B
    await hold.rollback()  # the batch stores B2 and goes on
    # Neither is failed as a deadlock's victim (deadlock_timeout is 1 s).
    (new,), _ = await asyncio.wait_for(storing, timeout=10)
    finished = await asyncio.wait_for(finishing, timeout=10)
    assert not new.duplicate
    assert [r["finished"] for r in finished] == ["done", "done"]
    row = await pool.fetchrow(
        "SELECT status, reply_message_id, reply_status FROM processed_webhook_messages"
        " WHERE message_id = 'wamid.A1'"
    )
    assert row is not None and tuple(row) == ("replied", "wamid.OUT-A", "sent")
