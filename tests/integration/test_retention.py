"""Retention and erasure against real PostgreSQL and Redis: what a prune pass deletes and
keeps, its batches and dry run, one pass at a time, `forget` of one customer and nothing of
another, its audit row without personal data, and tombstones that keep a forgotten message a
duplicate. Old rows are made by ingesting through the store and moving their clocks back as
the owner."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from common import config, kv, migrate
from common.domain import Message, Status
from services.gateway import parse
from services.state import machine, retention, store
from services.state.locks import Locks
from services.state.settings import StateSettings
from tests.support import payloads
from tests.support.inbound import inbound as support_inbound
from tests.support.servers import Postgres, Redis
from tests.support.upgrades import migrated_before

TABLES = (
    "webhook_conversations",
    "processed_webhook_messages",
    "conversation_state_transitions",
    "agent_reply_parts",
    "webhook_dlq",
    "agent_contexts",
    "agent_context_entries",
    "agent_sessions",
    "operator_replies",
)


def inbound(
    message_id: str, wa_id: str = "", user_id: str = "", kind: str = "text", text: str = "hi"
) -> Message:
    """A message whose stored payload names its customer and words, as Meta's does: what
    erasure must remove."""
    payload = f'{{"id": "{message_id}", "from": "{wa_id}", "text": "{text}"}}'
    return support_inbound(
        message_id,
        wa_id,
        user_id=user_id,
        kind=kind,
        text=text,
        contact_name="Ann Example",
        payload_json=payload,
    )


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    return {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


async def customer(
    pool: asyncpg.Pool,
    prefix: str,
    *,
    wa_id: str = "",
    user_id: str = "",
    n: int = 2,
    status: str = machine.REPLIED,
) -> int:
    """A conversation with `n` text messages moved to `status`, one of them with a long reply
    in two parts and a status webhook, a context, a session, and a person's reply sent to the
    customer (services/agent/operator.sql). Returns its id."""
    msgs = [
        inbound(f"{prefix}.{i}", wa_id=wa_id, user_id=user_id, text=f"secret words {prefix}")
        for i in range(n)
    ]
    results, _ = await store.ingest(pool, msgs, [], f"corr-{prefix}", "")
    conv = results[0].conversation_id
    for m in msgs:
        if status != machine.RECEIVED:
            await store.transition(pool, m.message_id, machine.PROCESSING, "turn")
            await store.transition(pool, m.message_id, status, "done")
    first = msgs[0].message_id
    await pool.execute(
        "UPDATE processed_webhook_messages SET reply_text = 'answer', reply_message_id = $2 "
        "WHERE message_id = $1",
        first,
        f"wamid.REPLY-{prefix}",
    )
    await pool.execute(
        "INSERT INTO agent_reply_parts (message_id, part, body, sent_id) "
        "VALUES ($1, 0, 'part one', $2), ($1, 1, 'part two', $3)",
        first,
        f"wamid.PART0-{prefix}",
        f"wamid.PART1-{prefix}",
    )
    await store.ingest(
        pool,
        [],
        [
            Status(
                message_id=f"wamid.REPLY-{prefix}",
                phone_number_id="100",
                recipient_id=wa_id,
                recipient_user_id=user_id,
                status="delivered",
                timestamp=int(time.time()),
                payload_json="{}",
            )
        ],
        f"corr-{prefix}",
        "",
    )
    await pool.execute(
        "INSERT INTO agent_contexts (conversation_id, agent_type, last_seq) "
        "VALUES ($1, 'concierge', 1)",
        conv,
    )
    await pool.execute(
        "INSERT INTO agent_context_entries (conversation_id, seq, n, messages)"
        " VALUES ($1, 1, 1, $2)",
        conv,
        f'{{"role": "user", "content": "secret words {prefix}"}}',
    )
    await pool.execute(
        "SELECT increment_session_metrics($1, 'concierge', 1, 10, 10, 5, 0, 'x')", conv
    )
    await operator_reply(pool, conv, prefix)
    return conv


async def operator_reply(pool: asyncpg.Pool, conv: int, name: str, days: int = 0) -> None:
    """A person's reply, sent `days` ago as wamid.OP-<name>."""
    await pool.execute(
        "INSERT INTO operator_replies (idempotency_key, conversation_id, phone_number_id, "
        "operator, body, sent_id, send_started_at, sent_at, created_at) "
        "VALUES ($1, $2, '100', 'ann', $3, $4, now() - make_interval(days => $5), "
        "now() - make_interval(days => $5), now() - make_interval(days => $5))",
        f"key-{name}",
        conv,
        f"secret words {name}, from a person",
        f"wamid.OP-{name}",
        days,
    )


