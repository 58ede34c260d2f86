-- Every write of a turn in this file is fenced like wa_save_turn: its last two parameters
-- are the conversation and the turn's fence token; the write applies only while that token is
-- still the conversation's (its row share-locked, so a take-over waits for the write or
-- refuses it), and the statement returns the conversation's token: when it is not the
-- turn's, nothing was written. (processed_webhook_messages is the state service's table:
-- README, "Who owns which table".)

-- name: turn_state
-- The message's reply state and its conversation's context, in one round trip; its type and
-- Meta's message object say what it is (services/agent/inbound.py). With the customer's last
-- message time in the conversation (the 24-hour window's start, which every ingest of its
-- messages keeps on the conversation: wa_start_turn and the operator's reply read it there too)
-- and the database's clock to compare it with.
SELECT m.conversation_id, m.status, m.reply_text, m.reply_message_id, m.agent_type,
       m.send_started_at, m.absorbed_message_ids, ctx.agent_type AS context_agent_type,
       (SELECT c::json FROM wa_context(m.conversation_id) c) AS context,
       m.message_type, m.payload, m.reply_payload, conv.last_message_at AS last_customer_at,
       now() AS db_now
  FROM processed_webhook_messages m
  LEFT JOIN webhook_conversations conv ON conv.id = m.conversation_id
  LEFT JOIN agent_contexts ctx ON ctx.conversation_id = m.conversation_id
 WHERE m.message_id = $1 AND m.kind = 'message'

-- name: reply_state
-- reply_confirmed_by: the recorded id came from a status webhook (not, say, from the agent
-- that sent it recording it for a caller that went away: record_unanswered_sends).
SELECT m.conversation_id, m.status, m.reply_text, m.reply_message_id, m.agent_type,
       m.send_started_at, m.reply_payload, m.reply_confirmed_by
  FROM processed_webhook_messages m
 WHERE m.message_id = $1 AND m.kind = 'message'

-- name: save_turn
-- And the debounced burst $14 answered with the message (wa_save_burst, db/migrations/0018):
-- one statement, so saved together or not at all. The first column is the fence token. $6 is
-- the turn's own context messages, $16 how many the context keeps (db/migrations/0030).
SELECT wa_save_turn($1, $2, $3, $4, $5, $6::json, $16, $7, $8, $9, $10, $11, $12, $13,
                    $15::jsonb),
       wa_save_burst($1, $2, $3, $14::text[])

-- name: burst_quiet_seconds
-- How long ago the newest waiting message of conversation $1 was stored (the database's clock
-- on both sides). Its few waiting rows, by processed_messages_waiting_idx.
SELECT EXTRACT(EPOCH FROM now() - max(m.received_at))::float8
  FROM processed_webhook_messages m
 WHERE m.conversation_id = $1 AND m.status IN ('received', 'processing')

-- name: burst
-- The messages waiting after message $1 in its conversation, in order (at most $2): those of
-- a debounced burst lead (services/agent/debounce.py). processed_messages_waiting_idx, from
-- M's position on.
SELECT w.message_id, w.body, w.message_type, w.attempts
  FROM processed_webhook_messages m
  JOIN LATERAL (
      SELECT b.message_id, b.body, b.message_type, b.attempts
        FROM processed_webhook_messages b
       WHERE b.conversation_id = m.conversation_id
         AND b.status IN ('received', 'processing')
         AND (b.wa_timestamp, b.id) > (m.wa_timestamp, m.id)
         AND b.status = 'received' AND b.kind = 'message'
       ORDER BY b.wa_timestamp, b.id
       LIMIT $2
  ) w ON true
 WHERE m.message_id = $1 AND m.kind = 'message'

-- name: save_window_template
-- Outside the 24-hour window: the template replaces whatever reply was stored (never sent:
-- a free-form reply cannot be sent any more), stored as being sent before it is.
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $4 FOR SHARE
), saved AS (
    UPDATE processed_webhook_messages m
       SET reply_text = $2, reply_payload = $3::jsonb, send_started_at = now(),
           updated_at = now()
      FROM fence f
     WHERE m.message_id = $1 AND f.fence_token = $5
)
SELECT fence_token FROM fence

