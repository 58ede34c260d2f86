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
WITH given AS (
    SELECT *
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                  $6::timestamptz[], $7::text[], $8::text[], $9::text[], $10::text[],
                  $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                  $16::text[])
           WITH ORDINALITY AS t(message_id, phone_number_id, wa_id, contact_name,
                                correlation_id, wa_timestamp, message_type, body, payload,
                                status, reason, traceparent, user_id, parent_user_id,
                                username, referral, ord)
), raw AS (
    SELECT * FROM given g
     WHERE NOT EXISTS (SELECT 1 FROM wa_message_tombstones z
                        WHERE z.id_hash = sha256(convert_to(g.message_id, 'UTF8')))
), pairs AS (
    -- What this batch proves: this phone number and this BSUID are one customer.
    SELECT DISTINCT ON (phone_number_id, wa_id) phone_number_id, wa_id, user_id
      FROM raw
     WHERE user_id <> '' AND wa_id <> ''
     ORDER BY phone_number_id, wa_id, wa_timestamp DESC
), input AS (
    -- Each message's customer: its BSUID; else the BSUID its phone number goes with, in this
    -- batch or in a conversation that knows both; else the phone number. (COALESCE stops at
    -- the first value: the lookup runs only for a phone number without a BSUID.)
    SELECT r.*,
           COALESCE(NULLIF(r.user_id, ''), p.user_id,
                    (SELECT c.customer_id FROM webhook_conversations c
                      WHERE c.phone_number_id = r.phone_number_id AND c.wa_id = r.wa_id
                        AND c.user_id IS NOT NULL AND r.wa_id <> ''
                      ORDER BY c.last_activity_at DESC
                      LIMIT 1),
                    r.wa_id) AS customer_id
      FROM raw r
      LEFT JOIN pairs p
             ON r.user_id = '' AND p.phone_number_id = r.phone_number_id AND p.wa_id = r.wa_id
), keys AS (
    SELECT DISTINCT ON (phone_number_id, customer_id) *
      FROM input
     ORDER BY phone_number_id, customer_id, wa_timestamp DESC
), fresh AS (
    -- Each conversation's messages in this batch that are not stored yet, as this statement
    -- sees the table: counted into message_count by the one update of the conversation row.
    SELECT i.phone_number_id, i.customer_id, count(DISTINCT i.message_id)::integer AS added,
           array_agg(DISTINCT i.message_id) AS ids
      FROM input i
     WHERE NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                        WHERE m.message_id = i.message_id)
     GROUP BY i.phone_number_id, i.customer_id
), adoptable AS MATERIALIZED (
    -- Each BSUID of this batch with its phone number: the conversation keyed by that number,
    -- if any, becomes the BSUID's. One relation holds the whole key of both lookups below, so
    -- each probes the unique (phone_number_id, customer_id) index with both columns: joined
    -- to `pairs` and `keys` apart, a plan can take phone_number_id from one of them alone
    -- and read the business number's every conversation per message, as it did while the
    -- table's statistics were an empty table's (db/migrations/0027).
    SELECT k.*, p.wa_id AS phone_customer_id
      FROM pairs p
      JOIN keys k ON k.phone_number_id = p.phone_number_id AND k.customer_id = p.user_id
), adopt AS (
    UPDATE webhook_conversations c
       SET customer_id = a.customer_id, user_id = a.customer_id,
           wa_id = COALESCE(NULLIF(a.wa_id, ''), a.phone_customer_id),
           parent_user_id = COALESCE(NULLIF(a.parent_user_id, ''), c.parent_user_id),
           username = COALESCE(NULLIF(a.username, ''), c.username),
           contact_name = COALESCE(NULLIF(a.contact_name, ''), c.contact_name),
           last_message_at = GREATEST(c.last_message_at, a.wa_timestamp),
           last_activity_at = now(), updated_at = now(),
           -- (rare: counted with a fresh snapshot, whoever changed the row since this began)
           message_count = c.message_count + wa_unstored_messages(
               (SELECT f.ids FROM fresh f
                 WHERE f.phone_number_id = a.phone_number_id AND f.customer_id = a.customer_id))
      FROM adoptable a
     WHERE c.phone_number_id = a.phone_number_id AND c.customer_id = a.phone_customer_id
       AND NOT EXISTS (SELECT 1 FROM webhook_conversations d
                        WHERE d.phone_number_id = a.phone_number_id
                          AND d.customer_id = a.customer_id)
    RETURNING c.id, c.phone_number_id, c.customer_id
), created AS (
    INSERT INTO webhook_conversations AS c
        (phone_number_id, customer_id, wa_id, user_id, parent_user_id, username, contact_name,
         correlation_id, last_message_at, message_count)
    SELECT k.phone_number_id, k.customer_id, NULLIF(k.wa_id, ''), NULLIF(k.user_id, ''),
           NULLIF(k.parent_user_id, ''), NULLIF(k.username, ''), NULLIF(k.contact_name, ''),
           k.correlation_id, k.wa_timestamp, COALESCE(f.added, 0)
      FROM keys k
      LEFT JOIN fresh f ON f.phone_number_id = k.phone_number_id
                       AND f.customer_id = k.customer_id
     WHERE NOT EXISTS (SELECT 1 FROM adopt a
                        WHERE a.phone_number_id = k.phone_number_id
                          AND a.customer_id = k.customer_id)
     ORDER BY k.phone_number_id, k.customer_id
    ON CONFLICT (phone_number_id, customer_id) DO UPDATE
        SET contact_name = COALESCE(EXCLUDED.contact_name, c.contact_name),
            wa_id = COALESCE(EXCLUDED.wa_id, c.wa_id),
            user_id = COALESCE(EXCLUDED.user_id, c.user_id),
            parent_user_id = COALESCE(EXCLUDED.parent_user_id, c.parent_user_id),
            username = COALESCE(EXCLUDED.username, c.username),
            last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
            last_activity_at = now(),
            -- The count this statement's snapshot saw is still the row's: no message was
            -- added to it since, `fresh` holds. Else (a concurrent delivery of the same
            -- messages, committed while this one waited for the row) count with a fresh
            -- snapshot.
            message_count = c.message_count
                + CASE WHEN c.message_count = (SELECT s.message_count
                                                 FROM webhook_conversations s
                                                WHERE s.id = c.id)
                       THEN EXCLUDED.message_count
                       ELSE wa_unstored_messages(
                                (SELECT f.ids FROM fresh f
                                  WHERE f.phone_number_id = EXCLUDED.phone_number_id
                                    AND f.customer_id = EXCLUDED.customer_id))
                  END
    RETURNING id, phone_number_id, customer_id
), conv AS (
    SELECT * FROM adopt
    UNION ALL
    SELECT * FROM created
), msg AS (
    INSERT INTO processed_webhook_messages
        (message_id, kind, conversation_id, phone_number_id, wa_id, user_id, message_type,
         wa_timestamp, body, payload, status, status_reason, correlation_id, traceparent,
         referral)
    SELECT i.message_id, 'message', conv.id, i.phone_number_id, i.wa_id, NULLIF(i.user_id, ''),
           i.message_type, i.wa_timestamp, NULLIF(i.body, ''), i.payload::jsonb, i.status,
           NULLIF(i.reason, ''), i.correlation_id, i.traceparent,
           NULLIF(i.referral, '')::jsonb
      FROM input i JOIN conv USING (phone_number_id, customer_id)
     ORDER BY i.message_id
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id, conversation_id, status, status_reason, correlation_id
), audit AS (
    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, correlation_id)
    SELECT conversation_id, message_id, 'message', NULL, status,
           COALESCE(status_reason, 'ingested'), correlation_id
      FROM msg
)
SELECT g.ord, g.message_id, COALESCE(conv.id, 0) AS conversation_id, msg.status
  FROM given g
  LEFT JOIN input i ON i.ord = g.ord
  LEFT JOIN conv ON conv.phone_number_id = i.phone_number_id
                AND conv.customer_id = i.customer_id
  LEFT JOIN msg ON msg.message_id = i.message_id
 ORDER BY g.ord

