-- Operators' replies (Agent.SendOperatorReply, db/migrations/0017): stored before they are
-- sent, sent once per idempotency key.

-- name: by_key
SELECT r.id, r.idempotency_key, r.conversation_id, r.phone_number_id, r.body, r.sent_id, r.sent_at,
       r.send_started_at, c.wa_id, c.user_id, c.last_message_at
  FROM operator_replies r
  JOIN webhook_conversations c ON c.id = r.conversation_id
 WHERE r.idempotency_key = $1

-- name: customer_conversations
-- A customer's conversations by phone number or BSUID ($1), on business number $2 when it is
-- not '' (common/customers.py chooses), newest first.
SELECT id, phone_number_id, wa_id, user_id, last_message_at FROM (
    SELECT c.id, c.phone_number_id, c.wa_id, c.user_id, c.last_message_at, c.last_activity_at
      FROM webhook_conversations c
     WHERE c.wa_id = $1 AND ($2 = '' OR c.phone_number_id = $2)
    UNION
    SELECT c.id, c.phone_number_id, c.wa_id, c.user_id, c.last_message_at, c.last_activity_at
      FROM webhook_conversations c
     WHERE c.user_id = $1 AND ($2 = '' OR c.phone_number_id = $2)
) c
ORDER BY last_activity_at DESC, id DESC
LIMIT 50

-- name: store
-- The reply, recorded as being sent before it is (no row: the key is taken, by a concurrent
-- request).
INSERT INTO operator_replies
    (idempotency_key, conversation_id, phone_number_id, operator, body, send_started_at,
     correlation_id)
VALUES ($1, $2, $3, $4, $5, now(), $6)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id

-- name: start_again
-- An earlier request's send that definitely failed (the Graph API answered) is sent again; no
-- row: another request is sending it.
UPDATE operator_replies
   SET send_started_at = now(), error_code = NULL
 WHERE id = $1 AND sent_at IS NULL AND send_started_at IS NULL
RETURNING id

-- name: send_failed
-- The Graph API answered: this attempt did not deliver (a later request may send it).
UPDATE operator_replies SET send_started_at = NULL, error_code = $2 WHERE id = $1

-- name: held_since_last_answer
-- The customer's texts held for a person (wa_hold_for_person) in conversation $1 during its
-- current handoff (received since it began, as list_handoffs counts them; none when it is not
-- handed off) and since its last operator answer other than $2 was sent: they go into the
-- context before answer $2 (`sent`). The newest 50, oldest first. By the conversation's
-- messages by received_at (indexed); a few rows.
SELECT x.message_id, x.body FROM (
    SELECT m.id, m.message_id, m.body, m.received_at
      FROM webhook_conversations c
      LEFT JOIN processed_webhook_messages h ON h.message_id = c.handoff_message_id
      JOIN processed_webhook_messages m ON m.conversation_id = c.id
     WHERE c.id = $1 AND c.handoff_at IS NOT NULL
       AND m.kind = 'message' AND m.status = 'skipped'
       AND m.status_reason LIKE 'waiting for a person%' AND m.body <> ''
       AND m.received_at >= COALESCE(h.received_at, c.handoff_at)
       AND m.message_id IS DISTINCT FROM c.handoff_message_id
       AND m.received_at > COALESCE((SELECT max(r.sent_at) FROM operator_replies r
                                      WHERE r.conversation_id = $1 AND r.id <> $2),
                                    '-infinity')
     ORDER BY m.received_at DESC, m.id DESC
     LIMIT 50
) x
 ORDER BY x.received_at, x.id

-- name: sent
-- Sent as $2 ('' when recorded, not sent): recorded, audited in the conversation's timeline,
-- and added to the agent's context, after the customer's messages held since the previous
-- answer ($4: a JSON array of the context's messages, the answer last), so that the bot knows
-- what was asked and said once it answers again.
WITH sent AS (
    UPDATE operator_replies r
       SET sent_id = NULLIF($2, ''), sent_at = now()
     WHERE r.id = $1
    RETURNING r.id, r.conversation_id, r.body, r.operator, r.correlation_id
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, entity, from_state, to_state, reason, correlation_id)
    SELECT s.conversation_id, 'operator', NULL, CASE WHEN $2 = '' THEN 'recorded' ELSE 'sent' END,
           'reply by ' || s.operator
               || CASE WHEN $2 = '' THEN ', recorded, not sent (no WHATSAPP_ACCESS_TOKEN)'
                       ELSE ', sent as ' || $2 END
               || ': ' || s.body,
           s.correlation_id
      FROM sent s
), context AS (
    -- The messages' numbers in the context (db/migrations/0030: an entry holds seq to
    -- seq + n - 1, and last_seq moves on by n): taken on the row, after a turn's save of the
    -- same conversation if one holds it.
    INSERT INTO agent_contexts AS a (conversation_id, agent_type, token_count, last_seq)
    SELECT s.conversation_id, $3, $5, json_array_length($4::json)
      FROM sent s
    ON CONFLICT (conversation_id) DO UPDATE
       SET token_count = a.token_count + EXCLUDED.token_count,
           last_seq = a.last_seq + EXCLUDED.last_seq,
           updated_at = now()
    RETURNING a.conversation_id, a.last_seq
)
INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
SELECT c.conversation_id, c.last_seq - json_array_length($4::json) + 1,
       json_array_length($4::json),
       (SELECT string_agg(e::text, ',' ORDER BY k) FROM json_array_elements($4::json)
                                                    WITH ORDINALITY AS x (e, k))
  FROM context c
