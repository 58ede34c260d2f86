"""Customers known by a business-scoped user id (BSUID), a phone number, or both over time:
one conversation each, whatever Meta sends, and conversations from before BSUIDs kept."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import asyncpg
import orjson

from common import migrate
from common.domain import Event, Message, Status
from services.gateway import parse
from services.state import machine, store
from tests.support import payloads
from tests.support.inbound import inbound as support_inbound
from tests.support.servers import Postgres
from tests.support.upgrades import migrated_before

PHONE = "15550001111"


# Stored payloads are "{}" here: what these tests look at is in the columns.
inbound = functools.partial(support_inbound, wa_id=PHONE, payload_json="{}")


async def ingest(pool: asyncpg.Pool, *messages: Message) -> list[store.Ingested]:
    results, _ = await store.ingest(pool, list(messages), [], "cid", "")
    return results


async def conversation(pool: asyncpg.Pool, conversation_id: int) -> dict[str, object]:
    row = await pool.fetchrow(
        "SELECT customer_id, wa_id, user_id, username, message_count,"
        " marketing_preference FROM webhook_conversations WHERE id = $1",
        conversation_id,
    )
    assert row is not None
    return dict(row)


async def test_a_customer_seen_by_phone_then_bsuid_then_bsuid_alone_is_one_conversation(
    pool: asyncpg.Pool,
) -> None:
    user = payloads.bsuid("ann")
    (first,) = await ingest(pool, inbound("wamid.1"))
    (both,) = await ingest(pool, inbound("wamid.2", user_id=user, username="ann.b"))
    (alone,) = await ingest(pool, inbound("wamid.3", wa_id="", user_id=user))
    assert first.conversation_id == both.conversation_id == alone.conversation_id
    assert await conversation(pool, first.conversation_id) == {
        "customer_id": user,
        "wa_id": PHONE,  # kept when a delivery no longer names it
        "user_id": user,
        "username": "ann.b",
        "message_count": 3,
        "marketing_preference": None,
    }
    assert await pool.fetchval("SELECT count(*) FROM webhook_conversations") == 1


async def test_a_customer_without_a_phone_number_gets_a_conversation_of_its_own(
    pool: asyncpg.Pool,
) -> None:
    ann, bob = payloads.bsuid("ann"), payloads.bsuid("bob")
    (a,) = await ingest(pool, inbound("wamid.A", wa_id="", user_id=ann, username="same"))
    # A username is never a key: someone else may take it, and is someone else.
    (b,) = await ingest(pool, inbound("wamid.B", wa_id="", user_id=bob, username="same"))
    assert a.status == b.status == "received"
    assert a.conversation_id != b.conversation_id
    assert (await conversation(pool, a.conversation_id))["wa_id"] is None
    # The username changes; the conversation stays.
    (again,) = await ingest(pool, inbound("wamid.A2", wa_id="", user_id=ann, username="ann.new"))
    assert again.conversation_id == a.conversation_id
    assert (await conversation(pool, a.conversation_id))["username"] == "ann.new"


async def test_phone_and_bsuid_in_one_batch_with_the_phone_known_before(
    pool: asyncpg.Pool,
) -> None:
    user = payloads.bsuid("carol")
    (old,) = await ingest(pool, inbound("wamid.old"))
    results = await ingest(
        pool,
        inbound("wamid.x", user_id=user),
        inbound("wamid.y", wa_id="", user_id=user),
        inbound("wamid.z", user_id=user),
    )
    assert {r.conversation_id for r in results} == {old.conversation_id}
    assert [r.duplicate for r in results] == [False, False, False]


def _events(doc: dict[str, object]) -> list[Event]:
    return _events_of(parse.parse(orjson.dumps(doc)))


def _events_of(delivery: parse.Delivery) -> list[Event]:
    return delivery.events


def _change(field: str, entries: list[dict[str, object]]) -> dict[str, object]:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "1", "phone_number_id": "100"},
        field: entries,
    }
    return {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
        {"field": field, "value": value}
    ]}]}  # fmt: skip


async def test_a_changed_bsuid_keeps_the_conversation_and_preferences_are_recorded(
    pool: asyncpg.Pool,
) -> None:
    old, new = payloads.bsuid("dan-old"), payloads.bsuid("dan-new")
    (first,) = await ingest(pool, inbound("wamid.d1", wa_id="", user_id=old))
    update = _change(
        "user_id_update",
        [
            {
                "detail": "User id for Dan has been updated.",
                "user_id": {"previous": old, "current": new},
                "timestamp": str(int(time.time())),
            }
        ],
    )
    events = _events(update)
    out = await store.ingest_many(pool, [store.DeliveryIn([], [], "c", "", events)])
    assert out[0].events_stored == 1
    # Meta's retry of the same delivery: a duplicate, not applied twice.
    again = await store.ingest_many(pool, [store.DeliveryIn([], [], "c", "", _events(update))])
    assert again[0].events_stored == 0
    (later,) = await ingest(pool, inbound("wamid.d2", wa_id="", user_id=new))
    assert later.conversation_id == first.conversation_id
    assert (await conversation(pool, first.conversation_id))["customer_id"] == new

    stop = _change(
        "user_preferences",
        [
            {
                "user_id": new,
                "detail": "User requested to stop marketing messages",
                "category": "marketing_messages",
                "value": "stop",
                "timestamp": int(time.time()),
            }
        ],
    )
    await store.ingest_many(pool, [store.DeliveryIn([], [], "c", "", _events(stop))])
    older_resume = _change(
        "user_preferences",
        [
            {
                "user_id": new,
                "category": "marketing_messages",
                "value": "resume",
                "timestamp": int(time.time()) - 3600,
            }
        ],
    )
    await store.ingest_many(pool, [store.DeliveryIn([], [], "c", "", _events(older_resume))])
    assert (await conversation(pool, first.conversation_id))["marketing_preference"] == "stop"
    kinds = await pool.fetch(
        "SELECT message_type, status, status_reason FROM processed_webhook_messages"
        " WHERE kind = 'event' ORDER BY id"
    )
    assert [(k["message_type"], k["status"]) for k in kinds] == [
        ("user_id_update", "skipped"),
        ("user_preferences", "skipped"),
        ("user_preferences", "skipped"),
    ]


async def test_a_system_message_about_a_changed_number_moves_the_conversation_along(
    pool: asyncpg.Pool,
) -> None:
    old, new = payloads.bsuid("eve-old"), payloads.bsuid("eve-new")
    (first,) = await ingest(pool, inbound("wamid.e1", user_id=old))
    system = payloads.message(
        "system",
        wa_id=PHONE,
        user_id=old,
        system={
            "body": "User Eve changed from 15550001111 to 15550003333",
            "type": "user_changed_number",
            "wa_id": "15550003333",
            "user_id": new,
            "previous_user_id": old,
        },
    )
    delivery = parse.parse(orjson.dumps(payloads.delivery(messages=[system])))
    (event,) = delivery.events
    assert (event.previous_user_id, event.user_id, event.wa_id) == (old, new, "15550003333")
    await store.ingest_many(pool, [store.DeliveryIn([], [], "c", "", _events_of(delivery))])
    (later,) = await ingest(pool, inbound("wamid.e2", wa_id="15550003333", user_id=new))
    assert later.conversation_id == first.conversation_id
    assert (await conversation(pool, first.conversation_id))["wa_id"] == "15550003333"


async def test_the_number_change_message_itself_leaves_the_new_number_in_place(
    pool: asyncpg.Pool,
) -> None:
    """Stored with its event, as the gateway hands them over: sent from the old number, the
    message must not give the conversation back the number the change took from it."""
    pnid = payloads.PHONE_NUMBER_ID
    old, new = payloads.bsuid("ida-old"), payloads.bsuid("ida-new")
    (first,) = await ingest(
        pool, inbound("wamid.j1", wa_id="15550001212", user_id=old, phone_number_id=pnid)
    )
    delivery = _number_change(
        "15550001212",
        "15550003434",
        user_id=new,
        previous_user_id=old,
        parent_user_id="US.PARENT.NEW",
        previous_parent_user_id="US.PARENT.OLD",
    )
    (system,) = await _store(pool, delivery)
    assert system.conversation_id == first.conversation_id
    after = await conversation(pool, first.conversation_id)
    assert (after["customer_id"], after["wa_id"]) == (new, "15550003434")
    parent = await pool.fetchval(
        "SELECT parent_user_id FROM webhook_conversations WHERE id = $1", first.conversation_id
    )
    assert parent == "US.PARENT.NEW"


def _number_change(old_phone: str, new_phone: str, **bsuids: str) -> parse.Delivery:
    """A customer's `user_changed_number` system message, as Meta sends it from the old number:
    with the new and previous BSUIDs (`user_id`, `previous_user_id`) when given, else in the
    shape from before BSUIDs (`new_wa_id` in releases before Graph API v12)."""
    key = "wa_id" if bsuids else "new_wa_id"
    sender = {}  # sent as the customer was known: its previous parent BSUID, if any
    if "previous_parent_user_id" in bsuids:
        sender["from_parent_user_id"] = bsuids["previous_parent_user_id"]
    system = payloads.message(
        "system",
        wa_id=old_phone,
        **sender,
        system={
            "body": f"User Gus changed from {old_phone} to {new_phone}",
            "type": "user_changed_number",
            key: new_phone,
            **bsuids,
        },
    )
    return parse.parse(orjson.dumps(payloads.delivery(messages=[system])))


async def _store(pool: asyncpg.Pool, delivery: parse.Delivery) -> list[store.Ingested]:
    (out,) = await store.ingest_many(
        pool, [store.DeliveryIn(delivery.messages, [], "c", "", delivery.events)]
    )
    return out.results


async def test_a_number_change_without_bsuids_keeps_the_conversation_under_the_new_number(
    pool: asyncpg.Pool,
) -> None:
    """Meta's shape before BSUIDs: only the numbers. The conversation (and its context) is the
    new number's; the old number gets no reply any more, and `wa forget` still finds it."""
    pnid = payloads.PHONE_NUMBER_ID
    (first,) = await ingest(pool, inbound("wamid.g1", wa_id="15550004444", phone_number_id=pnid))
    delivery = _number_change("15550004444", "15550005555")
    (event,) = delivery.events
    assert (event.previous_wa_id, event.wa_id, event.user_id) == ("15550004444", "15550005555", "")
    (system,) = await _store(pool, delivery)
    assert system.conversation_id == first.conversation_id
    after = await conversation(pool, first.conversation_id)
    assert (after["customer_id"], after["wa_id"], after["user_id"]) == (
        "15550005555",
        "15550005555",
        None,
    )
    (later,) = await ingest(pool, inbound("wamid.g2", wa_id="15550005555", phone_number_id=pnid))
    assert later.conversation_id == first.conversation_id
    assert await pool.fetchval("SELECT count(*) FROM webhook_conversations") == 1
    reason = await pool.fetchval(
        "SELECT status_reason FROM processed_webhook_messages WHERE kind = 'event'"
    )
    assert reason == "customer event: phone number 15550004444 is now 15550005555"
    aliases = await pool.fetch(
        "SELECT alias FROM webhook_conversation_aliases WHERE conversation_id = $1",
        first.conversation_id,
    )
    assert "15550004444" in {a["alias"] for a in aliases}


