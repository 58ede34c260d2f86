-- name: ingest_messages
-- A whole batch of messages in one statement: find or create their conversations, insert each
-- message once (the unique message_id decides duplicates, concurrent ones included), audit what
-- was stored. Rows are written in key order so concurrent batches cannot deadlock each other.
-- Each conversation row is written once: its attributes and its message_count together
-- (`fresh`; db/migrations/0021).
-- A conversation is one per (business number, customer_id): the customer's BSUID when Meta
-- sends one, the phone number otherwise. `adopt`: a conversation known by a phone number that
-- this batch names together with a BSUID (in any of its messages) takes the BSUID as its key
-- (once: later deliveries find it by the BSUID, or by the phone number alone). The phone number, BSUID and
-- username are attributes that only a newer value replaces; an absent one keeps the old.
-- A message erased by `wa forget` and delivered again (its id's digest is a tombstone) is a
-- duplicate: nothing of it is stored, not even its conversation.
-- The statement is wa_ingest_messages (db/migrations/0032_generic_turn_plans.sql), a function so
-- that it keeps one plan per connection.
SELECT * FROM wa_ingest_messages($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::timestamptz[], $7::text[], $8::text[], $9::text[],
                                 $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                                 $15::text[], $16::text[])
    AS t(ord bigint, message_id text, conversation_id bigint, status text)
 ORDER BY t.ord

-- name: ingest_statuses
-- Delivery statuses, each stored once per (outbound id, status); the outbound message's
-- delivery state only moves forward (read never goes back to sent).
-- The statements are wa_ingest_statuses' (db/migrations/0033_lean_status_ingest.sql): each runs
-- with a generic plan, as above, and the rare ones only when needed.
SELECT message_id
  FROM wa_ingest_statuses($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                          $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                          $11::text[]) AS message_id

-- name: claim_conversation
-- Moves the fence on and audits the claim, in one statement. $3: the states the machine lets a
-- conversation leave for 'active'.
WITH previous AS (
    SELECT status FROM webhook_conversations WHERE id = $1
), claimed AS (
    UPDATE webhook_conversations
       SET fence_token = fence_token + 1, status = 'active', lock_owner = $2, locked_at = now(),
           updated_at = now()
     WHERE id = $1 AND status = ANY ($3::text[])
    RETURNING id, fence_token
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, entity, from_state, to_state, reason, fence_token)
    SELECT c.id, 'conversation', p.status, 'active',
           CASE WHEN p.status = 'idle' THEN 'claimed' ELSE 'taken over from a previous holder'
           END || ' by ' || $2, c.fence_token
      FROM claimed c, previous p
)
SELECT c.fence_token, p.status AS previous FROM claimed c, previous p

-- name: claim_turn
-- claim_conversation, then start_turn with the new token: db/migrations/0015; when nothing
-- waits, release_conversation from the states $4 (NULL: not): db/migrations/0020.
SELECT * FROM wa_claim_turn($1, $2, $3, $4)

-- name: claim_turns
-- claim_turn of each conversation $1 (owner $2, alike in $3 and $4), in one statement and one
-- transaction, in the order ingest locks conversations; each row's ord is its place in $1:
-- db/migrations/0022.
SELECT * FROM wa_claim_turns($1, $2, $3, $4)

-- name: release_conversation
-- $3: the states the machine lets a conversation leave for 'idle'.
WITH released AS (
    UPDATE webhook_conversations
       SET status = 'idle', lock_owner = NULL, locked_at = NULL, updated_at = now()
     WHERE id = $1 AND fence_token = $2 AND status = ANY ($3::text[])
    RETURNING id, fence_token
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, entity, from_state, to_state, reason, fence_token)
    SELECT r.id, 'conversation', 'active', 'idle', 'no waiting messages', r.fence_token
      FROM released r
)
SELECT id FROM released

-- name: start_turn
SELECT * FROM wa_start_turn($1, $2)

