-- A turn's functions keep one plan of each statement per connection (issue 16: PostgreSQL's
-- CPU per message).
--
-- PL/pgSQL plans a statement for its parameters' values the first five times a connection runs
-- it, then keeps a generic plan only if it is estimated to cost no more than those did. The
-- message's move in wa_transition_message never qualified once the business had answered
-- messages: its custom plans fold `CASE WHEN p_reply_message_id IS NULL ...` away, the generic
-- one keeps wa_reply_status_seen's lookup in the estimate, so PostgreSQL planned the UPDATE at
-- every run, which cost more than running it (~300 µs against ~100: 162 µs of planning a
-- message in `bench.e2e --statements 60` with pg_stat_statements.track_planning). The read of
-- the context in wa_start_turn was planned at 45 % of its runs in the same bench.
--
-- Every statement of both functions reads by a key whatever the parameters (a message by its
-- id, a conversation by its id, its waiting messages and context entries by conversation), so
-- the generic plan is the plan; test_context_entries checks wa_start_turn's with a million
-- entries. The setting holds while each function runs, nested calls included; a later
-- CREATE OR REPLACE of either function must repeat it (tests/integration/test_turn_plans.py).
ALTER FUNCTION wa_transition_message(text, text, text[], text, bigint, text, text)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION wa_start_turn(bigint, bigint)
    SET plan_cache_mode = force_generic_plan;

-- The ingest of messages and of delivery statuses, services/state/queries.sql's statements of
-- those names, moved here unchanged (their $n are the functions' arguments) so that they run
-- with a generic plan too. Sent as they were, PostgreSQL planned each at every run once the
-- tables held a business's history: a custom plan knows how many rows each unnest gives (one
-- or a few), the generic one assumes ten, so its estimate was the higher one for good.
-- Measured on 600,000 rows (tests/integration/test_turn_plans.py, with pg_stat_statements):
-- a delivery of one message cost 833 µs of planning and 269 of running, one of a status 842
-- and 157; with the generic plan 359 and 126, planned once per connection. In production each
-- reply brings two or three status webhooks: about 3 ms of PostgreSQL's CPU a customer's
-- message that the benchmark, on small tables, never saw.
CREATE FUNCTION wa_ingest_messages(
    text[], text[], text[], text[], text[], timestamptz[], text[], text[], text[], text[],
    text[], text[], text[], text[], text[], text[]
) RETURNS SETOF record
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
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
     ORDER BY g.ord;
END
$$;

CREATE FUNCTION wa_ingest_statuses(
    text[], text[], text[], text[], timestamptz[], text[], text[], text[], text[], text[],
    text[]
) RETURNS SETOF text
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
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
    SELECT message_id FROM ins;
END
$$;

-- The batched claims and final moves (0022) are one statement each, over arrays: as SQL
-- functions PostgreSQL 18 planned that statement at every call once the tables were large (the
-- custom plan knows how many items the arrays hold, the generic one assumes ten), and
-- PostgreSQL 15 plans every statement of a SQL function at every call anyway. As PL/pgSQL with
-- a generic plan, each connection plans it once. The statement is unchanged; every column in
-- it is qualified, so the output columns' names, variables in PL/pgSQL, meet none of it.

CREATE OR REPLACE FUNCTION wa_claim_turns(
    p_conversation_ids bigint[],
    p_owners text[],
    p_sources text[],
    p_release_from text[] DEFAULT NULL::text[]
) RETURNS TABLE (
    ord integer,
    claimed bigint,
    outcome text,
    fence_token bigint,
    id bigint,
    message_id text,
    conversation_id bigint,
    phone_number_id text,
    wa_id text,
    message_type text,
    wa_timestamp timestamp with time zone,
    body text,
    correlation_id text,
    traceparent text,
    attempts integer,
    turn_resumes integer,
    resumed boolean,
    queued_because text,
    contact_name text,
    user_id text,
    username text,
    payload text,
    reply_text text,
    reply_payload text,
    reply_message_id text,
    agent_type text,
    send_started_at timestamp with time zone,
    absorbed_message_ids text[],
    context_agent_type text,
    context text,
    last_customer_at timestamp with time zone,
    db_now timestamp with time zone,
    released boolean
)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- The sorted subquery is not flattened (it has an ORDER BY): the nested loop calls the
    -- function once per item, in that order. (A conversation that does not exist comes last;
    -- its claim finds nothing.)
    RETURN QUERY
        SELECT t.ord::integer, c.*
          FROM (SELECT u.conversation_id, u.owner, u.ord
                  FROM unnest(p_conversation_ids, p_owners)
                       WITH ORDINALITY AS u(conversation_id, owner, ord)
                  LEFT JOIN webhook_conversations w ON w.id = u.conversation_id
                 ORDER BY w.phone_number_id, w.customer_id, u.conversation_id, u.ord) AS t
         CROSS JOIN LATERAL wa_claim_turn(t.conversation_id, t.owner, p_sources,
                                          p_release_from) AS c;