-- name: save_fallback
-- The fallback reply, stored like a model's (wa_save_turn) before it is sent: the context and
-- the session figures are left alone, no model having been called.
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $5 FOR SHARE
), saved AS (
    UPDATE processed_webhook_messages m
       SET reply_text = $2,
           agent_type = $3,
           send_started_at = CASE WHEN $4 THEN now() ELSE m.send_started_at END,
           updated_at = now()
      FROM fence f
     WHERE m.message_id = $1 AND f.fence_token = $6
)
SELECT fence_token FROM fence

-- name: session_metrics
SELECT increment_session_metrics($1, $2, $3, $4, $5, $6, $7, $8)

-- name: record_sent
-- A status that arrived before we recorded the send still counts: take the furthest one seen.
-- A turn whose conversation was taken over meanwhile (its token stale) still records the
-- reply it sent where none is recorded, as a status webhook's confirmation would: the later
-- holder's run finds the send in flight and must find that it went out, not send it again.
-- The caller learns that its turn is stale all the same.
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $3 FOR SHARE
), sent AS (
    UPDATE processed_webhook_messages m
       SET reply_message_id = $2,
           reply_status = (SELECT seen FROM wa_reply_status_seen($2) seen),
           updated_at = now()
      FROM fence f
     WHERE m.message_id = $1 AND (f.fence_token = $4 OR m.reply_message_id IS NULL)
)
SELECT fence_token FROM fence

-- name: record_unanswered_sends
-- Replies sent by turns whose answers may never have reached the state service, or reached
-- it and were never recorded (services/agent/server.py, _SentReplies: a killed state
-- service): message $1[n] was answered by reply $2[n]. Each recorded as record_sent would,
-- where no reply is recorded yet. Not fenced, like a status webhook's confirmation
-- (services/state/queries.sql ingest_statuses, whose statements are wa_ingest_statuses' in
-- db/migrations/0033): that Meta accepted this reply for this message stays true whoever holds
-- the conversation now, and a turn resumed after the crash must find it rather than send the
-- reply again.
-- It runs for every call's replies once the call has ended, and nearly always finds them all
-- recorded: each message is found by its key alone (`kind` checked on the row found, as in
-- db/migrations/0026), one that is recorded is neither locked nor written, and with nothing
-- to record the update reads no row. The others are locked first, one by one in the order a
-- batch of turns' final statements takes them (wa_finish_turns: by conversation, as
-- ingest_statuses's `locked`): in the update's own join order, this could hold one message of
-- a batch still finishing while waiting for another, and PostgreSQL would break the cycle by
-- failing one of the two. A row the batch records meanwhile is left out once its lock is free.
WITH locked AS MATERIALIZED (
    SELECT l.id, f.reply_id
      FROM (SELECT s.reply_id, k.id, k.phone_number_id, k.customer_id, k.conversation_id
              FROM unnest($1::text[], $2::text[]) AS s(message_id, reply_id)
             CROSS JOIN LATERAL (
                 SELECT m.id, m.kind, m.conversation_id, c.phone_number_id, c.customer_id
                   FROM processed_webhook_messages m
                   LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
                  WHERE m.message_id = s.message_id AND m.reply_message_id IS NULL
                  LIMIT 1) AS k
             WHERE k.kind = 'message'
             ORDER BY k.phone_number_id, k.customer_id, k.conversation_id, k.id) AS f
     CROSS JOIN LATERAL (
         SELECT m.id FROM processed_webhook_messages m
          WHERE m.id = f.id AND m.reply_message_id IS NULL
            FOR NO KEY UPDATE) AS l
)
UPDATE processed_webhook_messages m
   SET reply_message_id = l.reply_id,
       reply_status = (SELECT seen FROM wa_reply_status_seen(l.reply_id) seen),
       updated_at = now()
  FROM locked l
 WHERE m.id = l.id AND m.reply_message_id IS NULL AND EXISTS (SELECT FROM locked)