-- name: ingest_statuses
-- Delivery statuses, each stored once per (outbound id, status); the outbound message's
-- delivery state only moves forward (read never goes back to sent).
WITH input AS (
    SELECT *
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                  $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
           AS t(outbound_id, phone_number_id, recipient_id, status, ts, payload, error_code,
                correlation_id, traceparent, callback_data, recipient_user_id)
), ins AS (
    INSERT INTO processed_webhook_messages
        (message_id, kind, conversation_id, phone_number_id, wa_id, user_id, message_type,
         wa_timestamp, body, payload, status, status_reason, reply_message_id, reply_status,
         reply_error_code, correlation_id, traceparent)
    SELECT 'status:' || i.outbound_id || ':' || i.status, 'status',
           -- The conversation of the reply it is about; else the recipient's, named by BSUID
           -- (a reply to a customer with a username has no recipient_id) or phone number.
           COALESCE(
               (SELECT m.conversation_id FROM processed_webhook_messages m
                 WHERE m.reply_message_id = i.outbound_id AND m.kind = 'message' LIMIT 1),
               (SELECT c.id FROM webhook_conversations c
                 WHERE c.phone_number_id = i.phone_number_id
                   AND c.customer_id = NULLIF(i.recipient_user_id, '')),
               (SELECT c.id FROM webhook_conversations c
                 WHERE c.phone_number_id = i.phone_number_id
                   AND c.wa_id = NULLIF(i.recipient_id, '')
                 ORDER BY c.last_activity_at DESC
                 LIMIT 1)),
           i.phone_number_id, i.recipient_id, NULLIF(i.recipient_user_id, ''), 'status', i.ts,
           i.status, i.payload::jsonb,
           'skipped', 'status update: ' || i.status, i.outbound_id, i.status,
           NULLIF(i.error_code, ''), i.correlation_id, i.traceparent
      FROM input i
     -- Not about a reply erased by `wa forget` (its recipient's number is in it).
     WHERE NOT EXISTS (SELECT 1 FROM wa_message_tombstones z
                        WHERE z.id_hash = sha256(convert_to(i.outbound_id, 'UTF8')))
     ORDER BY 1
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
), best AS (
    SELECT DISTINCT ON (outbound_id) outbound_id, status, error_code
      FROM input
     ORDER BY outbound_id, wa_delivery_rank(status) DESC
), locked AS MATERIALIZED (
    -- The messages the updates below may change, locked in the order a batch of turns' final
    -- statements takes them (wa_finish_turns: by conversation, each conversation's row before
    -- its messages'). Locked in the updates' own join order, a status for a reply whose turn
    -- is still finishing could hold one message of that batch while waiting for another, and
    -- PostgreSQL would break the cycle after deadlock_timeout by failing one of the two.
    -- (Both updates read their rows from here, so every row they change is locked by now.)
    SELECT m.id
      FROM processed_webhook_messages m
      LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
     WHERE m.id IN (SELECT t.id FROM processed_webhook_messages t, best b
                     WHERE t.reply_message_id = b.outbound_id AND t.kind = 'message'
                    UNION ALL
                    SELECT t.id FROM processed_webhook_messages t, input i
                     WHERE t.message_id = i.callback_data AND i.callback_data <> ''
                       AND t.kind = 'message')
     ORDER BY c.phone_number_id, c.customer_id, m.conversation_id, m.id
       FOR NO KEY UPDATE OF m
), confirm AS (
    -- A reply whose send was never recorded (its turn died mid-send) is confirmed by the
    -- status webhook that carries our callback data: the inbound message id. `failed` is
    -- no proof that the customer has it: that send is made again.
    UPDATE processed_webhook_messages m
       SET reply_message_id = i.outbound_id, reply_status = i.status,
           reply_confirmed_by = 'status webhook: ' || i.status, send_started_at = NULL,
           updated_at = now()
      FROM input i, locked l
     WHERE i.callback_data <> '' AND m.message_id = i.callback_data AND m.kind = 'message'
       AND m.reply_message_id IS NULL AND i.status <> 'failed' AND m.id = l.id
    RETURNING m.id
), part_status AS (
    -- A part of a long reply (callback data '<message id>#<part>'): its furthest delivery
    -- state, and the confirmation of a send its turn never recorded (never by `failed`).
    SELECT DISTINCT ON (i.callback_data)
           split_part(i.callback_data, '#', 1) AS message_id,
           split_part(i.callback_data, '#', 2)::integer AS part,
           i.outbound_id, i.status, i.error_code
      FROM input i
     WHERE i.callback_data ~ '^[^#]+#[0-9]{1,6}$'
     ORDER BY i.callback_data, i.status = 'failed', wa_delivery_rank(i.status) DESC
), parts AS (
    UPDATE agent_reply_parts p
       SET sent_id = COALESCE(p.sent_id, CASE WHEN s.status <> 'failed' THEN s.outbound_id END),
           send_started_at = CASE WHEN p.sent_id IS NULL AND s.status <> 'failed' THEN NULL
                                  ELSE p.send_started_at END,
           confirmed_by = CASE WHEN p.sent_id IS NULL AND s.status <> 'failed'
                               THEN 'status webhook: ' || s.status ELSE p.confirmed_by END,
           reply_status = CASE WHEN wa_delivery_rank(s.status) > wa_delivery_rank(p.reply_status)
                               THEN s.status ELSE p.reply_status END,
           reply_error_code = COALESCE(NULLIF(s.error_code, ''), p.reply_error_code)
      FROM part_status s
     WHERE p.message_id = s.message_id AND p.part = s.part
    RETURNING p.part
), upd AS (
    UPDATE processed_webhook_messages m
       SET reply_status = b.status,
           reply_error_code = COALESCE(NULLIF(b.error_code, ''), m.reply_error_code),
           updated_at = now()
      FROM best b, locked l
     WHERE m.reply_message_id = b.outbound_id AND m.kind = 'message'
       AND wa_delivery_rank(m.reply_status) < wa_delivery_rank(b.status) AND m.id = l.id
    RETURNING m.id
)
SELECT message_id FROM ins

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
-- hand-back names only those).
SELECT DISTINCT conversation_id
  FROM processed_webhook_messages
 WHERE conversation_id = ANY ($1::bigint[]) AND status IN ('received', 'processing')

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
                  $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::text[])
           AS t(event_id, phone_number_id, kind, wa_id, user_id, previous_user_id,
                preference, ts, payload, correlation_id, traceparent)
)
INSERT INTO processed_webhook_messages
    (message_id, kind, conversation_id, phone_number_id, wa_id, user_id, message_type,
     wa_timestamp, payload, status, status_reason, correlation_id, traceparent)