async def test_a_number_change_moves_a_conversation_known_by_its_number_alone_to_the_new_bsuid(
    pool: asyncpg.Pool,
) -> None:
    """A customer who wrote only before BSUIDs (its conversation keyed by its number) changes
    its number; Meta's message names both BSUIDs, neither of which the conversation knows."""
    pnid = payloads.PHONE_NUMBER_ID
    old, new = payloads.bsuid("gus-old"), payloads.bsuid("gus-new")
    (first,) = await ingest(pool, inbound("wamid.h1", wa_id="15550006666", phone_number_id=pnid))
    delivery = _number_change("15550006666", "15550007777", user_id=new, previous_user_id=old)
    (system,) = await _store(pool, delivery)
    assert system.conversation_id == first.conversation_id
    after = await conversation(pool, first.conversation_id)
    assert (after["customer_id"], after["wa_id"], after["user_id"]) == (new, "15550007777", new)
    # The change is in that conversation's timeline.
    assert (
        await pool.fetchval(
            "SELECT conversation_id FROM processed_webhook_messages WHERE kind = 'event'"
        )
        == first.conversation_id
    )
    (later,) = await ingest(pool, inbound("wamid.h2", wa_id="", user_id=new, phone_number_id=pnid))
    assert later.conversation_id == first.conversation_id


