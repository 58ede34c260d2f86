"""The CHECK constraints a turn's writes meet hold the same values as before, and hold them in
domains, whose parsed CHECK PostgreSQL caches, instead of as lists of constants a table CHECK
re-reads at every statement (db/migrations/0028)."""

from __future__ import annotations

import asyncpg
import pytest

from common import db

# (table, column, constraint, the values it allows, nullable)
CHECKS = [
    (
        "processed_webhook_messages",
        "kind",
        "processed_webhook_messages_kind_check",
        ("message", "status", "event"),
        False,
    ),
    (
        "processed_webhook_messages",
        "status",
        "processed_webhook_messages_status_check",
        ("received", "processing", "replied", "skipped", "failed", "dead_lettered"),
        False,
    ),
    (
        "processed_webhook_messages",
        "reply_status",
        "processed_webhook_messages_reply_status_check",
        ("sent", "delivered", "read", "failed"),
        True,
    ),
    (
        "webhook_conversations",
        "status",
        "webhook_conversations_status_check",
        ("idle", "active"),
        False,
    ),
    (
        "webhook_conversations",
        "marketing_preference",
        "webhook_conversations_marketing_preference_check",
        ("stop", "resume"),
        True,
    ),
    (
        "conversation_state_transitions",
        "entity",
        "conversation_state_transitions_entity_check",
        ("message", "conversation", "agent", "handoff", "operator"),
        False,
    ),
]


async def _row(conn: db.Conn, table: str) -> str:
    """A row of `table` to update, as the condition that names it."""
    conversation = await conn.fetchval(
        "INSERT INTO webhook_conversations (phone_number_id, wa_id) VALUES ('100', '1')"
        " ON CONFLICT (phone_number_id, customer_id) DO UPDATE SET updated_at = now()"
        " RETURNING id"
    )
    if table == "webhook_conversations":
        return f"id = {conversation}"
    if table == "processed_webhook_messages":
        await conn.execute(
            "INSERT INTO processed_webhook_messages (message_id, kind, conversation_id,"
            " phone_number_id, wa_id, message_type, wa_timestamp, payload, status,"
            " correlation_id) VALUES ('wamid.check', 'message', $1, '100', '1', 'text', now(),"
            " '{}', 'received', 'c') ON CONFLICT (message_id) DO NOTHING",
            conversation,
        )
        return "message_id = 'wamid.check'"
    row = await conn.fetchval(
        "INSERT INTO conversation_state_transitions (conversation_id, entity, to_state)"
        " VALUES ($1, 'conversation', 'active') RETURNING id",
        conversation,
    )
    return f"id = {row}"


@pytest.mark.parametrize(("table", "column", "constraint", "allowed", "nullable"), CHECKS)
async def test_each_check_allows_its_values_and_refuses_others_by_name(
    pool: asyncpg.Pool,
    table: str,
    column: str,
    constraint: str,
    allowed: tuple[str, ...],
    nullable: bool,
) -> None:
    async with pool.acquire() as conn:
        where = await _row(conn, table)
        for value in allowed + ((None,) if nullable else ()):
            await conn.execute(f"UPDATE {table} SET {column} = $1 WHERE {where}", value)
        for wrong in ("", "Received", "unknown", allowed[0] + " "):
            with pytest.raises(asyncpg.CheckViolationError) as refused:
                await conn.execute(f"UPDATE {table} SET {column} = $1 WHERE {where}", wrong)
            assert refused.value.constraint_name == constraint
        # An insert is checked too (the audit trail is only ever inserted into).
        if table == "conversation_state_transitions":
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(
                    "INSERT INTO conversation_state_transitions (entity, to_state)"
                    " VALUES ('nobody', 'x')"
                )


async def test_the_checks_a_turn_meets_hold_no_list_of_constants(pool: asyncpg.Pool) -> None:
    # A table's CHECK is re-read from its stored expression at every statement that writes the
    # table, every constant field by field; a domain's is read once per connection.
    rows = await pool.fetch(
        "SELECT conrelid::regclass::text AS t, conname FROM pg_constraint"
        " WHERE contype = 'c' AND conbin::text LIKE '%{CONST %'"
        " AND conrelid = ANY ($1::regclass[])",
        ["processed_webhook_messages", "webhook_conversations", "conversation_state_transitions"],
    )
    assert [(r["t"], r["conname"]) for r in rows] == []
