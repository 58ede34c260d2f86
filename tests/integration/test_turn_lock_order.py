"""A turn's final statement and an ingest batch take a conversation's rows in one order, so a
duplicate delivery of the message being answered cannot deadlock with the statement that
records its reply (db/migrations/0024_finish_lock_order.sql)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.state import machine, store
from tests.support.inbound import inbound

pytestmark = pytest.mark.asyncio


class InTransaction:
    """A pool stand-in whose every `acquire` is one connection inside an open transaction: the
    ingest runs as it does, but its locks are held until the test commits."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        yield self.conn


async def test_a_duplicate_delivery_ingested_while_the_turn_finishes_does_not_deadlock_it(
    pool: asyncpg.Pool, database_url: str
) -> None:
    (first,), _ = await store.ingest(pool, [inbound("wamid.L1")], [], "c", "")
    token, item = await store.claim_turn(pool, first.conversation_id, "me")
    assert item is not None and item.message_id == "wamid.L1"

    ingest = await asyncpg.connect(database_url)
    try:
        tx = ingest.transaction()
        await tx.start()
        # A batch holds the conversation (it counts the conversation's new messages)...
        (new,), _ = await store.ingest(InTransaction(ingest), [inbound("wamid.L2")], [], "c", "")  # type: ignore[arg-type]
        assert not new.duplicate
        # ...while the turn's final statement starts: it must wait for the conversation
        # before it touches the message...
        finishing = asyncio.create_task(
            store.finish_turn(
                pool, item, machine.REPLIED, "replied", token, start_next=True, release=True
            )
        )
        await asyncio.sleep(0.3)
        assert not finishing.done()
        # ...so that the batch's duplicate of that message does not wait for the turn's
        # transaction (PostgreSQL would break the cycle by failing one of the two, and a
        # failed final statement leaves a sent reply unrecorded).
        (again,), _ = await asyncio.wait_for(
            store.ingest(InTransaction(ingest), [inbound("wamid.L1")], [], "c2", ""),  # type: ignore[arg-type]
            timeout=5,
        )
        assert again.duplicate
        await tx.commit()
    finally:
        await ingest.close()
    finished = await asyncio.wait_for(finishing, timeout=5)
    assert finished.from_state == machine.PROCESSING
    # The turn that finished found the batch's new message and started it.
    assert isinstance(finished.next, store.WorkItem)
    assert finished.next.message_id == "wamid.L2"
    assert (
        await pool.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.L1'"
        )
        == "replied"
    )


async def test_a_final_statement_undone_by_a_deadlock_runs_again(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """PostgreSQL breaks a deadlock (or a serialization conflict) by undoing one transaction
    whole: the turn's final statement then runs again, instead of failing the turn with its
    reply sent and not recorded."""
    (first,), _ = await store.ingest(pool, [inbound("wamid.D1")], [], "c", "")
    token, item = await store.claim_turn(pool, first.conversation_id, "me")
    assert item is not None
    # The first update that records a reply is undone as a deadlock victim would be.
    await pool.execute(
        """CREATE SEQUENCE victims;
           CREATE FUNCTION victim() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.status = 'replied' AND nextval('victims') = 1 THEN
                   RAISE EXCEPTION 'deadlock detected (by the test)' USING ERRCODE = '40P01';
               END IF;
               RETURN NEW;
           END $$;
           CREATE TRIGGER victim BEFORE UPDATE ON processed_webhook_messages
               FOR EACH ROW EXECUTE FUNCTION victim();"""
    )
    finished = await store.finish_turn(
        pool,
        item,
        machine.REPLIED,
        "replied",
        token,
        start_next=True,
        reply_message_id="wamid.OUT-D1",
        release=True,
    )
    assert finished.from_state == machine.PROCESSING
    assert await pool.fetchval("SELECT last_value FROM victims") == 2  # undone once, then ran
    row = await pool.fetchrow(
        "SELECT status, reply_message_id FROM processed_webhook_messages"
        " WHERE message_id = 'wamid.D1'"
    )
    assert row is not None and tuple(row) == ("replied", "wamid.OUT-D1")