SELECT i.event_id, 'event',
       (SELECT c.id FROM webhook_conversations c
         WHERE c.phone_number_id = i.phone_number_id
           AND c.customer_id = COALESCE(NULLIF(i.previous_user_id, ''), NULLIF(i.user_id, ''),
                                        i.wa_id)),
       i.phone_number_id, i.wa_id, NULLIF(i.user_id, ''), i.kind, i.ts, i.payload::jsonb,
       'skipped',
       CASE i.kind
           WHEN 'user_id_update' THEN 'customer event: BSUID ' || i.previous_user_id
                                      || ' is now ' || i.user_id
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
-- one, with its context and history. One that a message under the new BSUID has already
-- started is left as it is (the two are not merged). Either way each keeps the identifiers it
-- was and is known by (webhook_conversation_aliases, db/migrations/0031), so that `wa forget`
-- of any of them finds it.
WITH old AS MATERIALIZED (
    -- Locked in the order ingest takes conversation rows (by business number and key).
    SELECT c.id, c.phone_number_id, c.wa_id, c.parent_user_id
      FROM webhook_conversations c
     WHERE c.user_id = $1 AND $1 <> '' AND $2 <> ''
     ORDER BY c.phone_number_id, c.customer_id
       FOR UPDATE
), moved AS (
    UPDATE webhook_conversations c
       SET customer_id = $2, user_id = $2,
           parent_user_id = COALESCE(NULLIF($3, ''), c.parent_user_id),
           -- Meta issues a new BSUID when the phone number changes: the old number is no
           -- longer the customer's (replies to it would go astray), the new one is known only
           -- if shared.
           wa_id = NULLIF($4, ''),
           updated_at = now()
      FROM old o
     WHERE c.id = o.id
       AND NOT EXISTS (SELECT 1 FROM webhook_conversations d
                        WHERE d.phone_number_id = o.phone_number_id AND d.customer_id = $2)
    RETURNING c.id
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
