"""Human handoff's statements on a large table: what lists and names conversations, and what
holds a handed-off conversation's messages, use indexes (README, "Human handoff")."""

from __future__ import annotations

import asyncpg

from services.agent import operator
from services.state import handoff


def _bound(query: str, *values: str) -> str:
    for n, value in reversed(list(enumerate(values, 1))):
        query = query.replace(f"${n}", value)
    return query


async def test_handoff_queries_use_indexes_on_a_large_table(pool: asyncpg.Pool) -> None:
    # 5,000 conversations of 60 messages each (300,000), 3 of them handed off.
    await pool.execute(
        """
        INSERT INTO webhook_conversations (id, phone_number_id, wa_id, customer_id)
        SELECT i, '1', '1555' || i, '1555' || i FROM generate_series(1, 5000) i;
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, received_at, finished_at)
        SELECT 'm' || c || '-' || i, 'message', c, '1', '1555' || c, 'text', now(), '{}',
               'replied', 'c', now() - i * interval '1 minute', now()
          FROM generate_series(1, 5000) c, generate_series(1, 60) i;
        UPDATE webhook_conversations SET handoff_at = now(), handoff_message_id = 'm' || id || '-30'
         WHERE id IN (7, 70, 700);
        ANALYZE webhook_conversations;
        ANALYZE processed_webhook_messages;
    """,
        timeout=300,
    )
    for query in (
        _bound(handoff.Q["list_handoffs"], "''", "100", "20"),
        _bound(handoff.Q["customer_conversations"], "'15557'", "''"),
        _bound(operator.Q["customer_conversations"], "'15557'", "'1'"),
        _bound(operator.Q["held_since_last_answer"], "7", "0"),
        # What wa_hold_for_person locks and moves.
        "SELECT m.id FROM processed_webhook_messages m WHERE m.conversation_id = 7 "
        "AND m.status IN ('received', 'processing') ORDER BY m.wa_timestamp, m.id FOR UPDATE",
    ):
        plan = "\n".join(r[0] for r in await pool.fetch(f"EXPLAIN {query}"))
        assert "Index" in plan and "Seq Scan" not in plan, (query, plan)
    waiting = await handoff.waiting(pool)
    assert [w.conversation_id for w in waiting] == [7, 70, 700]
    # Received after the handoff message (received 30 minutes ago): 29 of them, oldest first.
    assert {w.waiting_count for w in waiting} == {29}
    assert waiting[0].messages[0]["message_id"] == "m7-29"
    assert len(waiting[0].messages) == handoff.WAITING_SHOWN


async def test_a_handed_off_conversation_starts_no_turn_and_a_sent_cut_off_turn_is_replied(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute("""
        INSERT INTO webhook_conversations (id, phone_number_id, wa_id, customer_id, handoff_at)
        VALUES (1, '1', '1555', '1555', now());
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, reply_message_id)
        VALUES ('cut', 'message', 1, '1', '1555', 'text', now() - interval '2 s', '{}',
                'processing', 'c1', 'wamid.SENT'),
               ('cut-unsent', 'message', 1, '1', '1555', 'text', now() - interval '1 s', '{}',
                'processing', 'c2', NULL),
               ('new', 'message', 1, '1', '1555', 'text', now(), '{}', 'received', 'c3', NULL);
    """)
    claimed = await pool.fetchrow("SELECT * FROM wa_claim_turn(1, 'me', ARRAY['idle'])")
    assert claimed is not None and claimed["outcome"] == "none"
    rows = {
        r["message_id"]: (r["status"], r["status_reason"])
        for r in await pool.fetch(
            "SELECT message_id, status, status_reason FROM processed_webhook_messages"
        )
    }
    assert rows["cut"][0] == "replied" and rows["cut"][1].startswith("reply sent as wamid.SENT")
    assert rows["cut-unsent"][0] == rows["new"][0] == "skipped"
    assert rows["new"][1].startswith("waiting for a person (handed off at ")
    audit = await pool.fetch(
        "SELECT message_id, from_state, to_state, correlation_id FROM "
        "conversation_state_transitions WHERE entity = 'message' ORDER BY id"
    )
    assert [
        (a["message_id"], a["from_state"], a["to_state"], a["correlation_id"]) for a in audit
    ] == [
        ("cut", "processing", "replied", "c1"),
        ("cut-unsent", "processing", "skipped", "c2"),
        ("new", "received", "skipped", "c3"),
    ]


async def test_a_conversation_taken_over_lists_the_messages_the_bot_had_not_answered(
    pool: asyncpg.Pool,
) -> None:
    # The agent was down: two messages wait when an operator takes the conversation over.
    # They are the person's now (the next turn start holds them), so the list shows them.
    await pool.execute("""
        INSERT INTO webhook_conversations (id, phone_number_id, wa_id, customer_id)
        VALUES (1, '1', '1555', '1555');
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, received_at)
        VALUES ('answered', 'message', 1, '1', '1555', 'text', now() - interval '9 min', '{}',
                'replied', 'c0', now() - interval '9 min'),
               ('first', 'message', 1, '1', '1555', 'text', now() - interval '5 min', '{}',
                'received', 'c1', now() - interval '5 min'),
               ('second', 'message', 1, '1', '1555', 'text', now() - interval '4 min', '{}',
                'received', 'c2', now() - interval '4 min');
    """)
    taken = await handoff.take_over(pool, "1555", "1", "ops@example.com")
    assert not taken.already
    (listed,) = await handoff.waiting(pool)
    assert listed.waiting_count == 2
    assert [m["message_id"] for m in listed.messages] == ["first", "second"]
    # Taken over with nothing waiting: from now on, as before.
    await pool.execute(
        "UPDATE webhook_conversations SET handoff_at = NULL; "
        "UPDATE processed_webhook_messages SET status = 'skipped'"
    )
    await handoff.take_over(pool, "1555", "1", "ops@example.com")
    (listed,) = await handoff.waiting(pool)
    assert listed.waiting_count == 0 and listed.messages == []