-- name: finish_turn
-- transition_message, then (when it applied and $8 asks for it) start_turn of conversation $7
-- with the same token: db/migrations/0015; in between, the debounced burst $9 moved from $10
-- with reason $11: db/migrations/0018; the sent reply's id $12 (NULL: none to record) written
-- with the transition, and when the next turn finds nothing waiting, release_conversation from
-- the states $13 (NULL: not): db/migrations/0020.
SELECT * FROM wa_finish_turn($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)

-- name: finish_turns
-- finish_turn of each message $1 (to $2, reason $4, token $5, correlation id $6, conversation
-- $7, next turn asked $8, sent reply $9; alike in the sources $3 and the release's $10; no
-- burst), in one statement and one transaction, in the order ingest locks conversations; each
-- row's ord is its place in $1: db/migrations/0022.
SELECT * FROM wa_finish_turns($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)

-- name: transition_message
SELECT * FROM wa_transition_message($1, $2, $3, $4, $5, $6)

-- name: record_transition
INSERT INTO conversation_state_transitions
    (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
     correlation_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)

-- name: has_waiting
SELECT EXISTS (
    SELECT 1 FROM processed_webhook_messages
     WHERE conversation_id = $1 AND status IN ('received', 'processing'))

-- name: waiting_among
-- Which of these conversations have messages waiting or in flight (a stopping replica's
-- hand-back names only those; holders' looks after their releases, many at once). Each
-- stops at its first such message (a conversation with a backlog has many).
SELECT DISTINCT c.id AS conversation_id
  FROM unnest($1::bigint[]) AS c(id)
 WHERE EXISTS (
    SELECT 1 FROM processed_webhook_messages m
     WHERE m.conversation_id = c.id AND m.status IN ('received', 'processing'))

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
SELECT message_id, conversation_id, status_reason, payload, correlation_id, traceparent
  FROM processed_webhook_messages
 WHERE status = 'failed' AND finished_at < now() - make_interval(secs => $1)
 ORDER BY finished_at
 LIMIT $2

-- name: timeline_messages
SELECT m.message_id, m.message_type, m.status, m.status_reason, m.body, m.reply_text,
       m.reply_message_id, m.reply_status, m.correlation_id, m.traceparent, m.received_at,
       m.conversation_id, m.attempts, m.reply_error_code,
       -- A long reply's parts, and how many of them Meta could not deliver.
       p.parts AS reply_parts, p.failed AS reply_parts_failed
  FROM processed_webhook_messages m
  LEFT JOIN LATERAL (
      SELECT count(*) AS parts, count(*) FILTER (WHERE r.reply_status = 'failed') AS failed
        FROM agent_reply_parts r WHERE r.message_id = m.message_id
  ) p ON true
 WHERE m.conversation_id = $1 AND m.kind = 'message'
 ORDER BY m.wa_timestamp DESC, m.id DESC
 LIMIT $2

-- name: record_stale_send
-- The reply $2 a turn sent for message $1, whose final transition was refused (a later holder
-- took the conversation while it ran): recorded all the same where no reply is recorded yet,
-- as a status webhook's confirmation is (ingest_statuses). Not fenced: Meta has the reply
-- whoever holds the conversation now, and the later holder's run of the turn, which finds the
-- send in flight, must find it rather than send the reply again.
UPDATE processed_webhook_messages m
   SET reply_message_id = $2,
       reply_status = (SELECT seen FROM wa_reply_status_seen($2) seen),
       updated_at = now()
 WHERE m.message_id = $1 AND m.kind = 'message' AND m.reply_message_id IS NULL
RETURNING m.id

-- name: conversation_of_message
SELECT conversation_id FROM processed_webhook_messages WHERE message_id = $1

-- name: conversation_of_customer
-- The customer's most recent conversation, named by phone number, BSUID or username (with or
-- without its "@"; a username is only a way to find a customer, never a key).
SELECT id FROM (
    SELECT id, last_activity_at FROM webhook_conversations WHERE wa_id = $1
    UNION ALL
    SELECT id, last_activity_at FROM webhook_conversations WHERE user_id = $1
    UNION ALL
    SELECT id, last_activity_at FROM webhook_conversations
     WHERE lower(username) = lower(ltrim($1, '@')) AND username IS NOT NULL
) c
ORDER BY last_activity_at DESC
LIMIT 1