async def test_a_number_change_prefers_the_bsuids_conversation_to_the_old_numbers(
    pool: asyncpg.Pool,
) -> None:
    """Both exist (the customer wrote by number before BSUIDs, then without sharing its
    number): the BSUID's conversation takes the new key, the other stays as it was, and the
    delivery is stored (two rows taking one key would fail it at every retry)."""
    pnid = payloads.PHONE_NUMBER_ID
    old, new = payloads.bsuid("hal-old"), payloads.bsuid("hal-new")
    (by_phone,) = await ingest(pool, inbound("wamid.i1", wa_id="15550008888", phone_number_id=pnid))
    (by_user,) = await ingest(
        pool, inbound("wamid.i2", wa_id="", user_id=old, phone_number_id=pnid)
    )
    assert by_phone.conversation_id != by_user.conversation_id
    delivery = _number_change("15550008888", "15550009999", user_id=new, previous_user_id=old)
    (system,) = await _store(pool, delivery)
    assert system.conversation_id == by_user.conversation_id
    assert (await conversation(pool, by_user.conversation_id))["customer_id"] == new
    await _the_old_number_is_no_ones(pool, by_phone.conversation_id, "15550008888")


async def _the_old_number_is_no_ones(pool: asyncpg.Pool, conversation_id: int, old: str) -> None:
    """The conversation left under the old number keeps its history, not the number: carriers
    give numbers out again, and the next owner's first message must start a conversation of its
    own. `wa forget` of the old number still finds it (an alias)."""
    left = await conversation(pool, conversation_id)
    assert left["wa_id"] is None and left["customer_id"] == f"number-changed:{conversation_id}"
    pnid = payloads.PHONE_NUMBER_ID
    (stranger,) = await ingest(pool, inbound(f"wamid.next-{old}", wa_id=old, phone_number_id=pnid))
    assert stranger.conversation_id != conversation_id
    assert (
        await pool.fetchval(
            "SELECT conversation_id FROM webhook_conversation_aliases WHERE alias = $1", old
        )
        == conversation_id
    )


