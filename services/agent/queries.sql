-- name: turn_state
-- The message's reply state and its conversation's context, in one round trip.
SELECT m.conversation_id, m.status, m.reply_text, m.reply_message_id, m.agent_type,
       m.send_started_at, ctx.agent_type AS context_agent_type, ctx.messages AS context
  FROM processed_webhook_messages m
  LEFT JOIN agent_contexts ctx ON ctx.conversation_id = m.conversation_id
 WHERE m.message_id = $1 AND m.kind = 'message'

-- name: reply_state
SELECT m.conversation_id, m.status, m.reply_text, m.reply_message_id, m.agent_type,
       m.send_started_at
  FROM processed_webhook_messages m
 WHERE m.message_id = $1 AND m.kind = 'message'

-- name: save_turn
SELECT wa_save_turn($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13)

-- name: session_metrics
SELECT increment_session_metrics($1, $2, $3, $4, $5, $6, $7, $8)

-- name: record_sent
-- A status that arrived before we recorded the send still counts: take the furthest one seen.
UPDATE processed_webhook_messages m
   SET reply_message_id = $2,
       reply_status = COALESCE(
           (SELECT s.reply_status FROM processed_webhook_messages s
             WHERE s.reply_message_id = $2 AND s.kind = 'status'
             ORDER BY wa_delivery_rank(s.reply_status) DESC LIMIT 1),
           'sent'),
       updated_at = now()
 WHERE m.message_id = $1

-- name: send_started
UPDATE processed_webhook_messages SET send_started_at = now() WHERE message_id = $1

-- name: record_send_error
-- The Graph API answered: this attempt definitely did not deliver.
UPDATE processed_webhook_messages
   SET reply_error_code = $2, send_started_at = NULL, updated_at = now()
 WHERE message_id = $1
