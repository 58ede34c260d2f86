-- name: ingest_message
-- One round trip per message: upsert the conversation, insert the message once (the unique
-- message_id makes a concurrent duplicate wait and then do nothing), audit what was stored.
WITH conv AS (
    INSERT INTO webhook_conversations
        (phone_number_id, wa_id, contact_name, correlation_id, last_message_at)
    VALUES ($1, $2, NULLIF($3, ''), $4, $5)
    ON CONFLICT (phone_number_id, wa_id) DO UPDATE
        SET contact_name = COALESCE(EXCLUDED.contact_name, webhook_conversations.contact_name),
            last_message_at = GREATEST(webhook_conversations.last_message_at,
                                       EXCLUDED.last_message_at),
            last_activity_at = now()
    RETURNING id
), msg AS (
    INSERT INTO processed_webhook_messages
        (message_id, kind, conversation_id, phone_number_id, wa_id, message_type, wa_timestamp,
         body, payload, status, status_reason, correlation_id, traceparent)
    SELECT $6, 'message', conv.id, $1, $2, $7, $5, NULLIF($8, ''), $9::jsonb, $10,
           NULLIF($11, ''), $4, $12
    FROM conv
    ON CONFLICT (message_id) DO NOTHING
    RETURNING conversation_id, status
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, correlation_id)
    SELECT conversation_id, $6, 'message', NULL, status,
           CASE WHEN status = 'skipped' THEN $11 ELSE 'ingested' END, $4
    FROM msg
)
SELECT (SELECT id FROM conv) AS conversation_id, (SELECT status FROM msg) AS status

-- name: ingest_status
-- A delivery status is stored once per (outbound id, status) and moves the outbound message's
-- delivery state forward only: read never goes back to sent.
WITH ins AS (
    INSERT INTO processed_webhook_messages
        (message_id, kind, conversation_id, phone_number_id, wa_id, message_type, wa_timestamp,
         body, payload, status, status_reason, reply_message_id, reply_status, reply_error_code,
         correlation_id, traceparent)
    VALUES ('status:' || $1 || ':' || $4, 'status',
            (SELECT id FROM webhook_conversations WHERE phone_number_id = $2 AND wa_id = $3),
            $2, $3, 'status', $5, $4, $6::jsonb, 'skipped', 'status update: ' || $4, $1, $4,
            NULLIF($7, ''), $8, $9)
    ON CONFLICT (message_id) DO NOTHING
    RETURNING id
), upd AS (
    UPDATE processed_webhook_messages
       SET reply_status = $4,
           reply_error_code = COALESCE(NULLIF($7, ''), reply_error_code),
           updated_at = now()
     WHERE reply_message_id = $1 AND kind = 'message'
       AND wa_delivery_rank(reply_status) < wa_delivery_rank($4)
    RETURNING id
)
SELECT (SELECT count(*) FROM ins) AS inserted, (SELECT count(*) FROM upd) AS updated

-- name: claim_conversation
UPDATE webhook_conversations
   SET fence_token = fence_token + 1, status = 'active', lock_owner = $2, locked_at = now(),
       last_activity_at = now(), updated_at = now()
 WHERE id = $1
RETURNING fence_token, (SELECT status FROM webhook_conversations WHERE id = $1) AS previous

-- name: release_conversation
UPDATE webhook_conversations
   SET status = 'idle', lock_owner = NULL, locked_at = NULL, updated_at = now(),
       last_activity_at = now()
 WHERE id = $1 AND fence_token = $2
RETURNING id

-- name: next_waiting
SELECT id, message_id, status, conversation_id, correlation_id
  FROM processed_webhook_messages
 WHERE conversation_id = $1 AND status IN ('received', 'processing')
 ORDER BY wa_timestamp, id
 LIMIT 1
   FOR UPDATE

-- name: message_for_update
SELECT m.id, m.message_id, m.status, m.conversation_id, c.fence_token
  FROM processed_webhook_messages m
  LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
 WHERE m.message_id = $1 AND m.kind = 'message'
   FOR UPDATE OF m

-- name: fence_for_share
SELECT fence_token FROM webhook_conversations WHERE id = $1 FOR SHARE

-- name: set_message_status
UPDATE processed_webhook_messages
   SET status = $2,
       status_reason = NULLIF($3, ''),
       attempts = attempts + CASE WHEN $2 = 'processing' THEN 1 ELSE 0 END,
       started_at = CASE WHEN $2 = 'processing' THEN now() ELSE started_at END,
       finished_at = CASE WHEN $2 IN ('replied', 'skipped', 'failed', 'dead_lettered')
                          THEN now() ELSE finished_at END,
       updated_at = now()
 WHERE id = $1
RETURNING id, message_id, conversation_id, phone_number_id, wa_id, message_type, wa_timestamp,
          body, correlation_id, traceparent, attempts,
          (SELECT contact_name FROM webhook_conversations c WHERE c.id = conversation_id)
              AS contact_name

-- name: record_transition
INSERT INTO conversation_state_transitions
    (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
     correlation_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)

-- name: has_waiting
SELECT EXISTS (
    SELECT 1 FROM processed_webhook_messages
     WHERE conversation_id = $1 AND status IN ('received', 'processing'))

-- name: sweep_candidates
-- Conversations with work acknowledged a while ago and not finished: never started (received),
-- or in flight (processing). Dispatching them is harmless when a live holder has them.
SELECT conversation_id, min(received_at) AS oldest,
       bool_or(status = 'processing' AND started_at < now() - make_interval(secs => $2))
           AS stuck
  FROM processed_webhook_messages
 WHERE status IN ('received', 'processing') AND received_at < now() - make_interval(secs => $1)
 GROUP BY conversation_id
 ORDER BY oldest
 LIMIT $3

-- name: all_waiting_conversations
SELECT DISTINCT conversation_id
  FROM processed_webhook_messages
 WHERE status IN ('received', 'processing')

-- name: failed_not_dead_lettered
SELECT message_id, conversation_id, status_reason, payload, correlation_id
  FROM processed_webhook_messages
 WHERE status = 'failed' AND finished_at < now() - make_interval(secs => $1)
 ORDER BY finished_at
 LIMIT $2

-- name: timeline_messages
SELECT m.message_id, m.message_type, m.status, m.status_reason, m.body, m.reply_text,
       m.reply_message_id, m.reply_status, m.correlation_id, m.traceparent, m.received_at,
       m.conversation_id, m.attempts
  FROM processed_webhook_messages m
 WHERE m.conversation_id = $1 AND m.kind = 'message'
 ORDER BY m.wa_timestamp DESC, m.id DESC
 LIMIT $2

-- name: conversation_of_message
SELECT conversation_id FROM processed_webhook_messages WHERE message_id = $1

-- name: conversations_of_phone
SELECT id FROM webhook_conversations WHERE wa_id = $1 ORDER BY last_activity_at DESC LIMIT 1

-- name: timeline_transitions
SELECT message_id, entity, from_state, to_state, reason, correlation_id, created_at
  FROM conversation_state_transitions
 WHERE conversation_id = $1
 ORDER BY created_at DESC, id DESC
 LIMIT $2
