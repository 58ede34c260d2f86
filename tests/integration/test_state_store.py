"""The state service's domain against real PostgreSQL and Redis: idempotent ingest under
concurrency, fencing of a stalled holder, audited refusals, monotonic delivery states."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import replace

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from common import kv
from common.domain import Status
from services.agent import turn as agent_turn
from services.state import machine, store
from services.state.locks import Locks
from tests.support.inbound import inbound
from tests.support.servers import Redis


async def test_concurrent_copies_of_one_message_store_it_once(pool: asyncpg.Pool) -> None:
    copies = [store.ingest(pool, [inbound("wamid.DUP")], [], f"c{i}", "") for i in range(12)]
    results = await asyncio.gather(*copies)
    fresh = [r for (rs, _) in results for r in rs if not r.duplicate]
    assert len(fresh) == 1
    assert await pool.fetchval("SELECT count(*) FROM processed_webhook_messages") == 1
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM conversation_state_transitions WHERE message_id = 'wamid.DUP'"
        )
        == 1
    )


async def test_a_batch_keeps_deliveries_apart_and_dedupes_inside(pool: asyncpg.Pool) -> None:
    d1 = store.DeliveryIn([inbound("wamid.A"), inbound("wamid.B", kind="reaction")], [], "c1", "")
    d2 = store.DeliveryIn([inbound("wamid.A")], [], "c2", "")
    out = await store.ingest_many(pool, [d1, d2])
    assert [(r.message_id, r.status, r.duplicate) for r in out[0].results] == [
        ("wamid.A", "received", False),
        ("wamid.B", "skipped", False),
    ]
    assert [(r.message_id, r.duplicate) for r in out[1].results] == [("wamid.A", True)]
    reason = await pool.fetchval(
        "SELECT status_reason FROM processed_webhook_messages WHERE message_id = 'wamid.B'"
    )
    assert reason == "reactions are recorded, not answered"


async def test_statuses_are_idempotent_and_monotonic(pool: asyncpg.Pool) -> None:
    await store.ingest(pool, [inbound("wamid.IN")], [], "c", "")
    await pool.execute(
        "UPDATE processed_webhook_messages SET reply_message_id = 'wamid.OUT' "
        "WHERE message_id = 'wamid.IN'"
    )

    def st(kind: str) -> Status:
        return Status("wamid.OUT", "100", "15550001111", kind, int(time.time()), "{}")

    _, n = await store.ingest(pool, [], [st("read"), st("delivered")], "c", "")
    assert n == 2
    _, n = await store.ingest(pool, [], [st("sent"), st("read")], "c", "")
    assert n == 1  # read was already stored
    state = await pool.fetchval(
        "SELECT reply_status FROM processed_webhook_messages WHERE message_id = 'wamid.IN'"
    )
    assert state == "read"


async def test_statuses_confirm_an_unrecorded_send_and_its_parts_in_one_call(
    pool: asyncpg.Pool,
) -> None:
    """A turn died mid-send: its message has no recorded reply, and one of its long reply's
    two parts has no recorded send. One call brings the reply's `sent` and `delivered` (with
    our callback data, the message's id) and the second part's `sent`: the send is confirmed
    and the reply gets the furthest state of the call (delivered), and the part its id."""
    await store.ingest(pool, [inbound("wamid.IN")], [], "c", "")
    await pool.execute(
        "INSERT INTO agent_reply_parts (message_id, part, body, sent_id)"
        " VALUES ('wamid.IN', 0, 'first', 'wamid.P0'), ('wamid.IN', 1, 'second', NULL)"
    )

    def st(outbound: str, kind: str, callback: str) -> Status:
        return Status(
            outbound, "100", "15550001111", kind, int(time.time()), "{}", callback_data=callback
        )

    _, n = await store.ingest(
        pool,
        [],
        [
            st("wamid.OUT", "sent", "wamid.IN"),
            st("wamid.OUT", "delivered", "wamid.IN"),
            st("wamid.P1", "sent", "wamid.IN#1"),
        ],
        "c",
        "",
    )
    assert n == 3
    row = await pool.fetchrow(
        "SELECT reply_message_id, reply_status, reply_confirmed_by"
        " FROM processed_webhook_messages WHERE message_id = 'wamid.IN'"
    )
    assert row is not None
    assert row["reply_message_id"] == "wamid.OUT" and row["reply_status"] == "delivered"
    assert (row["reply_confirmed_by"] or "").startswith("status webhook: ")
    parts = await pool.fetch(
        "SELECT part, sent_id, reply_status, confirmed_by FROM agent_reply_parts ORDER BY part"
    )
    assert [tuple(p) for p in parts] == [
        (0, "wamid.P0", None, None),
        (1, "wamid.P1", "sent", "status webhook: sent"),
    ]


async def test_next_message_is_the_oldest_by_whatsapp_timestamp(pool: asyncpg.Pool) -> None:
    base = int(time.time())
    msgs = [inbound(f"wamid.O{i}", ts=base + i) for i in (3, 1, 2, 0)]
    await store.ingest(pool, msgs, [], "c", "")
    (conv,) = {
        r["conversation_id"]
        for r in await pool.fetch("SELECT conversation_id FROM processed_webhook_messages")
    }
    token = await store.claim_conversation(pool, conv, "me")
    seen = []
    while (item := await store.next_message(pool, conv, token)) is not None:
        seen.append(item.message_id)
        await store.transition(pool, item.message_id, machine.REPLIED, "ok", token=token)
    assert seen == ["wamid.O0", "wamid.O1", "wamid.O2", "wamid.O3"]


async def test_a_stalled_holder_cannot_write_over_its_successor(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    try:
        holder_a = Locks(client, ttl_seconds=2.0, prefix=redis_prefix, instance="a")
        holder_b = Locks(client, ttl_seconds=30, prefix=redis_prefix, instance="b")
        await store.ingest(pool, [inbound("wamid.S1"), inbound("wamid.S2")], [], "c", "")
        conv = await pool.fetchval("SELECT id FROM webhook_conversations")

        lease_a = await holder_a.acquire(conv)
        assert lease_a is not None
        token_a = await store.claim_conversation(pool, conv, lease_a.owner)
        item_a = await store.next_message(pool, conv, token_a)
        assert item_a is not None
        assert await holder_b.acquire(conv) is None  # A's lease holds

        # A stalls past its TTL (and does not renew): its lease expires.
        ttl_ms = await client.pttl(holder_a.lock_key(conv))
        await asyncio.sleep(max(ttl_ms, 0) / 1000 + 0.1)
        lease_b = await holder_b.acquire(conv)
        assert lease_b is not None
        token_b = await store.claim_conversation(pool, conv, lease_b.owner)
        assert token_b > token_a

        with pytest.raises(store.StaleFence):
            await store.transition(pool, item_a.message_id, machine.REPLIED, "late", token=token_a)
        with pytest.raises(store.StaleFence):
            await store.next_message(pool, conv, token_a)
        assert not await holder_a.release(lease_a)  # compare-and-delete: not A's any more
        assert await holder_b.holder(conv) == lease_b.owner

        # B resumes A's message and finishes it.
        item_b = await store.next_message(pool, conv, token_b)
        assert item_b is not None and item_b.message_id == item_a.message_id and item_b.resumed
        await store.transition(pool, item_b.message_id, machine.REPLIED, "ok", token=token_b)
        status = await pool.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = $1", item_a.message_id
        )
        assert status == "replied"
        trail = await pool.fetch(
            "SELECT from_state, to_state, fence_token FROM conversation_state_transitions"
            " WHERE message_id = $1 ORDER BY id",
            item_a.message_id,
        )
        assert [(r["from_state"], r["to_state"], r["fence_token"]) for r in trail] == [
            (None, "received", None),
            ("received", "processing", token_a),
            ("processing", "received", token_b),
            ("received", "processing", token_b),
            ("processing", "replied", token_b),
        ]
    finally:
        await client.aclose()


async def test_illegal_transitions_are_refused_and_audited(pool: asyncpg.Pool) -> None:
    await store.ingest(pool, [inbound("wamid.I")], [], "c", "")
    with pytest.raises(machine.IllegalTransition) as info:
        await store.transition(pool, "wamid.I", machine.REPLIED, "skip the turn")
    await store.record_illegal(pool, "wamid.I", info.value, "c")
    rows = await pool.fetch(
        "SELECT from_state, to_state FROM conversation_state_transitions "
        "WHERE message_id = 'wamid.I' ORDER BY id"
    )
    assert [(r["from_state"], r["to_state"]) for r in rows] == [
        (None, "received"),
        ("received", "refused:replied"),
    ]
    assert (
        await pool.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.I'"
        )
        == "received"
    )


async def test_lease_renewal_keeps_a_long_turn(redis_server: Redis, redis_prefix: str) -> None:
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=1.0, prefix=redis_prefix)
        lease = await locks.acquire(7)
        assert lease is not None
        async with locks.keep_renewed(lease):
            await asyncio.sleep(2.5)
            assert await locks.holder(7) == lease.owner
        assert await locks.release(lease)
        assert await locks.holder(7) is None
    finally:
        await client.aclose()


async def test_a_turn_renews_its_lease_only_when_it_was_not_just_set(
    redis_server: Redis, redis_prefix: str
) -> None:
    """Each turn starts with nearly a full lease: `refresh` renews one set more than a tenth
    of its TTL ago, and spares the round trip for one just set (fails without the check:
    every refresh renews)."""
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=100.0, prefix=redis_prefix)
        lease = await locks.acquire(8)
        assert lease is not None
        key = locks.lock_key(8)
        await client.pexpire(key, 50_000)  # what is left of it, whatever its age says
        assert await locks.refresh(lease)
        assert await client.pttl(key) <= 50_000  # just set: not renewed
        lease.renewed_at -= 11.0  # set 11 s ago: over a tenth of the TTL
        assert await locks.refresh(lease)
        assert await client.pttl(key) > 90_000
        # Someone else's lease is never refreshed, however fresh ours looks.
        await client.set(key, "other", px=100_000)
        lease.renewed_at -= 11.0
        assert not await locks.refresh(lease) and lease.lost
    finally:
        await client.aclose()


async def test_finishing_a_turn_starts_the_next_in_the_same_round_trip(
    pool: asyncpg.Pool,
) -> None:
    """finish_turn applies the replied transition (audited, fenced) and starts the oldest
    waiting message with the same token, as transition + next_message would; a stale token
    writes nothing. (Without wa_finish_turn, migration 0015, the query fails.)"""
    now = int(time.time())
    rows, _ = await store.ingest(
        pool, [inbound("wamid.F1", ts=now), inbound("wamid.F2", ts=now + 1)], [], "c", ""
    )
    conv = rows[0].conversation_id
    token = await store.claim_conversation(pool, conv, "me")
    first = await store.next_message(pool, conv, token)
    assert first is not None and first.message_id == "wamid.F1"

    done = await store.finish_turn(pool, first, machine.REPLIED, "replied", token, start_next=True)
    assert done.from_state == machine.PROCESSING
    second = done.next
    assert isinstance(second, store.WorkItem) and second.message_id == "wamid.F2"
    assert second.fence_token == token and second.attempts == 1 and not second.resumed
    statuses = {
        r["message_id"]: r["status"]
        for r in await pool.fetch("SELECT message_id, status FROM processed_webhook_messages")
    }
    assert statuses == {"wamid.F1": "replied", "wamid.F2": "processing"}
    audit = await pool.fetch(
        "SELECT message_id, from_state, to_state FROM conversation_state_transitions"
        " WHERE entity = 'message' AND from_state IS NOT NULL ORDER BY id"
    )
    assert [tuple(r) for r in audit] == [
        ("wamid.F1", "received", "processing"),
        ("wamid.F1", "processing", "replied"),
        ("wamid.F2", "received", "processing"),
    ]

    # A later holder's claim: the old token finishes nothing and starts nothing.
    await pool.execute(
        "UPDATE webhook_conversations SET fence_token = fence_token + 1 WHERE id = $1", conv
    )
    with pytest.raises(store.StaleFence):
        await store.finish_turn(pool, second, machine.REPLIED, "replied", token, start_next=True)
    assert (
        await pool.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.F2'"
        )
        == "processing"
    )

    token += 1
    done = await store.finish_turn(
        pool, second, machine.REPLIED, "replied", token, start_next=False
    )
    assert isinstance(done.next, store.NotAsked)
    third = await store.next_message(pool, conv, token)
    assert third is None


async def test_a_claim_starts_the_first_turn_in_the_same_round_trip(pool: asyncpg.Pool) -> None:
    """claim_turn moves the fence on (audited) and starts the oldest waiting message with the
    new token, as claim_conversation + next_message would; a later claim takes over with the
    next token and resumes the message. (Without wa_claim_turn, migration 0015, the query
    fails.)"""
    now = int(time.time())
    rows, _ = await store.ingest(
        pool, [inbound("wamid.C2", ts=now + 1), inbound("wamid.C1", ts=now)], [], "c", ""
    )
    conv = rows[0].conversation_id
    token, first = await store.claim_turn(pool, conv, "me")
    assert first is not None and first.message_id == "wamid.C1" and first.fence_token == token
    assert (
        await pool.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.C1'"
        )
        == "processing"
    )
    claims = await pool.fetch(
        "SELECT from_state, to_state, fence_token FROM conversation_state_transitions"
        " WHERE entity = 'conversation' ORDER BY id"
    )
    assert [tuple(r) for r in claims] == [("idle", "active", token)]
    # The holder dies: the next claim takes over and resumes the same message.
    later, resumed = await store.claim_turn(pool, conv, "you")
    assert later == token + 1
    assert resumed is not None and resumed.message_id == "wamid.C1" and resumed.resumed
    with pytest.raises(store.StaleFence):
        await store.next_message(pool, conv, token)
    with pytest.raises(store.UnknownMessage):
        await store.claim_turn(pool, conv + 1000, "me")


async def test_a_turns_window_starts_at_the_customers_newest_message_whatever_came_last(
    pool: asyncpg.Pool,
) -> None:
    """The 24-hour window's start a turn gets (wa_start_turn, and the agent's own read of a
    turn's state) is the customer's newest message in the conversation by Meta's timestamp,
    as the operator's reply reads it (db/migrations/0034): an older message delivered late,
    the reply's statuses and another customer's messages do not move it."""
    now = int(time.time())
    rows, _ = await store.ingest(pool, [inbound("wamid.W2", ts=now - 60)], [], "c", "")
    conv = rows[0].conversation_id
    await store.ingest(pool, [inbound("wamid.W1", ts=now - 600)], [], "c", "")  # late
    await store.ingest(pool, [inbound("wamid.X1", wa_id="15550002222", ts=now)], [], "c", "")
    update = Status("wamid.R1", "100", "15550001111", "delivered", now, "{}")
    await store.ingest(pool, [], [update], "c", "")

    _, first = await store.claim_turn_or_release(pool, conv, "me")
    assert isinstance(first, store.WorkItem) and first.message_id == "wamid.W1"
    assert first.last_customer_at == now - 60
    row = await pool.fetchrow(agent_turn.Q["turn_state"], "wamid.W1")
    assert row is not None and row["last_customer_at"].timestamp() == now - 60
    # Without a message, no window: a conversation whose customer never wrote (an event's).
    silent = await pool.fetchval(
        "INSERT INTO webhook_conversations (phone_number_id, wa_id, customer_id)"
        " VALUES ('100', '15550003333', '15550003333') RETURNING id"
    )
    assert await pool.fetchval("SELECT last_customer_at FROM wa_start_turn($1, 0)", silent) is None


async def test_copies_of_stored_messages_do_not_move_the_window(pool: asyncpg.Pool) -> None:
    """Only messages stored now move a conversation's last message time, the window's start
    (db/migrations/0035): Meta's retries of a message without a usable timestamp (stored with
    the ingest's time) do not reopen a window that has closed, and a copy delivered again
    with the customer's BSUID does not move the BSUID's other conversation."""
    day_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=25)
    undated = replace(inbound("wamid.U1"), timestamp=0)
    rows, _ = await store.ingest(pool, [undated], [], "c", "")
    conv = rows[0].conversation_id
    # A day passes: the message and the conversation as they would be by then.
    await pool.execute(
        "UPDATE processed_webhook_messages SET wa_timestamp = $1 WHERE message_id = 'wamid.U1'",
        day_ago,
    )
    await pool.execute(
        "UPDATE webhook_conversations SET last_message_at = $1 WHERE id = $2", day_ago, conv
    )
    again, _ = await store.ingest(pool, [undated], [], "c", "")
    assert again[0].duplicate
    last = "SELECT last_message_at FROM webhook_conversations WHERE id = $1"
    assert await pool.fetchval(last, conv) == day_ago

    # The BSUID's conversation (a message sent under the BSUID alone, three hours ago), and the
    # phone number's, with a message an hour ago; that message comes again, with the BSUID.
    now = int(time.time())
    bsuid = "US.13491208655302741918"
    rows, _ = await store.ingest(
        pool, [inbound("wamid.B1", "", user_id=bsuid, ts=now - 3 * 3600)], [], "c", ""
    )
    by_bsuid = rows[0].conversation_id
    rows, _ = await store.ingest(
        pool, [inbound("wamid.P1", "15550009999", ts=now - 3600)], [], "c", ""
    )
    by_phone = rows[0].conversation_id
    assert by_bsuid != by_phone
    copy = inbound("wamid.P1", "15550009999", user_id=bsuid, ts=now - 3600)
    again, _ = await store.ingest(pool, [copy], [], "c", "")
    assert again[0].duplicate
    assert (await pool.fetchval(last, by_bsuid)).timestamp() == now - 3 * 3600
    # A copy that brings the BSUID of a customer known so far by phone number only: their
    # conversation becomes the BSUID's (adopted), and keeps its time.
    late = replace(inbound("wamid.U2", "15550008888"), timestamp=0)
    rows, _ = await store.ingest(pool, [late], [], "c", "")
    adopted = rows[0].conversation_id
    await pool.execute(
        "UPDATE webhook_conversations SET last_message_at = $1 WHERE id = $2", day_ago, adopted
    )
    other = "US.13491208655302741919"
    again, _ = await store.ingest(pool, [replace(late, user_id=other)], [], "c", "")
    assert again[0].duplicate
    assert (
        await pool.fetchval("SELECT customer_id FROM webhook_conversations WHERE id = $1", adopted)
        == other
    )
    assert await pool.fetchval(last, adopted) == day_ago

    # A new message does move it, as ever.
    await store.ingest(
        pool, [inbound("wamid.B2", "15550009999", user_id=bsuid, ts=now - 60)], [], "c", ""
    )
    assert (await pool.fetchval(last, by_bsuid)).timestamp() == now - 60


async def test_a_turn_starts_with_its_stored_state_and_finishes_recording_its_reply(
    pool: asyncpg.Pool,
) -> None:
    """The statement that starts a turn returns what the agent needs (the message, the stored
    reply and its send state, the context, the window's start, the database's clock), and the
    final transition writes the sent reply's id with 'replied' (the furthest status already
    seen for it, else 'sent'); finding nothing more waiting, it releases the conversation in
    the same statement, audited (db/migrations/0020)."""
    now = int(time.time())
    rows, _ = await store.ingest(
        pool, [inbound("wamid.S1", ts=now), inbound("wamid.S2", ts=now + 1)], [], "c", ""
    )
    conv = rows[0].conversation_id
    await pool.execute(
        "INSERT INTO agent_contexts (conversation_id, agent_type, token_count, fence_token,"
        " last_seq) VALUES ($1, 'sales', 3, 0, 2)",
        conv,
    )
    # Read in the order written (db/migrations/0030), whatever the order of the rows.
    await pool.execute(
        "INSERT INTO agent_context_entries (conversation_id, seq, n, messages)"
        " VALUES ($1, 2, 1, $2), ($1, 1, 1, $3)",
        conv,
        '{"role": "assistant", "content": "later"}',
        '{"role": "user", "content": "earlier"}',
    )
    token, first = await store.claim_turn_or_release(pool, conv, "me")
    assert isinstance(first, store.WorkItem) and first.message_id == "wamid.S1"
    assert first.has_state and first.defer_sent_record and not first.has_reply
    assert first.message_type == "text" and first.payload_json == '{"id": "wamid.S1"}'
    assert orjson.loads(first.context_json) == [
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "later"},
    ]
    assert first.context_agent_type == "sales" and not first.send_started
    assert first.last_customer_at == now + 1 and abs(first.db_now - time.time()) < 60

    # A status of the reply that arrived before the turn finished still counts.
    await store.ingest(
        pool,
        [],
        [
            Status(
                message_id="wamid.OUT1",
                phone_number_id="100",
                recipient_id="15550001111",
                status="delivered",
                timestamp=now,
                payload_json="{}",
            )
        ],
        "c",
        "",
    )
    done = await store.finish_turn(
        pool,
        first,
        machine.REPLIED,
        "replied",
        token,
        start_next=True,
        reply_message_id="wamid.OUT1",
        release=True,
    )
    second = done.next
    assert isinstance(second, store.WorkItem) and second.message_id == "wamid.S2"
    row = await pool.fetchrow(
        "SELECT status, reply_message_id, reply_status FROM processed_webhook_messages"
        " WHERE message_id = 'wamid.S1'"
    )
    assert row is not None and tuple(row) == ("replied", "wamid.OUT1", "delivered")

    done = await store.finish_turn(
        pool,
        second,
        machine.REPLIED,
        "replied",
        token,
        start_next=True,
        reply_message_id="wamid.OUT2",
        release=True,
    )
    assert done.next is store.RELEASED
    row = await pool.fetchrow(
        "SELECT status, reply_message_id, reply_status FROM processed_webhook_messages"
        " WHERE message_id = 'wamid.S2'"
    )
    assert row is not None and tuple(row) == ("replied", "wamid.OUT2", "sent")
    conversation = await pool.fetchrow(
        "SELECT status, lock_owner FROM webhook_conversations WHERE id = $1", conv
    )
    assert conversation is not None and tuple(conversation) == ("idle", None)
    moves = await pool.fetch(
        "SELECT from_state, to_state, reason FROM conversation_state_transitions"
        " WHERE entity = 'conversation' ORDER BY id"
    )
    assert [tuple(r) for r in moves] == [
        ("idle", "active", "claimed by me"),
        ("active", "idle", "no waiting messages"),
    ]
    # Claimed again with nothing waiting: released by the same statement.
    _, nothing = await store.claim_turn_or_release(pool, conv, "me")
    assert nothing is store.RELEASED
    assert (
        await pool.fetchval("SELECT status FROM webhook_conversations WHERE id = $1", conv)
        == "idle"
    )


async def test_a_redrive_never_requeues_a_message_whose_turn_is_running(
    pool: asyncpg.Pool,
) -> None:
    """State.Redrive moves only failed or dead-lettered messages: repeated after a timeout,
    or by an operator while the redriven turn runs, it must not queue a second turn."""
    (result,), _ = await store.ingest(pool, [inbound("wamid.RUN")], [], "c", "")
    token = await store.claim_conversation(pool, result.conversation_id, "me")
    item = await store.next_message(pool, result.conversation_id, token)
    assert item is not None and item.message_id == "wamid.RUN"
    with pytest.raises(machine.IllegalTransition):
        await store.transition(
            pool,
            "wamid.RUN",
            machine.RECEIVED,
            "redriven",
            sources=store.REDRIVABLE,
        )
    status = "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.RUN'"
    assert await pool.fetchval(status) == "processing"


async def test_looks_for_waiting_work_made_at_once_share_statements_and_connections(
    pool: asyncpg.Pool,
) -> None:
    """With replicas, many holders look for waiting work at once after their releases: each
    gets its own conversation's answer, and together they take a connection or two of the
    pool, not one each (which grew every replica's pool to its limit in a burst)."""
    msgs = [inbound(f"wamid.L{i}", wa_id=f"1555000{i:04d}") for i in range(40)]
    await store.ingest(pool, msgs, [], "c", "")
    rows = await pool.fetch("SELECT message_id, conversation_id FROM processed_webhook_messages")
    conversation = {r["message_id"]: r["conversation_id"] for r in rows}
    answered = [conversation[f"wamid.L{i}"] for i in range(0, 40, 2)]
    await pool.execute(
        "UPDATE processed_webhook_messages SET status = 'replied'"
        " WHERE conversation_id = ANY ($1::bigint[])",
        answered,
    )
    assert pool.get_size() == 1
    ids = [conversation[f"wamid.L{i}"] for i in range(40)]

    def statements() -> float:
        labels = {"operation": "has_waiting"}
        return REGISTRY.get_sample_value("wa_coalesced_batch_size_count", labels) or 0.0

    before = statements()
    looks = await asyncio.gather(*(store.has_waiting(pool, c) for c in ids))
    assert looks == [c not in answered for c in ids]
    assert statements() - before <= 3
    assert pool.get_size() <= 3
