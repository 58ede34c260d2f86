"""Claims and finishes of many conversations in one statement (db/migrations/0022,
services/state/store.py `_TurnBatches`): fewer transactions than calls, and each caller still
gets its own turn, its own fence error, and a right answer when its batch fails whole.

Transactions are counted from outside: the test database's `xact_commit` / `xact_rollback` in
pg_stat_database, read from another database once every connection to the test database is
closed (a backend reports its counts when it exits)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from common import db
from common.domain import Message
from services.state import machine, store
from tests.support.servers import Postgres

N = 24  # conversations in flight at once


class Counted:
    """The test database, its committed and rolled back transactions counted."""

    def __init__(self, pg: Postgres, url: str) -> None:
        self.admin_dsn = pg.admin_dsn
        self.url = url
        self.name = urlsplit(url).path.lstrip("/")

    async def open(self) -> asyncpg.Pool:
        return await db.create_pool(self.url, min_size=1, max_size=10)

    async def counts(self) -> tuple[int, int]:
        """(commits, rollbacks) so far, once no connection to the database is left."""
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            deadline = time.monotonic() + 30
            seen: tuple[int, int] | None = None
            while True:
                busy = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", self.name
                )
                row = await conn.fetchrow(
                    "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
                    self.name,
                )
                assert row is not None
                now = (int(row[0]), int(row[1]))
                if not busy and now == seen:
                    return now
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: still connected, or its counts moving")
                seen = now
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


@pytest.fixture
async def counted(pg: Postgres, database_url: str) -> Counted:
    return Counted(pg, database_url)


@pytest.fixture
async def conversations(counted: Counted) -> AsyncIterator[list[int]]:
    """N conversations with two messages waiting each: wamid.<n>.1, then wamid.<n>.2."""
    pool = await counted.open()
    try:
        now = int(time.time())
        ids = []
        for n in range(N):
            messages = [
                Message(
                    message_id=f"wamid.{n}.{k}",
                    phone_number_id="100",
                    wa_id=f"1555{n:07d}",
                    contact_name="Ann",
                    type="text",
                    timestamp=now + k,
                    text="hi",
                    payload_json="{}",
                )
                for k in (1, 2)
            ]
            rows, _ = await store.ingest(pool, messages, [], "c", "")
            ids.append(rows[0].conversation_id)
    finally:
        await pool.close()
    yield ids


async def _statuses(pool: asyncpg.Pool) -> dict[str, str]:
    rows = await pool.fetch("SELECT message_id, status FROM processed_webhook_messages")
    return {r["message_id"]: r["status"] for r in rows}


async def _claim_all(pool: asyncpg.Pool, ids: list[int]) -> list[tuple[int, store.WorkItem]]:
    claimed = await asyncio.gather(*(store.claim_turn_or_release(pool, c, "me") for c in ids))
    out = []
    for token, item in claimed:
        assert isinstance(item, store.WorkItem)
        out.append((token, item))
    return out


async def test_concurrent_claims_share_a_transaction_and_each_gets_its_own_turn(
    counted: Counted, conversations: list[int]
) -> None:
    """N claims at once cost far fewer transactions than N (one alone costs one each, the
    control below), and each caller gets its conversation's oldest message with the token its
    own claim took, under its own name; a conversation that does not exist fails its caller
    only."""
    missing = max(conversations) + 1000
    calls = [*reversed(conversations), missing]
    before, _ = await counted.counts()
    pool = await counted.open()
    try:
        results = await asyncio.gather(
            *(store.claim_turn_or_release(pool, c, f"owner-{c}") for c in calls),
            return_exceptions=True,
        )
    finally:
        await pool.close()
    batched, _ = await counted.counts()

    assert isinstance(results[-1], store.UnknownMessage)
    for conv, result in zip(calls[:-1], results[:-1], strict=True):
        assert not isinstance(result, BaseException), result
        token, item = result
        n = conversations.index(conv)
        assert isinstance(item, store.WorkItem)
        assert (item.conversation_id, item.message_id) == (conv, f"wamid.{n}.1")
        assert token == item.fence_token == 1

    # The control: the same number of claims, one after another, each alone.
    pool = await counted.open()
    try:
        rows = await pool.fetch(
            "SELECT id, fence_token, lock_owner FROM webhook_conversations ORDER BY id"
        )
        assert [tuple(r) for r in rows] == [(c, 1, f"owner-{c}") for c in conversations]
        audited = await pool.fetchval(
            "SELECT count(*) FROM conversation_state_transitions"
            " WHERE entity = 'conversation' AND reason = 'claimed by owner-' || conversation_id"
        )
        assert audited == N
    finally:
        await pool.close()
    start, _ = await counted.counts()
    pool = await counted.open()
    try:
        for c in calls[:-1]:
            await store.claim_turn_or_release(pool, c, "again")
    finally:
        await pool.close()
    alone, _ = await counted.counts()

    assert alone - start >= N
    # Fewer than one a call. (How many fewer depends on timing: on a loaded machine the calls
    # that run at once, alone, before the others queue behind them, and the pool's lazily
    # opened connections, each with its own setup transactions, vary from run to run.)
    assert batched - before < N, (batched - before, alone - start)


async def test_a_stale_fence_in_a_batch_fails_its_caller_only(
    counted: Counted, conversations: list[int]
) -> None:
    """One finish of a batch whose conversation was taken over since: StaleFence for its
    caller, and nothing of its turn written; the others finish and start their next turn, in
    far fewer transactions than finishes."""
    pool = await counted.open()
    try:
        claimed = await _claim_all(pool, conversations)
        victim = conversations[N // 2]
        taken, _ = await store.claim_turn(pool, victim, "someone else")
    finally:
        await pool.close()
    before, _ = await counted.counts()
    pool = await counted.open()
    try:
        results = await asyncio.gather(
            *(
                store.finish_turn(
                    pool, item, machine.REPLIED, "replied", token, start_next=True, release=True
                )
                for token, item in claimed
            ),
            return_exceptions=True,
        )
        statuses = await _statuses(pool)
    finally:
        await pool.close()
    after, _ = await counted.counts()

    for (token, item), result in zip(claimed, results, strict=True):
        n = conversations.index(item.conversation_id)
        if item.conversation_id == victim:
            assert isinstance(result, store.StaleFence), result
            assert statuses[item.message_id] == machine.PROCESSING  # the new holder's
            continue
        assert isinstance(result, store.Finished), result
        assert result.from_state == machine.PROCESSING
        assert isinstance(result.next, store.WorkItem)
        assert result.next.message_id == f"wamid.{n}.2" and result.next.fence_token == token
        assert statuses[item.message_id] == machine.REPLIED
        assert statuses[f"wamid.{n}.2"] == machine.PROCESSING
    assert taken == 2
    assert after - before < N, after - before  # fewer than one a finish (see above)


async def test_a_batch_that_fails_whole_runs_each_finish_alone(
    counted: Counted, conversations: list[int]
) -> None:
    """An error raised inside one finish's function undoes its whole batch (counted: a
    rollback for the batch, one for the bad finish run again alone); each finish then runs
    alone, so that only its caller fails and every other one is replied and moves on."""
    bad = "wamid.7.1"
    pool = await counted.open()
    try:
        claimed = await _claim_all(pool, conversations)
        await pool.execute(
            f"""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.message_id = '{bad}' AND NEW.status = 'replied' THEN
                        RAISE EXCEPTION 'refused by the test';
                    END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER refuse BEFORE UPDATE ON processed_webhook_messages
                    FOR EACH ROW EXECUTE FUNCTION refuse();"""
        )
    finally:
        await pool.close()
    _, rolled_back = await counted.counts()
    pool = await counted.open()
    try:
        results = await asyncio.gather(
            *(
                store.finish_turn(
                    pool, item, machine.REPLIED, "replied", token, start_next=True, release=True
                )
                for token, item in claimed
            ),
            return_exceptions=True,
        )
        statuses = await _statuses(pool)
    finally:
        await pool.close()
    _, rolled_back_after = await counted.counts()

    for (_, item), result in zip(claimed, results, strict=True):
        n = conversations.index(item.conversation_id)
        if item.message_id == bad:
            assert isinstance(result, asyncpg.RaiseError), result
            assert statuses[bad] == machine.PROCESSING
            assert statuses[f"wamid.{n}.2"] == machine.RECEIVED
            continue
        assert isinstance(result, store.Finished), result
        assert isinstance(result.next, store.WorkItem)
        assert result.next.message_id == f"wamid.{n}.2"
        assert statuses[item.message_id] == machine.REPLIED
    assert rolled_back_after - rolled_back >= 2


async def test_a_deadlocked_batch_runs_each_claim_alone(
    counted: Counted, conversations: list[int]
) -> None:
    """A batch of claims that deadlocks with a transaction locking the same conversations in
    the other order is undone by PostgreSQL (the other transaction gets its locks); each claim
    then runs alone and its caller still gets its turn."""
    first, second, *rest = sorted(conversations)
    # Of two sessions in a deadlock, the one whose check runs first (deadlock_timeout after it
    # began to wait) is undone; the batch waits first, but with the default 1 s a loaded
    # machine can delay the other's lock past the batch's only check, and the other is undone
    # instead. Both sessions get 5 s: the other has that long to close the cycle.
    admin = await asyncpg.connect(counted.admin_dsn, timeout=10)
    try:
        await admin.execute(f"ALTER DATABASE \"{counted.name}\" SET deadlock_timeout = '5s'")
    finally:
        await admin.close()
    pool = await counted.open()
    other = await asyncpg.connect(counted.url, timeout=10)
    try:
        async with other.transaction():
            await other.execute(
                "SELECT 1 FROM webhook_conversations WHERE id = $1 FOR UPDATE", second
            )
            # While two calls run (alone, these of the rest), the next ones queue and then
            # go together: `first` and `second` in one batch.
            claims = asyncio.gather(
                *(store.claim_turn_or_release(pool, c, "me") for c in (*rest[:2], first, second))
            )
            # The batch holds `first` and waits for `second`. From pg_locks: this session is in
            # a transaction, where pg_stat_activity keeps the sessions of its first read (a
            # backend status snapshot until the transaction ends), so it would never show the
            # connection the pool opened afterwards for the batch.
            deadline = time.monotonic() + 20
            while not await other.fetchval(
                "SELECT count(*) FROM pg_locks l"
                " WHERE NOT l.granted AND pg_backend_pid() = ANY (pg_blocking_pids(l.pid))"
            ):
                if claims.done():  # ended without waiting: say how
                    await claims
                    raise AssertionError("the claims ended without waiting for the lock")
                if time.monotonic() > deadline:
                    await other.execute("SELECT pg_stat_clear_snapshot()")
                    sessions = await other.fetch(
                        "SELECT pid, state, wait_event_type, wait_event, left(query, 80) AS q"
                        " FROM pg_stat_activity WHERE datname = current_database()"
                    )
                    raise AssertionError(
                        f"the batch never waited for the lock: {[dict(r) for r in sessions]}"
                    )
                await asyncio.sleep(0.05)
            # The batch waited first: its deadlock check (deadlock_timeout later) finds the
            # cycle first, and undoes the batch.
            await other.execute(
                "SELECT 1 FROM webhook_conversations WHERE id = $1 FOR UPDATE", first
            )
        results = await claims
    finally:
        await other.close()
        await pool.close()
    for conv, (token, item) in zip((*rest[:2], first, second), results, strict=True):
        n = conversations.index(conv)
        assert isinstance(item, store.WorkItem)
        assert (item.message_id, token) == (f"wamid.{n}.1", 1)