async def test_a_number_change_to_a_number_that_already_wrote_leaves_the_old_number_behind(
    pool: asyncpg.Pool,
) -> None:
    """The customer wrote from the new number before Meta's message about the change came (it
    started a conversation of its own there): the two are not merged, and the old number's
    conversation no longer answers to the old number."""
    pnid = payloads.PHONE_NUMBER_ID
    (before,) = await ingest(pool, inbound("wamid.k1", wa_id="15550002121", phone_number_id=pnid))
    (already,) = await ingest(pool, inbound("wamid.k2", wa_id="15550002323", phone_number_id=pnid))
    (system,) = await _store(pool, _number_change("15550002121", "15550002323"))
    assert system.conversation_id == already.conversation_id
    await _the_old_number_is_no_ones(pool, before.conversation_id, "15550002121")


async def test_a_text_sent_just_before_the_change_of_number_stays_with_its_conversation(
    pool: asyncpg.Pool,
) -> None:
    """In the same delivery (or batch) as the change, a text the customer sent from the old
    number before it belongs to the conversation the change moves, not to a new one under the
    number it no longer has."""
    pnid = payloads.PHONE_NUMBER_ID
    (first,) = await ingest(pool, inbound("wamid.l1", wa_id="15550004545", phone_number_id=pnid))
    earlier = payloads.message(
        "text", wa_id="15550004545", timestamp=str(int(time.time()) - 10), text={"body": "hi"}
    )
    change = _number_change("15550004545", "15550006767")
    texts = parse.parse(orjson.dumps(payloads.delivery(messages=[earlier]))).messages
    (out,) = await store.ingest_many(
        pool,
        [store.DeliveryIn([*texts, *change.messages], [], "c", "", change.events)],
    )
    assert [r.conversation_id for r in out.results] == [first.conversation_id] * 2
    assert (await conversation(pool, first.conversation_id))["wa_id"] == "15550006767"
    assert await pool.fetchval("SELECT count(*) FROM webhook_conversations") == 1


