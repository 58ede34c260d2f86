"""A business's history, written in bulk and analyzed: what PostgreSQL plans for a statement
depends on its tables' statistics, and a deployment's tables are not empty. Used by
`bench.e2e --rows` and by tests/integration/test_turn_plans.py, so that the benchmark measures
on the history the test checks the plans on."""

from __future__ import annotations

import asyncpg

# Customers `1666<i>` (phone number and customer id), i from 1.
CUSTOMERS = 20_000

_HISTORY = """
WITH c AS (
    -- Its last message time as the ingest keeps it: its newest message's (k = 1 below).
    INSERT INTO webhook_conversations (phone_number_id, wa_id, customer_id, last_message_at)
    SELECT $1, '1666' || i, '1666' || i, now() - interval '1 minute'
      FROM generate_series(1, $2::integer) i
    RETURNING id, wa_id
), m AS (
    INSERT INTO processed_webhook_messages
        (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
         wa_timestamp, payload, status, correlation_id, finished_at, reply_message_id,
         reply_status)
    SELECT 'old-' || c.id || '-' || k, 'message', c.id, $1, c.wa_id, 'text',
           now() - k * interval '1 minute', '{}', 'replied', 'c', now(),
           'out-' || c.id || '-' || k, 'read'
      FROM c, generate_series(1, $3::integer) k
    RETURNING reply_message_id, wa_id
), s AS (
    -- Each reply's delivery statuses, as Meta sends them.
    INSERT INTO processed_webhook_messages
        (message_id, kind, phone_number_id, wa_id, message_type, wa_timestamp, payload,
         status, correlation_id, reply_message_id, reply_status)
    SELECT 'status:' || m.reply_message_id || ':' || st, 'status', $1, m.wa_id, 'status',
           now(), '{}', 'skipped', 'c', m.reply_message_id, st
      FROM m, unnest(ARRAY['sent', 'read']) st
), a AS (
    INSERT INTO agent_contexts (conversation_id, agent_type, last_seq)
    SELECT c.id, 'concierge', 2 * $4::integer FROM c
)
INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
SELECT c.id, 2 * e - 1, 2,
       '{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}'
  FROM c, generate_series(1, $4::integer) e
"""


async def write(
    db: asyncpg.Pool, phone_number_id: str, messages: int, *, context_entries: int = 1
) -> int:
    """About `messages` answered messages of CUSTOMERS customers of business number
    `phone_number_id` (the same number each), each reply with two delivery statuses, each
    customer with a context of `context_entries` entries (two messages each); then ANALYZE.
    Returns how many messages it wrote."""
    each = max(1, messages // CUSTOMERS)
    await db.execute(_HISTORY, phone_number_id, CUSTOMERS, each, context_entries, timeout=600)
    await db.execute("ANALYZE", timeout=600)
    return CUSTOMERS * each