END
$$;

CREATE OR REPLACE FUNCTION wa_finish_turns(
    p_message_ids text[],
    p_to_states text[],
    p_from text[],
    p_reasons text[],
    p_tokens bigint[],
    p_correlation_ids text[],
    p_conversation_ids bigint[],
    p_next boolean[],
    p_reply_message_ids text[],
    p_release_from text[] DEFAULT NULL::text[]
) RETURNS TABLE (
    ord integer,
    finished text,
    finished_from text,
    finished_fence bigint,
    outcome text,
    fence_token bigint,
    id bigint,
    message_id text,
    conversation_id bigint,
    phone_number_id text,
    wa_id text,
    message_type text,
    wa_timestamp timestamp with time zone,
    body text,
    correlation_id text,
    traceparent text,
    attempts integer,
    turn_resumes integer,
    resumed boolean,
    queued_because text,
    contact_name text,
    user_id text,
    username text,
    payload text,
    reply_text text,
    reply_payload text,
    reply_message_id text,
    agent_type text,
    send_started_at timestamp with time zone,
    absorbed_message_ids text[],
    context_agent_type text,
    context text,
    last_customer_at timestamp with time zone,
    db_now timestamp with time zone,
    absorbed text[],
    released boolean
)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
        SELECT t.ord::integer, f.*
          FROM (SELECT u.*
                  FROM unnest(p_message_ids, p_to_states, p_reasons, p_tokens, p_correlation_ids,
                              p_conversation_ids, p_next, p_reply_message_ids)
                       WITH ORDINALITY AS u(message_id, to_state, reason, token, correlation_id,
                                            conversation_id, next, reply_message_id, ord)
                  LEFT JOIN webhook_conversations w ON w.id = u.conversation_id
                 ORDER BY w.phone_number_id, w.customer_id, u.conversation_id, u.ord) AS t
         CROSS JOIN LATERAL wa_finish_turn(t.message_id, t.to_state, p_from, t.reason, t.token,
                                           t.correlation_id, t.conversation_id, t.next, '{}', '{}',
                                           '', t.reply_message_id, p_release_from) AS f;
END
$$;

-- A turn's session counters, once per save: a SQL function, whose INSERT PostgreSQL 15 planned
-- at every call (100 plans in 100 calls in tests/integration/test_turn_plans.py run against a
-- PostgreSQL 15 server with pg_stat_statements); PL/pgSQL keeps its plan per connection. The
-- statement is unchanged.
CREATE OR REPLACE FUNCTION increment_session_metrics(
    p_conversation_id bigint,
    p_agent_type text,
    p_turns integer,
    p_tokens_in bigint,
    p_tokens_out bigint,
    p_latency_ms bigint,
    p_errors integer,
    p_correlation_id text
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO agent_sessions AS s
        (conversation_id, agent_type, turns, tokens_in, tokens_out, total_latency_ms, errors,
         correlation_id)
    VALUES (p_conversation_id, p_agent_type, p_turns, p_tokens_in, p_tokens_out, p_latency_ms,
            p_errors, p_correlation_id)
    ON CONFLICT (conversation_id, agent_type) DO UPDATE
       SET turns = s.turns + EXCLUDED.turns,
           tokens_in = s.tokens_in + EXCLUDED.tokens_in,
           tokens_out = s.tokens_out + EXCLUDED.tokens_out,
           total_latency_ms = s.total_latency_ms + EXCLUDED.total_latency_ms,
           errors = s.errors + EXCLUDED.errors,
           correlation_id = EXCLUDED.correlation_id,
           last_active_at = now();
END
$$;