async def test_conversations_from_before_bsuids_keep_their_context_after_the_upgrade(
    pg: Postgres, tmp_path: Path
) -> None:
    """A database migrated by the previous release, with phone-keyed conversations and their
    agent context, upgraded in place: every conversation, message and context is kept, and the
    customer's first delivery with a BSUID continues the same conversation."""
    dsn = await migrated_before(pg, tmp_path / "before", "0010")
    conn = await asyncpg.connect(dsn)
    try:
        conv_ids = []
        for n in range(3):
            conv_ids.append(
                await conn.fetchval(
                    "INSERT INTO webhook_conversations (phone_number_id, wa_id, contact_name)"
                    " VALUES ('100', $1, 'Old') RETURNING id",
                    f"1555000900{n}",
                )
            )
            await conn.execute(
                "INSERT INTO agent_contexts (conversation_id, agent_type, messages)"
                " VALUES ($1, 'concierge', $2::jsonb)",
                conv_ids[-1],
                orjson.dumps([{"role": "user", "content": f"earlier {n}"}]).decode(),
            )
        await migrate.migrate(dsn)
        rows = await conn.fetch(
            "SELECT c.id, c.customer_id, c.wa_id, a.last_seq,"
            "       (SELECT t FROM wa_context(c.id) t) AS context"
            "  FROM webhook_conversations c"
            "  JOIN agent_contexts a ON a.conversation_id = c.id ORDER BY c.id"
        )
        assert [(r["id"], r["customer_id"], r["wa_id"]) for r in rows] == [
            (conv_ids[n], f"1555000900{n}", f"1555000900{n}") for n in range(3)
        ]
        # Each context became its first entry (db/migrations/0030), its messages numbered.
        assert [(r["last_seq"], orjson.loads(r["context"])) for r in rows] == [
            (1, [{"role": "user", "content": f"earlier {n}"}]) for n in range(3)
        ]
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        user = payloads.bsuid("old-customer")
        (result,) = await ingest(pool, inbound("wamid.up", wa_id="15550009001", user_id=user))
        assert result.conversation_id == conv_ids[1]
        (alone,) = await ingest(pool, inbound("wamid.up2", wa_id="", user_id=user))
        assert alone.conversation_id == conv_ids[1]
    finally:
        await pool.close()


async def test_every_shape_of_one_customer_in_one_batch_or_after_is_one_conversation(
    pool: asyncpg.Pool,
) -> None:
    """The batch proves phone and BSUID are one customer in any of its messages, whichever is
    newest; a message by phone number alone later still finds the BSUID's conversation."""
    base = int(time.time())
    user = payloads.bsuid("mixed")
    (old,) = await ingest(pool, inbound("wamid.m0", ts=base))
    batch = await ingest(
        pool,
        inbound("wamid.m1", ts=base + 1),  # phone only, beside the proof
        inbound("wamid.m2", user_id=user, ts=base + 2),  # the proof: phone and BSUID
        inbound("wamid.m3", wa_id="", user_id=user, ts=base + 3),  # newest: BSUID only
    )
    assert {r.conversation_id for r in batch} == {old.conversation_id}
    (later,) = await ingest(pool, inbound("wamid.m4", ts=base + 4))  # phone only, after
    assert later.conversation_id == old.conversation_id
    assert await pool.fetchval("SELECT count(*) FROM webhook_conversations") == 1
    assert (await conversation(pool, old.conversation_id))["customer_id"] == user


async def test_a_bsuid_change_without_any_sender_moves_the_conversation_and_forgets_the_number(
    pool: asyncpg.Pool,
) -> None:
    """user_changed_user_id: the customer's number changed and may not be shared. Meta may
    name no sender at all; the old number must not receive replies any more."""
    old, new = payloads.bsuid("frank-old"), payloads.bsuid("frank-new")
    first_message = inbound("wamid.f1", user_id=old, phone_number_id=payloads.PHONE_NUMBER_ID)
    (first,) = await ingest(pool, first_message)
    system = payloads.message(
        "system",
        wa_id=None,
        system={
            "body": f"User Frank changed from {old} to {new}",
            "type": "user_changed_user_id",
            "user_id": new,
            "previous_user_id": old,
        },
    )
    delivery = parse.parse(orjson.dumps(payloads.delivery(messages=[system])))
    (message,) = delivery.messages
    assert message.user_id == new
    out = await store.ingest_many(
        pool, [store.DeliveryIn(delivery.messages, [], "c", "", delivery.events)]
    )
    assert out[0].events_stored == 1
    assert out[0].results[0].conversation_id == first.conversation_id
    assert await conversation(pool, first.conversation_id) == {
        "customer_id": new,
        "wa_id": None,
        "user_id": new,
        "username": None,
        "message_count": 2,
        "marketing_preference": None,
    }