async def age(pool: asyncpg.Pool, conv: int, days: int) -> None:
    """Moves everything of a conversation `days` into the past, in one transaction (a prune
    pass running meanwhile sees all of it aged or none)."""
    at = f"now() - interval '{days} days'"
    statements = (
        f"UPDATE processed_webhook_messages SET received_at = {at}, updated_at = {at}, "
        f"finished_at = {at} WHERE conversation_id = $1",
        f"UPDATE conversation_state_transitions SET created_at = {at} WHERE conversation_id = $1",
        f"UPDATE webhook_conversations SET last_activity_at = {at} WHERE id = $1",
        f"UPDATE agent_contexts SET updated_at = {at} WHERE conversation_id = $1",
        f"UPDATE agent_context_entries SET created_at = {at} WHERE conversation_id = $1",
        f"UPDATE agent_sessions SET last_active_at = {at} WHERE conversation_id = $1",
        f"UPDATE webhook_dlq SET created_at = {at}, updated_at = {at} WHERE conversation_id = $1",
        f"UPDATE operator_replies SET created_at = {at}, send_started_at = {at}, sent_at = {at} "
        "WHERE conversation_id = $1",
    )
    async with pool.acquire() as conn, conn.transaction():
        for statement in statements:
            await conn.execute(statement, conv)


async def dlq_item(pool: asyncpg.Pool, message_id: str, conv: int, status: str) -> None:
    await pool.execute(
        "INSERT INTO webhook_dlq (message_id, conversation_id, payload, error_class, status) "
        "VALUES ($1, $2, '{\"text\": \"secret payload\"}', 'ModelHTTP500', $3)",
        message_id,
        conv,
        status,
    )


async def rows_of(pool: asyncpg.Pool, conv: int) -> dict[str, int]:
    q = {
        "webhook_conversations": "SELECT count(*) FROM webhook_conversations WHERE id = $1",
        "processed_webhook_messages": "SELECT count(*) FROM processed_webhook_messages "
        "WHERE conversation_id = $1",
        "conversation_state_transitions": "SELECT count(*) FROM conversation_state_transitions "
        "WHERE conversation_id = $1",
        "agent_reply_parts": "SELECT count(*) FROM agent_reply_parts p "
        "JOIN processed_webhook_messages m USING (message_id) WHERE m.conversation_id = $1",
        "webhook_dlq": "SELECT count(*) FROM webhook_dlq WHERE conversation_id = $1",
        "agent_contexts": "SELECT count(*) FROM agent_contexts WHERE conversation_id = $1",
        "agent_context_entries": "SELECT count(*) FROM agent_context_entries"
        " WHERE conversation_id = $1",
        "agent_sessions": "SELECT count(*) FROM agent_sessions WHERE conversation_id = $1",
        "operator_replies": "SELECT count(*) FROM operator_replies WHERE conversation_id = $1",
    }
    return {t: await pool.fetchval(sql, conv) for t, sql in q.items()}


