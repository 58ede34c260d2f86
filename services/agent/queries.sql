-- name: reply_state
SELECT m.conversation_id, m.status, m.reply_text, m.reply_message_id, m.agent_type,
       m.send_started_at
  FROM processed_webhook_messages m
 WHERE m.message_id = $1 AND m.kind = 'message'

-- name: fence_for_share
SELECT fence_token FROM webhook_conversations WHERE id = $1 FOR SHARE

-- name: load_context
SELECT agent_type, messages, token_count FROM agent_contexts WHERE conversation_id = $1

-- name: save_context
INSERT INTO agent_contexts (conversation_id, agent_type, messages, token_count, fence_token,
                            correlation_id)
VALUES ($1, $2, $3::jsonb, $4, $5, $6)
ON CONFLICT (conversation_id) DO UPDATE
   SET agent_type = EXCLUDED.agent_type,
       messages = EXCLUDED.messages,
       token_count = EXCLUDED.token_count,
       fence_token = EXCLUDED.fence_token,
       correlation_id = EXCLUDED.correlation_id,
       updated_at = now()

-- name: store_reply
UPDATE processed_webhook_messages
   SET reply_text = $2, agent_type = $3, updated_at = now()
 WHERE message_id = $1

-- name: record_agent_switch
INSERT INTO conversation_state_transitions
    (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
     correlation_id)
VALUES ($1, $2, 'agent', $3, $4, $5, $6, $7)

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