async def test_a_status_finds_its_conversation_by_bsuid_or_by_phone_number(
    pool: asyncpg.Pool,
) -> None:
    user = payloads.bsuid("status-lookup")
    (by_user,) = await ingest(pool, inbound("wamid.s1", wa_id="15550002020", user_id=user))
    (by_phone,) = await ingest(pool, inbound("wamid.s2", wa_id="15550003030"))
    statuses = [
        Status(
            message_id="wamid.OUT-unknown-1",
            phone_number_id="100",
            recipient_id="",
            status="failed",
            timestamp=int(time.time()),
            payload_json="{}",
            recipient_user_id=user,
        ),
        Status(
            message_id="wamid.OUT-unknown-2",
            phone_number_id="100",
            recipient_id="15550003030",
            status="failed",
            timestamp=int(time.time()),
            payload_json="{}",
            recipient_user_id=payloads.bsuid("not-yet-adopted"),
        ),
    ]
    await store.ingest_many(pool, [store.DeliveryIn([], statuses, "c", "")])
    rows = await pool.fetch(
        "SELECT reply_message_id, conversation_id FROM processed_webhook_messages"
        " WHERE kind = 'status' ORDER BY reply_message_id"
    )
    assert [r["conversation_id"] for r in rows] == [
        by_user.conversation_id,
        by_phone.conversation_id,
    ]


async def _changed_number(pool: asyncpg.Pool, name: str, phone: str) -> tuple[int, str]:
    """A customer known by their phone number and a BSUID writes, then Meta says their number
    changed (`user_changed_user_id`, no number shared) before the turn starts. Returns the
    conversation and the new BSUID."""
    old, new = payloads.bsuid(f"{name}-old"), payloads.bsuid(f"{name}-new")
    waiting = inbound(
        f"wamid.{name}1", wa_id=phone, user_id=old, phone_number_id=payloads.PHONE_NUMBER_ID
    )
    (first,) = await ingest(pool, waiting)
    system = payloads.message(
        "system",
        wa_id=None,
        system={
            "body": f"User {name} changed from {old} to {new}",
            "type": "user_changed_user_id",
            "user_id": new,
            "previous_user_id": old,
        },
    )
    delivery = parse.parse(orjson.dumps(payloads.delivery(messages=[system])))
    await store.ingest_many(
        pool, [store.DeliveryIn(delivery.messages, [], "c", "", delivery.events)]
    )
    assert (await conversation(pool, first.conversation_id))["wa_id"] is None
    return first.conversation_id, new


async def test_a_message_waiting_across_a_number_change_is_answered_at_the_new_id_not_the_old(
    pool: asyncpg.Pool,
) -> None:
    # The old number may be someone else's now: the turn names no phone number, and the agent
    # addresses the customer by their new BSUID. Both ways a turn starts: alone
    # (wa_claim_turn) and in a batch (wa_claim_turns).
    alone, alone_id = await _changed_number(pool, "grace", "15550007001")
    _, item = await store.claim_turn(pool, alone, "owner-1")
    assert item is not None and item.message_id == "wamid.grace1"
    assert (item.wa_id, item.user_id) == ("", alone_id)

    batched, batched_id = await _changed_number(pool, "heidi", "15550007002")
    row = await pool.fetchrow(
        "SELECT message_id, wa_id, user_id FROM wa_claim_turns($1, $2, $3, $4)",
        [batched],
        ["owner-2"],
        machine.conversation_sources(machine.ACTIVE),
        None,
    )
    assert row is not None
    assert dict(row) == {"message_id": "wamid.heidi1", "wa_id": "", "user_id": batched_id}