async def test_prune_deletes_old_finished_work_and_keeps_what_is_still_needed(
    pool: asyncpg.Pool,
) -> None:
    # Old and finished: replied texts, a skipped reaction, a dead-lettered message whose item
    # was purged. Everything of it goes, the conversation too.
    old = await customer(pool, "old", wa_id="15550000001", n=3)
    reaction = inbound("old.img", wa_id="15550000001", kind="reaction")
    await store.ingest(pool, [reaction], [], "c", "")
    dead_done = inbound("old.dl", wa_id="15550000001")
    await store.ingest(pool, [dead_done], [], "c", "")
    for to in (machine.PROCESSING, machine.FAILED, machine.DEAD_LETTERED):
        await store.transition(pool, dead_done.message_id, to, "x")
    await dlq_item(pool, dead_done.message_id, old, "purged")
    await age(pool, old, 100)
    # Old, but an operator may still redrive its dead item, and another message waits.
    needed = await customer(pool, "needed", wa_id="15550000002", n=1)
    dead = inbound("needed.dl", wa_id="15550000002")
    waiting = inbound("needed.wait", wa_id="15550000002")
    await store.ingest(pool, [dead, waiting], [], "c", "")
    for to in (machine.PROCESSING, machine.FAILED, machine.DEAD_LETTERED):
        await store.transition(pool, dead.message_id, to, "x")
    await dlq_item(pool, dead.message_id, needed, "dead")
    await age(pool, needed, 100)
    # Finished, but recent.
    recent = await customer(pool, "recent", wa_id="15550000003", n=2)
    await age(pool, recent, 80)
    # Old and finished, but the customer stopped marketing messages: the opt-out stays.
    stop = await customer(pool, "stop", wa_id="15550000004", n=1)
    await pool.execute(
        "UPDATE webhook_conversations SET marketing_preference = 'stop' WHERE id = $1", stop
    )
    await age(pool, stop, 100)
    before = {c: await rows_of(pool, c) for c in (old, needed, recent, stop)}

    dry = await retention.prune(pool, 90, 500, dry_run=True, requested_by="test")
    assert {c: await rows_of(pool, c) for c in (old, needed, recent, stop)} == before
    assert await pool.fetchval("SELECT count(*) FROM wa_erasure_audit") == 0

    out = await retention.prune(pool, 90, 500, requested_by="test")
    assert out.counts == dry.counts, "the dry run counted what the pass deleted"
    assert await rows_of(pool, old) == dict.fromkeys(before[old], 0)
    assert await rows_of(pool, recent) == before[recent]
    kept = await rows_of(pool, needed)
    # The dead-lettered message with its open item and the waiting one, with their
    # transitions; the replied message, its parts and the context of a conversation with
    # work in flight... the context stays (the conversation is not idle).
    assert kept["webhook_dlq"] == 1 and kept["webhook_conversations"] == 1
    assert set(
        await pool.fetchval(
            "SELECT array_agg(message_id) FROM processed_webhook_messages "
            "WHERE conversation_id = $1",
            needed,
        )
    ) == {"needed.dl", "needed.wait"}
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM conversation_state_transitions WHERE message_id = 'needed.dl'"
        )
        == 4
    )
    assert kept["agent_contexts"] == 1 and kept["agent_sessions"] == 1
    # A person's reply older than the retention goes, although its conversation stays.
    assert kept["operator_replies"] == 0
    assert await rows_of(pool, stop) == {
        **dict.fromkeys(before[stop], 0),
        "webhook_conversations": 1,
    }
    # What the opt-out is about stays; the customer's name goes.
    kept_for_opt_out = await pool.fetchrow(
        "SELECT wa_id, marketing_preference, contact_name, username"
        " FROM webhook_conversations WHERE id = $1",
        stop,
    )
    assert kept_for_opt_out is not None
    assert tuple(kept_for_opt_out) == ("15550000004", "stop", None, None)
    assert out.counts["webhook_conversations.contact_name"] == 1
    # A name cleared is no row deleted: the pass reports it apart.
    assert (out.total, out.cleared) == (
        sum(out.counts.values()) - 1,
        1,
    )
    # The status webhook of the old reply went too (it names the customer's number).
    assert not await pool.fetchval(
        "SELECT count(*) FROM processed_webhook_messages WHERE wa_id = '15550000001'"
    )
    assert out.counts["processed_webhook_messages"] == 6 + 2 + 2  # with the status webhooks
    # Reported as deleted, not left to a cascade: the old, needed and stop conversations'
    # replies of a person, and their contexts' entries (the needed one's by age: its
    # conversation goes on).
    assert out.counts["operator_replies"] == 3
    assert out.counts["agent_context_entries"] == 3
    assert kept["agent_context_entries"] == 0
    audit = await pool.fetchrow("SELECT kind, counts::text, requested_by FROM wa_erasure_audit")
    assert audit is not None
    assert audit["kind"] == "prune" and audit["requested_by"] == "test"
    again = await retention.prune(pool, 90, 500, requested_by="test")
    assert again.total == 0 and again.batches == 1