RETURNING m.message_id

-- name: send_started
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $2 FOR SHARE
), started AS (
    UPDATE processed_webhook_messages m SET send_started_at = now()
      FROM fence f
     WHERE m.message_id = $1 AND f.fence_token = $3
)
SELECT fence_token FROM fence

-- name: record_send_error
-- The Graph API answered: this attempt definitely did not deliver.
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $3 FOR SHARE
), failed AS (
    UPDATE processed_webhook_messages m
       SET reply_error_code = $2, send_started_at = NULL, updated_at = now()
      FROM fence f
     WHERE m.message_id = $1 AND f.fence_token = $4
)
SELECT fence_token FROM fence

-- name: reply_parts
-- A long reply's split, recorded once (the first run's split stands, whatever the settings
-- later), with each part's send state. A statement sees the table as it was before its own
-- insert: either the rows it inserts or the rows already there come back, never both. Every
-- row carries the conversation's fence token (one row with no part when there are none).
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $3 FOR SHARE
), ins AS (
    INSERT INTO agent_reply_parts (message_id, part, body)
    SELECT $1, t.ord - 1, t.body
      FROM unnest($2::text[]) WITH ORDINALITY AS t(body, ord), fence f
     WHERE f.fence_token = $4
    ON CONFLICT (message_id, part) DO NOTHING
    RETURNING part, body, sent_id, send_started_at
), parts AS (
    SELECT part, body, sent_id, send_started_at FROM ins
    UNION ALL
    SELECT part, body, sent_id, send_started_at FROM agent_reply_parts WHERE message_id = $1
)
SELECT f.fence_token, p.part, p.body, p.sent_id, p.send_started_at
  FROM fence f LEFT JOIN parts p ON true
 ORDER BY p.part

-- name: reply_part_sent_id
SELECT sent_id FROM agent_reply_parts WHERE message_id = $1 AND part = $2

-- name: reply_part_sent
-- Part $2 was sent as $3 (-1: none) and part $4 is being sent now (-1: none). A turn whose
-- conversation was taken over meanwhile starts no part, but records the part it sent where no
-- id is recorded for it (as record_sent does a whole reply's): the later holder's run must
-- find that it went out rather than send it again.
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $5 FOR SHARE
), parts AS (
    UPDATE agent_reply_parts p
       SET sent_id = CASE WHEN p.part = $2 THEN $3 ELSE p.sent_id END,
           send_started_at = CASE WHEN p.part = $2 THEN NULL ELSE now() END
      FROM fence f
     WHERE p.message_id = $1 AND p.part IN ($2, $4)
       AND (f.fence_token = $6 OR (p.part = $2 AND p.sent_id IS NULL))
)
SELECT fence_token FROM fence

-- name: record_part_send_error
-- The Graph API answered: this attempt at the part definitely did not deliver.
WITH fence AS (
    SELECT c.fence_token FROM webhook_conversations c WHERE c.id = $4 FOR SHARE
), part AS (
    UPDATE agent_reply_parts p SET send_started_at = NULL, reply_error_code = $3
      FROM fence f
     WHERE p.message_id = $1 AND p.part = $2 AND f.fence_token = $5
), failed AS (
    UPDATE processed_webhook_messages m
       SET reply_error_code = $3, updated_at = now()
      FROM fence f
     WHERE m.message_id = $1 AND f.fence_token = $5
)
SELECT fence_token FROM fence

-- name: fence_token
SELECT fence_token FROM webhook_conversations WHERE id = $1

-- name: save_turns
-- Many turns' save_turn in one statement (db/migrations/0023, services/agent/saves.py): $1 a
-- jsonb array of wa_save_turn's arguments by name; one row per turn, by its place in $1.
SELECT s.ord, s.fence_token FROM wa_save_turns($1::jsonb) AS s
