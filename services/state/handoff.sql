-- Human handoff (db/migrations/0017, README "Human handoff"): the state service's statements.

-- name: hand_off
-- The conversation goes to a person, under the turn's token (nothing when it moved on): run
-- in one transaction with the finishing turn's transition, so the handoff message is replied
-- and the conversation handed off together or not at all. Audited.
WITH marked AS (
    UPDATE webhook_conversations c
       SET handoff_at = COALESCE(c.handoff_at, now()),
           handoff_message_id = COALESCE(c.handoff_message_id, $3), updated_at = now()
     WHERE c.id = $1 AND c.fence_token = $2
    RETURNING c.id, c.handoff_at
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
         correlation_id)
    SELECT m.id, $3, 'handoff', 'bot', 'person',
           'handed off to a person by the ' || $4 || ' agent', $2, $5
      FROM marked m
)
SELECT handoff_at FROM marked

-- name: customer_conversations
-- A customer's conversations by phone number or BSUID ($1), on business number $2 when it is
-- not '' (common/customers.py chooses), newest first.
SELECT id, phone_number_id, handoff_at FROM (
    SELECT c.id, c.phone_number_id, c.handoff_at, c.last_activity_at
      FROM webhook_conversations c
     WHERE c.wa_id = $1 AND ($2 = '' OR c.phone_number_id = $2)
    UNION
    SELECT c.id, c.phone_number_id, c.handoff_at, c.last_activity_at
      FROM webhook_conversations c
     WHERE c.user_id = $1 AND ($2 = '' OR c.phone_number_id = $2)
) c
ORDER BY last_activity_at DESC, id DESC
LIMIT 50

-- name: release_handoff
-- Back to the bot, audited with who released it; the time it had been handed off (no row:
-- it was not handed off).
WITH old AS (
    SELECT c.id, c.handoff_at FROM webhook_conversations c WHERE c.id = $1 FOR UPDATE
), released AS (
    UPDATE webhook_conversations c
       SET handoff_at = NULL, handoff_message_id = NULL, updated_at = now()
      FROM old o
     WHERE c.id = o.id AND o.handoff_at IS NOT NULL
    RETURNING c.id, c.phone_number_id, o.handoff_at
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, entity, from_state, to_state, reason, correlation_id)
    SELECT r.id, 'handoff', 'person', 'bot', 'released to the bot by ' || $2, $3
      FROM released r
)
SELECT id, phone_number_id, handoff_at FROM released

-- name: list_handoffs
-- Conversations waiting for a person (partial index on handoff_at), oldest handoff first,
-- each with the messages that arrived after the one that handed it off: at most $3 of them,
-- oldest first, and how many there are (the conversation's messages by received_at: indexed).
SELECT c.id, c.phone_number_id, c.wa_id, c.user_id, c.username, c.contact_name, c.handoff_at,
       c.handoff_message_id, n.waiting_count, w.messages
  FROM webhook_conversations c
  LEFT JOIN processed_webhook_messages h ON h.message_id = c.handoff_message_id
  LEFT JOIN LATERAL (
      SELECT count(*) AS waiting_count
        FROM processed_webhook_messages m
       WHERE m.conversation_id = c.id AND m.kind = 'message'
         AND m.received_at >= COALESCE(h.received_at, c.handoff_at)
         AND m.message_id IS DISTINCT FROM c.handoff_message_id
  ) n ON true
  LEFT JOIN LATERAL (
      SELECT jsonb_agg(jsonb_build_object(
                 'message_id', x.message_id, 'type', x.message_type, 'text', x.body,
                 'received_at', x.received_at, 'status', x.status,
                 'status_reason', x.status_reason) ORDER BY x.received_at, x.id) AS messages
        FROM (SELECT m.id, m.message_id, m.message_type, m.body, m.received_at, m.status,
                     m.status_reason
                FROM processed_webhook_messages m
               WHERE m.conversation_id = c.id AND m.kind = 'message'
                 AND m.received_at >= COALESCE(h.received_at, c.handoff_at)
                 AND m.message_id IS DISTINCT FROM c.handoff_message_id
               ORDER BY m.received_at, m.id
               LIMIT $3) x
  ) w ON true
 WHERE c.handoff_at IS NOT NULL AND ($1 = '' OR c.phone_number_id = $1)
 ORDER BY c.handoff_at, c.id
 LIMIT $2

-- name: take_over
-- An operator takes the conversation over: handed off now, unless it already was (its time
-- then comes back, `taken` false). Audited with who. The messages waiting for the person are
-- those received since (no handoff message), and those still waiting for a turn: its handoff
-- time is then the oldest of those's arrival, so that list_handoffs shows them (the next turn
-- start holds them for the person, wa_hold_for_person). Not a turn in flight: it still ends.
WITH taken AS (
    UPDATE webhook_conversations c
       SET handoff_at = LEAST(now(), (SELECT min(m.received_at)
                                        FROM processed_webhook_messages m
                                       WHERE m.conversation_id = c.id AND m.kind = 'message'
                                         AND m.status = 'received')),
           handoff_message_id = NULL, updated_at = now()
     WHERE c.id = $1 AND c.handoff_at IS NULL
    RETURNING c.id, c.phone_number_id, c.handoff_at
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, entity, from_state, to_state, reason, correlation_id)
    SELECT t.id, 'handoff', 'bot', 'person', 'taken over from the bot by ' || $2, $3
      FROM taken t
)
SELECT id, phone_number_id, handoff_at, true AS taken FROM taken
UNION ALL
SELECT c.id, c.phone_number_id, c.handoff_at, false
  FROM webhook_conversations c
 WHERE c.id = $1 AND c.handoff_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM taken)