async def test_prune_keeps_a_quiet_conversation_while_a_persons_recent_reply_is_in_it(
    pool: asyncpg.Pool,
) -> None:
    conv = await customer(pool, "quiet", wa_id="15550000006", n=1)
    await age(pool, conv, 100)
    await operator_reply(pool, conv, "quiet-late", days=1)
    dry = await retention.prune(pool, 90, 500, dry_run=True, requested_by="test")
    out = await retention.prune(pool, 90, 500, requested_by="test")
    assert out.counts == dry.counts
    assert out.counts["operator_replies"] == 1 and out.counts["webhook_conversations"] == 0
    left = await rows_of(pool, conv)
    assert left["webhook_conversations"] == 1 and left["operator_replies"] == 1
    assert left["processed_webhook_messages"] == 0
    # Once that reply is old too, the conversation goes with it.
    await pool.execute(
        "UPDATE operator_replies SET created_at = created_at - interval '100 days', "
        "sent_at = sent_at - interval '100 days' WHERE conversation_id = $1",
        conv,
    )
    out = await retention.prune(pool, 90, 500, requested_by="test")
    assert out.counts["operator_replies"] == 1 and out.counts["webhook_conversations"] == 1
    assert await rows_of(pool, conv) == dict.fromkeys(left, 0)


async def test_prune_takes_the_old_part_of_the_context_of_a_conversation_that_goes_on(
    pool: asyncpg.Pool,
) -> None:
    """A customer who writes every few weeks: the entries begun more than a day before the
    cutoff go, the rest is read as the context, and the conversation goes on."""
    conv = await customer(pool, "steady", wa_id="15550000007", n=1)
    await pool.execute(
        "INSERT INTO agent_context_entries (conversation_id, seq, n, messages, created_at)"
        " VALUES ($1, 2, 1, $2, now() - interval '89 days'),"
        " ($1, 3, 1, $3, now() - interval '10 days')",
        conv,
        '{"role": "user", "content": "a day before the cutoff, maybe"}',
        '{"role": "user", "content": "ten days ago"}',
    )
    await pool.execute(
        "UPDATE agent_context_entries SET created_at = now() - interval '120 days'"
        " WHERE conversation_id = $1 AND seq = 1",
        conv,
    )
    await pool.execute("UPDATE agent_contexts SET last_seq = 3 WHERE conversation_id = $1", conv)
    dry = await retention.prune(pool, 90, 500, dry_run=True, requested_by="test")
    out = await retention.prune(pool, 90, 500, requested_by="test")
    assert out.counts == dry.counts
    assert out.counts["agent_context_entries"] == 1
    context = await pool.fetchval("SELECT (SELECT c FROM wa_context($1) c)", conv)
    assert [m["content"] for m in orjson.loads(context)] == [
        "a day before the cutoff, maybe",
        "ten days ago",
    ]
    assert (await rows_of(pool, conv))["webhook_conversations"] == 1


async def test_prune_goes_in_small_batches_until_nothing_is_left(pool: asyncpg.Pool) -> None:
    conv = await customer(pool, "many", wa_id="15550000005", n=5)
    await age(pool, conv, 100)
    out = await retention.prune(pool, 90, 2, requested_by="test")
    # 5 messages 2 at a time (3 batches), the conversation once they are gone, a last empty
    # look: each batch its own statement and transaction.
    assert out.batches >= 5
    assert out.counts["processed_webhook_messages"] == 5 + 1  # and the status webhook
    assert out.counts["webhook_conversations"] == 1
    assert await counts(pool) == dict.fromkeys(TABLES, 0)


async def test_retention_below_meta_retry_window_is_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match="at least 8"):
        await pool.fetch("SELECT * FROM wa_prune(7, 500, false)")
    for days in ("7", "0", "-1"):
        with pytest.raises(config.ConfigError, match="RETENTION_DAYS: must be at least 8"):
            StateSettings.from_env({"RETENTION_DAYS": days})
    assert StateSettings.from_env({}).retention_days == 90