-- name: performance_stats
-- delivery_failed: our messages Meta reported it could not deliver (status `failed`).
SELECT s.*,
       (SELECT count(*) FROM processed_webhook_messages f
         WHERE f.kind = 'status' AND f.reply_status = 'failed'
           AND f.received_at >= now() - make_interval(secs => ($1::numeric * 3600)::float8))
           AS delivery_failed
  FROM get_webhook_performance_stats($1::numeric) s

-- name: system_health
SELECT * FROM check_webhook_system_health()

-- name: timeline_transitions
SELECT message_id, entity, from_state, to_state, reason, correlation_id, created_at
  FROM conversation_state_transitions
 WHERE conversation_id = $1
 ORDER BY created_at DESC, id DESC
 LIMIT $2

-- name: record_stuck_timeout
-- The monitoring views and check_webhook_system_health() judge "stuck" by this.
INSERT INTO wa_runtime_settings (name, value) VALUES ('stuck_timeout_seconds', $1)
ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()

-- name: ingest_events
-- Customer events (a BSUID changed, marketing preferences), each stored once under its
-- deterministic id, as skipped rows of kind 'event' with what they said; returns the ones
-- stored now, which the caller then applies.
WITH input AS (
    SELECT *
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::text[],
                  $12::text[])
           AS t(event_id, phone_number_id, kind, wa_id, user_id, previous_user_id,
                preference, ts, payload, correlation_id, traceparent, previous_wa_id)
)
INSERT INTO processed_webhook_messages
    (message_id, kind, conversation_id, phone_number_id, wa_id, user_id, message_type,
     wa_timestamp, payload, status, status_reason, correlation_id, traceparent)
SELECT i.event_id, 'event',
       -- The conversation it is about: by the old BSUID, else the old number (one known by
       -- its number alone), else the customer's current key.
       COALESCE((SELECT c.id FROM webhook_conversations c
                  WHERE c.phone_number_id = i.phone_number_id
                    AND c.customer_id = NULLIF(i.previous_user_id, '')),
                (SELECT c.id FROM webhook_conversations c
                  WHERE c.phone_number_id = i.phone_number_id
                    AND c.customer_id = NULLIF(i.previous_wa_id, '')),
                (SELECT c.id FROM webhook_conversations c
                  WHERE c.phone_number_id = i.phone_number_id
                    AND c.customer_id = COALESCE(NULLIF(i.user_id, ''), i.wa_id))),
       i.phone_number_id, i.wa_id, NULLIF(i.user_id, ''), i.kind, i.ts, i.payload::jsonb,
       'skipped',
       CASE i.kind
           WHEN 'user_id_update' THEN
               CASE WHEN i.previous_user_id = ''
                    THEN 'customer event: phone number ' || i.previous_wa_id || ' is now '
                         || i.wa_id
                    ELSE 'customer event: BSUID ' || i.previous_user_id || ' is now ' || i.user_id
               END
           ELSE 'customer event: marketing messages ' || i.preference
       END,
       i.correlation_id, i.traceparent
  FROM input i
 WHERE NOT EXISTS (SELECT 1 FROM wa_message_tombstones z
                    WHERE z.id_hash = sha256(convert_to(i.event_id, 'UTF8')))
 ORDER BY i.event_id
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id