async def test_one_prune_pass_at_a_time(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as other:
        await other.execute("SELECT pg_advisory_lock($1)", retention.PRUNE_LOCK_KEY)
        with pytest.raises(retention.PruneBusy):
            await retention.prune(pool, 90, 500, requested_by="test")
        await other.execute("SELECT pg_advisory_unlock($1)", retention.PRUNE_LOCK_KEY)
    assert (await retention.prune(pool, 90, 500, requested_by="test")).total == 0


@pytest.fixture
async def locks(redis_server: Redis, redis_prefix: str) -> AsyncIterator[Locks]:
    client = kv.create_client(redis_server.url)
    yield Locks(client, 30, prefix=redis_prefix)
    await client.aclose()


async def test_forget_erases_one_customer_everywhere_and_keeps_a_duplicate_guard(
    pool: asyncpg.Pool, locks: Locks
) -> None:
    phone, bsuid = "15550000011", "US.13491208655302741918"
    gone = await customer(pool, "gone", wa_id=phone, user_id=bsuid, n=2)
    await dlq_item(pool, "gone.1", gone, "dead")
    other = await customer(pool, "other", wa_id="15550000012", n=2)
    before_other = await rows_of(pool, other)

    erased = await retention.forget(pool, locks, phone, requested_by="operator")
    assert erased == {
        "webhook_conversations": 1,
        "processed_webhook_messages": 3,  # two messages and a status webhook
        "conversation_state_transitions": 2 * 3,
        "agent_reply_parts": 2,
        "webhook_dlq": 1,
        "agent_contexts": 1,
        "agent_context_entries": 1,
        "agent_sessions": 1,
        "operator_replies": 1,
        "webhook_conversation_aliases": 0,
        # messages, the reply, its parts, the person's reply
        "wa_message_tombstones": 2 + 1 + 2 + 1,
    }
    assert await rows_of(pool, gone) == dict.fromkeys(before_other, 0)
    assert await rows_of(pool, other) == before_other
    for value in (phone, bsuid, "secret words gone", "secret payload"):
        for table in (*TABLES, "wa_erasure_audit", "wa_message_tombstones"):
            assert not await pool.fetchval(
                f"SELECT count(*) FROM {table} x WHERE x::text LIKE '%' || $1 || '%'", value
            ), f"{value!r} still in {table}"
    audit = await pool.fetchrow("SELECT *, a::text AS line FROM wa_erasure_audit a")
    assert audit is not None
    assert audit["kind"] == "forget" and audit["requested_by"] == "operator"
    assert audit["counts"]["processed_webhook_messages"] == 3
    phone_digest = hashlib.sha256(phone.encode()).hexdigest()
    for value in (phone, bsuid, "secret words", "Ann Example", phone_digest, "gone."):
        assert value not in audit["line"]

    # Meta delivers the erased message again (within its retry window), and late statuses of
    # the erased reply and of the person's: duplicates, nothing stored again (a status names
    # its recipient's number).
    again, stored = await store.ingest(
        pool,
        [inbound("gone.0", wa_id=phone, user_id=bsuid)],
        [
            Status(
                message_id=reply,
                phone_number_id="100",
                recipient_id=phone,
                status="read",
                timestamp=int(time.time()),
                payload_json="{}",
            )
            for reply in ("wamid.REPLY-gone", "wamid.OP-gone")
        ],
        "c",
        "",
    )
    assert [(r.duplicate, r.status) for r in again] == [(True, "")] and stored == 0
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM webhook_conversations WHERE wa_id = $1 OR user_id = $2",
            phone,
            bsuid,
        )
        == 0
    )
    # A new message of the same customer is new data: stored and answered as usual.
    fresh, _ = await store.ingest(pool, [inbound("gone.new", wa_id=phone)], [], "c", "")
    assert fresh[0].status == machine.RECEIVED


async def test_forget_by_bsuid_finds_a_customer_without_a_phone_number(
    pool: asyncpg.Pool, locks: Locks
) -> None:
    bsuid = "US.99991208655302741918"
    conv = await customer(pool, "user", user_id=bsuid, n=1)
    erased = await retention.forget(pool, locks, bsuid, requested_by="operator")
    assert erased["webhook_conversations"] == 1 and erased["processed_webhook_messages"] == 2
    assert await rows_of(pool, conv) == dict.fromkeys(TABLES, 0)
    nothing = await retention.forget(pool, locks, bsuid, requested_by="operator")
    assert sum(v for k, v in nothing.items()) == 0
    assert await pool.fetchval("SELECT count(*) FROM wa_erasure_audit WHERE kind = 'forget'") == 2


async def changed_number(pool: asyncpg.Pool, old: str, new: str, new_phone: str) -> None:
    """Meta's system message: the customer's number changed, so did their BSUID."""
    system = payloads.message(
        "system",
        wa_id=new_phone,
        user_id=old,
        system={
            "body": f"User changed to {new_phone}",
            "type": "user_changed_number",
            "wa_id": new_phone,
            "user_id": new,
            "previous_user_id": old,
        },
    )
    doc = payloads.delivery(messages=[system])
    doc["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "100"  # customer()'s
    delivery = parse.parse(orjson.dumps(doc))
    await store.ingest_many(pool, [store.DeliveryIn([], [], "c", "", delivery.events)])


async def test_forget_finds_a_customer_by_the_number_and_bsuid_they_had_before(
    pool: asyncpg.Pool, locks: Locks
) -> None:
    """A changed number moves the conversation to the new number and BSUID; forgetting the
    old ones still erases it, with the messages sent under them (db/migrations/0031)."""
    old_phone, old, new = "15550000031", payloads.bsuid("gil-old"), payloads.bsuid("gil-new")
    conv = await customer(pool, "gil", wa_id=old_phone, user_id=old, n=2)
    await changed_number(pool, old, new, "15550000032")
    # A status about a reply on another business number, where the customer has no
    # conversation: a row of its own, naming their new number.
    await store.ingest(
        pool,
        [],
        [
            Status(
                message_id="wamid.ELSEWHERE-gil",
                phone_number_id="999",
                recipient_id="15550000032",
                status="read",
                timestamp=int(time.time()),
                payload_json="{}",
            )
        ],
        "c",
        "",
    )
    assert await pool.fetchval(
        "SELECT wa_id = '15550000032' AND user_id = $2 FROM webhook_conversations WHERE id = $1",
        conv,
        new,
    )
    erased = await retention.forget(pool, locks, old_phone, requested_by="operator")
    assert erased["webhook_conversations"] == 1
    # with the status, the event, and the status on the other number
    assert erased["processed_webhook_messages"] == 2 + 1 + 1 + 1
    assert erased["webhook_conversation_aliases"] >= 2
    assert await rows_of(pool, conv) == dict.fromkeys(await rows_of(pool, conv), 0)
    for value in (old_phone, "15550000032", old, new, "secret words gil"):
        for table in (*TABLES, "webhook_conversation_aliases"):
            assert not await pool.fetchval(
                f"SELECT count(*) FROM {table} x WHERE x::text LIKE '%' || $1 || '%'", value
            ), f"{value!r} still in {table}"


async def test_forget_finds_the_conversation_a_changed_bsuid_left_behind(
    pool: asyncpg.Pool, locks: Locks
) -> None:
    """The new BSUID had written first, so the old BSUID's conversation is left as it was
    (not merged); forgetting the customer by the new BSUID or number erases both."""
    old, new = payloads.bsuid("hal-old"), payloads.bsuid("hal-new")
    before = await customer(pool, "hal-before", user_id=old, n=1)
    after = await customer(pool, "hal-after", user_id=new, n=1)
    await changed_number(pool, old, new, "15550000042")
    assert (
        await pool.fetchval("SELECT user_id FROM webhook_conversations WHERE id = $1", before)
        == old
    )
    erased = await retention.forget(pool, locks, new, requested_by="operator")
    assert erased["webhook_conversations"] == 2
    for conv in (before, after):
        assert await rows_of(pool, conv) == dict.fromkeys(await rows_of(pool, conv), 0)
    assert not await pool.fetchval("SELECT count(*) FROM webhook_conversation_aliases")


async def test_an_upgrade_keeps_the_earlier_identifiers_a_conversation_knew(
    pg: Postgres, tmp_path: Path
) -> None:
    """Conversations moved by a BSUID change before 0031 get their earlier identifiers from
    their messages, so that `wa forget` of the old number finds them after the upgrade."""
    dsn = await migrated_before(pg, tmp_path / "before", "0031")
    conn = await asyncpg.connect(dsn)
    try:
        conv = await conn.fetchval(
            "INSERT INTO webhook_conversations (phone_number_id, customer_id, wa_id, user_id)"
            " VALUES ('100', 'US.new', '15550000052', 'US.new') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO processed_webhook_messages (message_id, conversation_id,"
            " phone_number_id, wa_id, user_id, kind, message_type, body, status, wa_timestamp,"
            " payload, correlation_id)"
            " VALUES ('wamid.h1', $1, '100', '15550000051', 'US.old', 'message', 'text',"
            " 'secret', 'replied', now(), '{}', 'c'),"
            " ('wamid.h2', $1, '100', '15550000052', 'US.new', 'message', 'text',"
            " 'again', 'replied', now(), '{}', 'c')",
            conv,
        )
        await migrate.migrate(dsn)
        aliases = await conn.fetch(
            "SELECT alias, conversation_id FROM webhook_conversation_aliases ORDER BY alias"
        )
        assert [tuple(a) for a in aliases] == [("15550000051", conv), ("US.old", conv)]
    finally:
        await conn.close()


async def test_forget_waits_for_a_turn_in_flight_then_refuses(
    pool: asyncpg.Pool, locks: Locks
) -> None:
    conv = await customer(pool, "busy", wa_id="15550000021", n=1, status=machine.RECEIVED)
    before = await rows_of(pool, conv)
    lease = await locks.acquire(conv)
    assert lease is not None
    with pytest.raises(retention.ConversationBusy, match="try again"):
        await retention.forget(pool, locks, "15550000021", requested_by="op", wait_seconds=0.3)
    assert await rows_of(pool, conv) == before
    assert await pool.fetchval("SELECT count(*) FROM wa_erasure_audit") == 0
    await locks.release(lease)
    erased = await retention.forget(pool, locks, "15550000021", requested_by="op")
    assert erased["processed_webhook_messages"] == 2
    # Its lease, the conversation's only Redis key, is gone with it.
    assert await locks.holder(conv) is None


async def test_only_a_role_granted_execute_may_prune_or_forget(pool: asyncpg.Pool) -> None:
    role = f"wa_test_{uuid.uuid4().hex[:10]}"
    await pool.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        for call in (
            "SELECT * FROM wa_prune(90, 500, true)",
            "SELECT wa_record_prune('{}'::jsonb, 'x')",
            "SELECT * FROM wa_forget_customer('15550000001', 'x')",
        ):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetch(call)
        await pool.execute(
            f"GRANT EXECUTE ON FUNCTION wa_prune(integer, integer, boolean) TO {role}"
        )
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            # It runs as its owner: the caller needs no privilege on the tables themselves.
            assert len(await conn.fetch("SELECT * FROM wa_prune(90, 500, true)")) == 12
    finally:
        await pool.execute(f"DROP OWNED BY {role}")
        await pool.execute(f"DROP ROLE {role}")


async def test_a_driver_notified_for_an_erased_conversation_ends_without_retrying(
    pool: asyncpg.Pool, locks: Locks, caplog: pytest.LogCaptureFixture
) -> None:
    from services.state.dispatcher import Dispatcher
    from tests.integration.test_dispatcher import Agent, Dlq

    conv = await customer(pool, "erased", wa_id="15550000031", n=1)
    await retention.forget(pool, locks, "15550000031", requested_by="op")
    dispatcher = Dispatcher(pool, locks, Agent(expect=1), Dlq())
    try:
        dispatcher.notify(conv)  # e.g. a retry timer or the sweeper, from before the erasure
        for _ in range(100):
            if not dispatcher.driving(conv):
                break
            await asyncio.sleep(0.05)
        assert not dispatcher.driving(conv)
        assert not [r for r in caplog.records if "will retry" in r.getMessage()]
    finally:
        await dispatcher.close()


async def test_an_upgrade_takes_the_texts_of_replies_out_of_the_console_trail(
    pg: Postgres, tmp_path: Path
) -> None:
    """The console recorded a person's reply with its text (detail.text), and every detail as
    a JSON string, until 0031; the upgrade keeps every line of the trail and what else it
    says, as objects, not the texts."""
    dsn = await migrated_before(pg, tmp_path / "before", "0031")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO wa_console_audit (operator, action, target, detail) VALUES "
            "('ada', 'reply', 'conversation 1', to_jsonb($1::text)), "
            "('ada', 'dlq retry', '2 item(s)', to_jsonb($2::text)), ('ada', 'login', 'ada', '{}')",
            # As the console stored them: each object's JSON text, as a JSON string.
            '{"text": "secret words for Ann"}',
            '{"ids": [1, 2]}',
        )
        await migrate.migrate(dsn)
        rows = await conn.fetch(
            "SELECT action, target, detail::text AS detail FROM wa_console_audit ORDER BY id"
        )
        assert [tuple(r) for r in rows] == [
            ("reply", "conversation 1", "{}"),
            ("dlq retry", "2 item(s)", '{"ids": [1, 2]}'),
            ("login", "ada", "{}"),
        ]
    finally:
        await conn.close()