-- name: apply_user_id_update
-- The customer's BSUID changed ($1 -> $2; Meta issues a new one when the phone number
-- changes, $4 is then the new number): every conversation keyed by the old one takes the new
-- one, with its context and history. A customer known to business number $6 by its phone
-- number alone (no BSUID yet: a conversation from before them, or Meta's shape before them,
-- which names no BSUID, $1 and $2 empty) changed its number from $5 to $4: that conversation
-- takes the new BSUID, or else the new number, as its key. One that cannot (a conversation
-- under the new key exists already: the two are not merged; or, for the number's, the
-- customer's BSUID has one of this business number) keeps its history under a key no delivery
-- names, without the number: carriers give numbers out again, and the next owner must not
-- find it. Either way each keeps the identifiers it was and is known by
-- (webhook_conversation_aliases, db/migrations/0031), so that `wa forget` of any of them
-- finds it.
WITH by_bsuid AS (
    SELECT c.id FROM webhook_conversations c WHERE c.user_id = $1 AND $1 <> '' AND $2 <> ''
), by_number AS (
    SELECT c.id
      FROM webhook_conversations c
     WHERE c.phone_number_id = $6 AND c.customer_id = $5 AND c.user_id IS NULL AND $5 <> ''
), old AS MATERIALIZED (
    -- Locked in the order ingest takes conversation rows (by business number and key). The
    -- conditions again: re-checked on a row another transaction changed meanwhile.
    SELECT c.id, c.phone_number_id, c.wa_id, c.parent_user_id, c.user_id
      FROM webhook_conversations c
     WHERE c.id IN (SELECT id FROM by_bsuid UNION ALL SELECT id FROM by_number)
       AND ((c.user_id = $1 AND $1 <> '' AND $2 <> '')
            OR (c.phone_number_id = $6 AND c.customer_id = $5 AND c.user_id IS NULL))
     ORDER BY c.phone_number_id, c.customer_id
       FOR UPDATE
), target AS (
    SELECT o.id,
           COALESCE(NULLIF($2, ''), $4) <> ''
           -- The number's conversation only where the BSUID has none on that business number:
           -- two rows cannot take one key.
           AND (o.user_id IS NOT NULL
                OR NOT EXISTS (SELECT 1 FROM old b
                                WHERE b.user_id IS NOT NULL
                                  AND b.phone_number_id = o.phone_number_id))
           AND NOT EXISTS (SELECT 1 FROM webhook_conversations d
                            WHERE d.phone_number_id = o.phone_number_id
                              AND d.customer_id = COALESCE(NULLIF($2, ''), $4)) AS moves
      FROM old o
), moved AS (
    UPDATE webhook_conversations c
       SET customer_id = COALESCE(NULLIF($2, ''), $4), user_id = NULLIF($2, ''),
           parent_user_id = COALESCE(NULLIF($3, ''), c.parent_user_id),
           -- Meta issues a new BSUID when the phone number changes: the old number is no
           -- longer the customer's (replies to it would go astray), the new one is known only
           -- if shared.
           wa_id = NULLIF($4, ''),
           updated_at = now()
      FROM target t
     WHERE c.id = t.id AND t.moves
    RETURNING c.id
), kept AS (
    UPDATE webhook_conversations c
       SET customer_id = CASE WHEN c.user_id IS NULL THEN 'number-changed:' || c.id
                              ELSE c.customer_id END,
           wa_id = NULL,
           updated_at = now()
      FROM target t
     WHERE c.id = t.id AND NOT t.moves
), aliases AS (
    INSERT INTO webhook_conversation_aliases (alias, conversation_id)
    SELECT DISTINCT v.alias, o.id
      FROM old o
     CROSS JOIN LATERAL (VALUES (o.wa_id), (o.parent_user_id), ($1), ($2), (NULLIF($4, '')))
                        AS v (alias)
     WHERE v.alias <> ''
    ON CONFLICT DO NOTHING
)
SELECT id FROM moved

-- name: apply_user_preferences
-- Marketing messages stopped or resumed ($3), as of $4, by the customer of business number
-- $5: named by its BSUID, or by its phone number when Meta sent no BSUID. An older event never
-- overrides a newer one.
UPDATE webhook_conversations c
   SET marketing_preference = $3, marketing_preference_at = $4, updated_at = now()
 WHERE c.phone_number_id = $5
   AND ((c.user_id = $1 AND $1 <> '') OR ($1 = '' AND c.wa_id = $2 AND $2 <> ''))
   AND (c.marketing_preference_at IS NULL OR c.marketing_preference_at <= $4)
RETURNING c.id

-- name: timeline_customer
SELECT wa_id, user_id, username, contact_name FROM webhook_conversations WHERE id = $1
