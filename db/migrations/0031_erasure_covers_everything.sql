-- Erasure and retention cover a person's replies, the context's entries, and a customer's
-- earlier phone numbers and BSUIDs, and say so; retention covers the context of a
-- conversation that goes on, and the name of a customer who stopped marketing messages.
--
-- wa_forget_customer (0013) left two things to the cascades of the rows they belong to:
-- operator_replies (a person's replies to the customer, with their text: 0017) went with the
-- conversation, agent_context_entries (0030) with the context. Both were erased, neither was
-- in the report `wa forget` prints nor in the erasure audit. Worse, the ids of a person's
-- replies were not kept as tombstones: a late status of one (Meta sends `read` whenever the
-- customer opens it, days later) was stored again as a status row naming the customer's
-- number, after the customer had been forgotten. Now both are deleted and counted, and a
-- person's reply ids join the tombstones (ingest drops a status about a tombstoned id).
--
-- wa_prune never pruned a person's replies on their own: they went only with their
-- conversation, so a conversation whose customer kept writing kept every reply of a person
-- for ever, against RETENTION_DAYS. Now each pass deletes the replies sent (or never sent)
-- before the cutoff, whatever their conversation does, and a conversation is deleted only
-- once none is left (a person's reply younger than the cutoff keeps its conversation, like
-- a message would). Both tables are in the report and the audit; the entries of the contexts
-- of idle conversations still go by cascade, counted in the same statement. And the console's
-- audit trail keeps no reply's text (below).
CREATE INDEX operator_replies_created_idx ON operator_replies (created_at);

-- `wa forget` found a customer's conversations by what the conversation row holds now. When
-- Meta changes a customer's BSUID (and phone number), the conversation takes the new ones
-- (services/state/queries.sql, apply_user_id_update): forgetting the old number then found
-- nothing, though every message under it, with its text and the customer's name, was still
-- there. And a conversation the old BSUID had, left as it was because the new one already
-- had its own (the two are not merged), was missed by forgetting the new BSUID. Each
-- conversation now keeps the identifiers it was known by (the state service writes them with
-- the change), and forgetting any of them erases it. Backfilled from what the messages of
-- each conversation name: the BSUID change's own event row is stored in the old
-- conversation with the new BSUID (one full read of processed_webhook_messages, at upgrade).
CREATE TABLE webhook_conversation_aliases (
    alias text NOT NULL CHECK (alias <> ''),
    conversation_id bigint NOT NULL REFERENCES webhook_conversations (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alias, conversation_id)
);
CREATE INDEX webhook_conversation_aliases_conversation_idx
    ON webhook_conversation_aliases (conversation_id);
ALTER TABLE webhook_conversation_aliases ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY wa_owner ON webhook_conversation_aliases
    USING ((SELECT wa_owns('webhook_conversation_aliases')))
    WITH CHECK ((SELECT wa_owns('webhook_conversation_aliases')));

INSERT INTO webhook_conversation_aliases (alias, conversation_id)
SELECT DISTINCT v.alias, m.conversation_id
  FROM processed_webhook_messages m
  JOIN webhook_conversations c ON c.id = m.conversation_id
 CROSS JOIN LATERAL (VALUES (m.wa_id), (m.user_id)) AS v (alias)
 WHERE v.alias <> ''
   AND v.alias IS DISTINCT FROM c.wa_id AND v.alias IS DISTINCT FROM c.user_id
   AND v.alias IS DISTINCT FROM c.customer_id AND v.alias IS DISTINCT FROM c.parent_user_id;

-- The context of a conversation that goes on was kept whatever its age: wa_prune deleted a
-- context only with its idle conversation, and a save trims it by count only (the newest
-- AGENT_CONTEXT_MAX_MESSAGES), so a customer who writes every few weeks kept a year of
-- messages in it, against RETENTION_DAYS ("finished work and its history older than this is
-- pruned"). An entry now knows when it began and takes messages for one day at most (a save
-- starts a new entry after that: wa_save_turn below), so one that began a day before the
-- cutoff holds nothing younger than it, and a pass deletes it by that date alone (an index
-- entry per entry, not per message; the appends stay HOT). The agent reads what is left, as
-- it reads a context trimmed by count. Entries from before this are dated by their
-- context's last save less a day: what they hold is no younger than that save.
ALTER TABLE agent_context_entries ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
UPDATE agent_context_entries e
   SET created_at = a.updated_at - interval '1 day'
  FROM agent_contexts a
 WHERE a.conversation_id = e.conversation_id;
CREATE INDEX agent_context_entries_created_idx ON agent_context_entries (created_at);

CREATE OR REPLACE FUNCTION wa_save_turn(p_conversation_id bigint, p_token bigint, p_message_id text, p_agent_type text, p_previous_agent_type text, p_appended json, p_keep integer, p_token_count integer, p_reply_text text, p_tokens_in bigint, p_tokens_out bigint, p_latency_ms bigint, p_correlation_id text, p_send_started boolean, p_reply_payload jsonb) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_fence bigint;
    v_added integer;
    v_last bigint;
    v_text text;
BEGIN
    IF p_keep IS NULL OR p_keep < 1 THEN
        RAISE EXCEPTION 'wa_save_turn: a context keeps at least one message (p_keep %)', p_keep;
    END IF;
    IF json_typeof(p_appended) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'wa_save_turn: the messages appended are not a JSON array';
    END IF;
    SELECT c.fence_token INTO v_fence
      FROM webhook_conversations c
     WHERE c.id = p_conversation_id
       FOR SHARE;
    IF v_fence IS DISTINCT FROM p_token THEN
        RETURN v_fence;
    END IF;

    v_added := json_array_length(p_appended);
    INSERT INTO agent_contexts AS a
        (conversation_id, agent_type, token_count, fence_token, correlation_id, last_seq)
    VALUES (p_conversation_id, p_agent_type, p_token_count, p_token, p_correlation_id,
            v_added)
    ON CONFLICT (conversation_id) DO UPDATE
       SET agent_type = EXCLUDED.agent_type,
           token_count = EXCLUDED.token_count,
           fence_token = EXCLUDED.fence_token,
           correlation_id = EXCLUDED.correlation_id,
           last_seq = a.last_seq + EXCLUDED.last_seq,
           updated_at = now()
    RETURNING a.last_seq INTO v_last;
    IF v_added > 0 THEN
        v_text := btrim(p_appended::text);
        v_text := substr(v_text, 2, length(v_text) - 2);
        -- To the newest entry (its last message is v_last - v_added: numbers are given in
        -- order, under this row's lock) while it stays under 1,800 bytes and a day old; else a
        -- new one.
        UPDATE agent_context_entries x
           SET messages = x.messages || ',' || v_text, n = x.n + v_added
         WHERE x.conversation_id = p_conversation_id
           AND x.seq = (SELECT max(y.seq) FROM agent_context_entries y
                         WHERE y.conversation_id = p_conversation_id)
           AND octet_length(x.messages) + octet_length(v_text) < 1800
           -- An entry holds one day of messages at most: retention deletes it whole, by
           -- its age (wa_prune).
           AND x.created_at > now() - interval '1 day';
        IF NOT FOUND THEN
            INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
            VALUES (p_conversation_id, v_last - v_added + 1, v_added, v_text);
        END IF;
    END IF;
    -- The entries whose messages all fell out of the bound (the agent keeps the newest p_keep
    -- of what it reads).
    DELETE FROM agent_context_entries x
     WHERE x.conversation_id = p_conversation_id AND x.seq + x.n - 1 <= v_last - p_keep;

    UPDATE processed_webhook_messages m
       SET reply_text = p_reply_text,
           reply_payload = p_reply_payload,
           agent_type = p_agent_type,
           send_started_at = CASE WHEN p_send_started THEN now() ELSE m.send_started_at END,
           updated_at = now()
     WHERE m.message_id = p_message_id;

    IF p_agent_type IS DISTINCT FROM p_previous_agent_type THEN
        INSERT INTO conversation_state_transitions
            (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
             correlation_id)
        VALUES (p_conversation_id, p_message_id, 'agent', p_previous_agent_type, p_agent_type,
                'routed by keyword in message ' || p_message_id, p_token, p_correlation_id);
    END IF;

    PERFORM increment_session_metrics(p_conversation_id, p_agent_type, 1, p_tokens_in,
                                      p_tokens_out, p_latency_ms, 0, p_correlation_id);
    RETURN v_fence;
END
$$;

CREATE OR REPLACE FUNCTION wa_forget_customer(p_customer text, p_requested_by text) RETURNS TABLE(table_name text, rows bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
#variable_conflict use_column
DECLARE
    v_convs bigint[];
    v_keys text[];
    v_ids text[];
    n_msg bigint;
    n_parts bigint;
    n_trans bigint;
    n_dlq bigint;
    n_ctx bigint;
    n_entries bigint;
    n_sess bigint;
    n_ops bigint;
    n_alias bigint;
    n_conv bigint;
    n_tomb bigint;
    v_counts jsonb;
BEGIN
    IF p_customer IS NULL OR btrim(p_customer) = '' THEN
        RAISE EXCEPTION 'name a customer: a phone number or a BSUID'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Locked first: whatever would refer to them (an ingest, a transition, a dead-letter
    -- item) waits until they are gone.
    SELECT coalesce(array_agg(id), '{}') INTO v_convs FROM (
        SELECT c.id FROM webhook_conversations c
         WHERE c.wa_id = p_customer OR c.user_id = p_customer
            OR c.customer_id = p_customer OR c.parent_user_id = p_customer
            OR c.id IN (SELECT a.conversation_id FROM webhook_conversation_aliases a
                         WHERE a.alias = p_customer)
         ORDER BY c.id
           FOR UPDATE) x;
    -- The customer's identifiers: the one given, and what their conversations hold now (not
    -- their earlier ones: a phone number given up may be someone else's by now). Status and
    -- event rows without a conversation are found by these.
    SELECT coalesce(array_agg(DISTINCT k), '{}') INTO v_keys FROM (
        SELECT p_customer
        UNION ALL
        SELECT unnest(ARRAY[c.wa_id, c.user_id, c.customer_id, c.parent_user_id])
          FROM webhook_conversations c
         WHERE c.id = ANY (v_convs)) x (k)
     WHERE k IS NOT NULL AND k <> '';
    SELECT coalesce(array_agg(message_id), '{}') INTO v_ids FROM (
        SELECT m.message_id FROM processed_webhook_messages m
         WHERE m.conversation_id = ANY (v_convs)
        UNION
        SELECT m.message_id FROM processed_webhook_messages m
         WHERE m.conversation_id IS NULL AND m.wa_id = ANY (v_keys)
        UNION
        SELECT m.message_id FROM processed_webhook_messages m
         WHERE m.conversation_id IS NULL AND m.user_id = ANY (v_keys)) x;

    INSERT INTO wa_message_tombstones (id_hash)
    SELECT DISTINCT sha256(convert_to(i, 'UTF8')) FROM (
        SELECT m.message_id AS i FROM processed_webhook_messages m
         WHERE m.message_id = ANY (v_ids) AND m.kind <> 'status'
        UNION ALL
        SELECT m.reply_message_id FROM processed_webhook_messages m
         WHERE m.message_id = ANY (v_ids) AND m.reply_message_id IS NOT NULL
        UNION ALL
        SELECT p.sent_id FROM agent_reply_parts p
         WHERE p.message_id = ANY (v_ids) AND p.sent_id IS NOT NULL
        UNION ALL
        -- A person's replies: a late status of one names the customer's number too.
        SELECT r.sent_id FROM operator_replies r
         WHERE r.conversation_id = ANY (v_convs) AND r.sent_id IS NOT NULL) x
    ON CONFLICT (id_hash) DO NOTHING;
    GET DIAGNOSTICS n_tomb = ROW_COUNT;

    DELETE FROM agent_reply_parts p WHERE p.message_id = ANY (v_ids);
    GET DIAGNOSTICS n_parts = ROW_COUNT;
    DELETE FROM conversation_state_transitions t
     WHERE t.conversation_id = ANY (v_convs) OR t.message_id = ANY (v_ids);
    GET DIAGNOSTICS n_trans = ROW_COUNT;
    DELETE FROM webhook_dlq d
     WHERE d.conversation_id = ANY (v_convs) OR d.message_id = ANY (v_ids);
    GET DIAGNOSTICS n_dlq = ROW_COUNT;
    -- Deleted here, not left to the cascades of the rows they belong to: the report and the
    -- audit say what was erased.
    DELETE FROM operator_replies r WHERE r.conversation_id = ANY (v_convs);
    GET DIAGNOSTICS n_ops = ROW_COUNT;
    DELETE FROM agent_context_entries e WHERE e.conversation_id = ANY (v_convs);
    GET DIAGNOSTICS n_entries = ROW_COUNT;
    DELETE FROM agent_contexts a WHERE a.conversation_id = ANY (v_convs);
    GET DIAGNOSTICS n_ctx = ROW_COUNT;
    DELETE FROM agent_sessions s WHERE s.conversation_id = ANY (v_convs);
    GET DIAGNOSTICS n_sess = ROW_COUNT;
    DELETE FROM processed_webhook_messages m WHERE m.message_id = ANY (v_ids);
    GET DIAGNOSTICS n_msg = ROW_COUNT;
    DELETE FROM webhook_conversation_aliases a WHERE a.conversation_id = ANY (v_convs);
    GET DIAGNOSTICS n_alias = ROW_COUNT;
    DELETE FROM webhook_conversations c WHERE c.id = ANY (v_convs);
    GET DIAGNOSTICS n_conv = ROW_COUNT;

    v_counts := jsonb_build_object(
        'webhook_conversations', n_conv,
        'processed_webhook_messages', n_msg,
        'conversation_state_transitions', n_trans,
        'agent_reply_parts', n_parts,
        'webhook_dlq', n_dlq,
        'agent_contexts', n_ctx,
        'agent_context_entries', n_entries,
        'agent_sessions', n_sess,
        'operator_replies', n_ops,
        'webhook_conversation_aliases', n_alias,
        'wa_message_tombstones', n_tomb);
    INSERT INTO wa_erasure_audit (kind, counts, requested_by)
    VALUES ('forget', v_counts, p_requested_by);
    RETURN QUERY SELECT key, value::bigint FROM jsonb_each_text(v_counts);
END
$$;

-- A conversation whose customer stopped marketing messages is never pruned (the opt-out must
-- be honoured), and it kept the customer's name and username with it for ever. Once nothing
-- else of it is left, a pass clears both (reported as webhook_conversations.contact_name):
-- the phone number and BSUID the opt-out is about stay.
CREATE OR REPLACE FUNCTION wa_prune(p_days integer, p_batch integer, p_dry_run boolean) RETURNS TABLE(table_name text, rows bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
#variable_conflict use_column
DECLARE
    v_cutoff timestamptz;
    n_msg bigint := 0;
    n_other bigint := 0;
    n_parts bigint := 0;
    n_trans bigint := 0;
    n_trans_old bigint := 0;
    n_dlq bigint := 0;
    n_ctx bigint := 0;
    n_entries bigint := 0;
    n_sess bigint := 0;
    n_ops bigint := 0;
    n_alias bigint := 0;
    n_names bigint := 0;
    n_conv bigint := 0;
    n_tomb bigint := 0;
BEGIN
    IF p_days IS NULL OR p_days < wa_retention_min_days() THEN
        RAISE EXCEPTION 'retention of % days refused: at least % (Meta delivers a message '
                        'again for up to 7 days, and a pruned message id would then be '
                        'processed a second time)', p_days, wa_retention_min_days()
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 10000 THEN
        RAISE EXCEPTION 'batch of % rows refused: 1 to 10000', p_batch
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := now() - make_interval(days => p_days);

    IF p_dry_run THEN
        WITH doomed AS (
            SELECT m.message_id, m.kind FROM processed_webhook_messages m
             WHERE m.received_at < v_cutoff AND m.updated_at < v_cutoff
               AND (m.kind <> 'message'
                    OR m.status IN ('replied', 'skipped')
                    OR (m.status = 'dead_lettered'
                        AND NOT EXISTS (SELECT 1 FROM webhook_dlq d
                                         WHERE d.message_id = m.message_id
                                           AND d.status IN ('pending', 'retrying', 'dead'))))
        ), ops AS (
            SELECT r.id FROM operator_replies r
             WHERE r.created_at < v_cutoff AND coalesce(r.sent_at, r.created_at) < v_cutoff
        ), idle AS (
            SELECT c.* FROM webhook_conversations c
             WHERE c.status = 'idle' AND c.last_activity_at < v_cutoff
               AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                WHERE m.conversation_id = c.id
                                  AND m.status IN ('received', 'processing', 'failed'))
        ), gone AS (
            -- Idle conversations that nothing would refer to once the rest is pruned.
            SELECT i.id FROM idle i
             WHERE i.marketing_preference IS DISTINCT FROM 'stop'
               AND NOT EXISTS (
                   SELECT 1 FROM processed_webhook_messages m
                    WHERE m.conversation_id = i.id
                      AND m.message_id NOT IN (SELECT message_id FROM doomed))
               AND NOT EXISTS (
                   SELECT 1 FROM conversation_state_transitions t
                    WHERE t.conversation_id = i.id AND t.created_at >= v_cutoff
                      AND (t.message_id IS NULL
                           OR t.message_id NOT IN (SELECT message_id FROM doomed)))
               AND NOT EXISTS (
                   SELECT 1 FROM webhook_dlq d
                    WHERE d.conversation_id = i.id
                      AND NOT (d.status IN ('resolved', 'purged')
                               AND d.updated_at < v_cutoff))
               AND NOT EXISTS (
                   SELECT 1 FROM operator_replies r
                    WHERE r.conversation_id = i.id
                      AND r.id NOT IN (SELECT o.id FROM ops o))
        )
        SELECT (SELECT count(*) FROM doomed WHERE kind = 'message'),
               (SELECT count(*) FROM doomed WHERE kind <> 'message'),
               (SELECT count(*) FROM agent_reply_parts p JOIN doomed g USING (message_id)),
               (SELECT count(*) FROM conversation_state_transitions t
                 WHERE t.message_id IN (SELECT message_id FROM doomed)
                    OR (t.created_at < v_cutoff
                        AND (t.message_id IS NULL
                             OR NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                             WHERE m.message_id = t.message_id)))),
               (SELECT count(*) FROM webhook_dlq d
                 WHERE d.status IN ('resolved', 'purged') AND d.updated_at < v_cutoff),
               (SELECT count(*) FROM ops),
               (SELECT count(*) FROM agent_contexts a JOIN idle i ON i.id = a.conversation_id),
               (SELECT count(*) FROM agent_context_entries e
                 WHERE e.created_at < v_cutoff - interval '1 day'
                    OR e.conversation_id IN (SELECT i.id FROM idle i)),
               (SELECT count(*) FROM agent_sessions s JOIN idle i ON i.id = s.conversation_id),
               (SELECT count(*) FROM gone),
               (SELECT count(*) FROM webhook_conversation_aliases a
                  JOIN gone g ON g.id = a.conversation_id),
               (SELECT count(*) FROM idle i
                 WHERE i.marketing_preference = 'stop'
                   AND (i.contact_name IS NOT NULL OR i.username IS NOT NULL)
                   AND NOT EXISTS (
                       SELECT 1 FROM processed_webhook_messages m
                        WHERE m.conversation_id = i.id
                          AND m.message_id NOT IN (SELECT message_id FROM doomed))),
               (SELECT count(*) FROM wa_message_tombstones t WHERE t.forgotten_at < v_cutoff)
          INTO n_msg, n_other, n_parts, n_trans, n_dlq, n_ops, n_ctx, n_entries, n_sess,
               n_conv, n_alias, n_names, n_tomb;
    ELSE
        -- Messages, with their reply parts and transitions.
        WITH v AS (
            SELECT m.id, m.message_id FROM processed_webhook_messages m
             WHERE m.kind = 'message' AND m.received_at < v_cutoff AND m.updated_at < v_cutoff
               AND (m.status IN ('replied', 'skipped')
                    OR (m.status = 'dead_lettered'
                        AND NOT EXISTS (SELECT 1 FROM webhook_dlq d
                                         WHERE d.message_id = m.message_id
                                           AND d.status IN ('pending', 'retrying', 'dead'))))
             ORDER BY m.received_at
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED
        ), parts AS (
            DELETE FROM agent_reply_parts p USING v WHERE p.message_id = v.message_id
            RETURNING 1
        ), trans AS (
            DELETE FROM conversation_state_transitions t USING v
             WHERE t.message_id = v.message_id
            RETURNING 1
        ), gone AS (
            DELETE FROM processed_webhook_messages m USING v WHERE m.id = v.id
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM parts),
               (SELECT count(*) FROM trans)
          INTO n_msg, n_parts, n_trans;

        -- Delivery statuses and customer events (always stored as skipped).
        WITH v AS (
            SELECT m.id FROM processed_webhook_messages m
             WHERE m.kind <> 'message' AND m.received_at < v_cutoff AND m.updated_at < v_cutoff
             ORDER BY m.received_at
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM processed_webhook_messages m USING v WHERE m.id = v.id;
        GET DIAGNOSTICS n_other = ROW_COUNT;

        -- Dead-letter items done with, and their payloads.
        WITH v AS (
            SELECT d.id FROM webhook_dlq d
             WHERE d.status IN ('resolved', 'purged') AND d.updated_at < v_cutoff
             ORDER BY d.id
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM webhook_dlq d USING v WHERE d.id = v.id;
        GET DIAGNOSTICS n_dlq = ROW_COUNT;

        -- A person's replies (their text, to whom), whether or not their conversation goes
        -- on: sent, or never sent, before the cutoff.
        WITH v AS (
            SELECT r.id FROM operator_replies r
             WHERE r.created_at < v_cutoff AND coalesce(r.sent_at, r.created_at) < v_cutoff
             ORDER BY r.created_at
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM operator_replies r USING v WHERE r.id = v.id;
        GET DIAGNOSTICS n_ops = ROW_COUNT;

        -- Context entries begun a day before the cutoff (an entry takes messages for a day at
        -- most: all of them are older than the cutoff), in conversations that go on too.
        WITH v AS (
            SELECT e.conversation_id, e.seq FROM agent_context_entries e
             WHERE e.created_at < v_cutoff - interval '1 day'
             ORDER BY e.created_at
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM agent_context_entries e USING v
         WHERE e.conversation_id = v.conversation_id AND e.seq = v.seq;
        GET DIAGNOSTICS n_entries = ROW_COUNT;

        -- Old transitions of no message (a conversation's claims and releases) or of one gone.
        WITH v AS (
            SELECT t.id FROM conversation_state_transitions t
             WHERE t.created_at < v_cutoff
               AND (t.message_id IS NULL
                    OR NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                    WHERE m.message_id = t.message_id))
             ORDER BY t.created_at
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM conversation_state_transitions t USING v WHERE t.id = v.id;
        GET DIAGNOSTICS n_trans_old = ROW_COUNT;
        n_trans := n_trans + n_trans_old;

        -- Idle conversations, once what refers to them is gone: a conversation is only
        -- deleted when no message, transition, dead-letter item or person's reply is left.
        IF n_msg + n_other + n_dlq + n_trans + n_ops + n_entries = 0 THEN
            WITH v AS (
                SELECT c.id, u.unused
                  FROM webhook_conversations c
                 CROSS JOIN LATERAL (
                     SELECT c.marketing_preference IS DISTINCT FROM 'stop'
                            AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                             WHERE m.conversation_id = c.id)
                            AND NOT EXISTS (SELECT 1 FROM conversation_state_transitions t
                                             WHERE t.conversation_id = c.id)
                            AND NOT EXISTS (SELECT 1 FROM webhook_dlq d
                                             WHERE d.conversation_id = c.id)
                            AND NOT EXISTS (SELECT 1 FROM operator_replies r
                                             WHERE r.conversation_id = c.id) AS unused) u
                 WHERE c.status = 'idle' AND c.last_activity_at < v_cutoff
                   AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                    WHERE m.conversation_id = c.id
                                      AND m.status IN ('received', 'processing', 'failed'))
                   AND (EXISTS (SELECT 1 FROM agent_contexts a WHERE a.conversation_id = c.id)
                        OR EXISTS (SELECT 1 FROM agent_sessions s
                                    WHERE s.conversation_id = c.id)
                        OR u.unused)
                 ORDER BY c.id
                 LIMIT p_batch
                   FOR UPDATE OF c SKIP LOCKED
            ), entries AS (
                -- Deleted by the cascade of their context; counted here, in this statement's
                -- snapshot, so that the report says so.
                SELECT count(*) AS n FROM agent_context_entries e JOIN v ON v.id = e.conversation_id
            ), ctx AS (
                DELETE FROM agent_contexts a USING v WHERE a.conversation_id = v.id
                RETURNING 1
            ), sess AS (
                DELETE FROM agent_sessions s USING v WHERE s.conversation_id = v.id
                RETURNING 1
            ), aliases AS (
                -- Deleted by the cascade of their conversation; counted like the entries.
                SELECT count(*) AS n FROM webhook_conversation_aliases a
                  JOIN v ON v.id = a.conversation_id AND v.unused
            ), conv AS (
                DELETE FROM webhook_conversations c USING v WHERE c.id = v.id AND v.unused
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM ctx), n_entries + (SELECT n FROM entries),
                   (SELECT count(*) FROM sess), (SELECT count(*) FROM conv),
                   (SELECT n FROM aliases)
              INTO n_ctx, n_entries, n_sess, n_conv, n_alias;

            -- Kept for their customer's opt-out: without the name and username.
            WITH v AS (
                SELECT c.id FROM webhook_conversations c
                 WHERE c.status = 'idle' AND c.last_activity_at < v_cutoff
                   AND c.marketing_preference = 'stop'
                   AND (c.contact_name IS NOT NULL OR c.username IS NOT NULL)
                   AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                    WHERE m.conversation_id = c.id)
                 ORDER BY c.id
                 LIMIT p_batch
                   FOR UPDATE SKIP LOCKED
            )
            UPDATE webhook_conversations c
               SET contact_name = NULL, username = NULL, updated_at = now()
              FROM v WHERE c.id = v.id;
            GET DIAGNOSTICS n_names = ROW_COUNT;
        END IF;

        WITH v AS (
            SELECT t.id_hash FROM wa_message_tombstones t
             WHERE t.forgotten_at < v_cutoff
             ORDER BY t.forgotten_at
             LIMIT p_batch
               FOR UPDATE SKIP LOCKED
        )
        DELETE FROM wa_message_tombstones t USING v WHERE t.id_hash = v.id_hash;
        GET DIAGNOSTICS n_tomb = ROW_COUNT;
    END IF;

    RETURN QUERY VALUES
        ('processed_webhook_messages', n_msg + n_other),
        ('conversation_state_transitions', n_trans),
        ('agent_reply_parts', n_parts),
        ('webhook_dlq', n_dlq),
        ('agent_contexts', n_ctx),
        ('agent_context_entries', n_entries),
        ('agent_sessions', n_sess),
        ('operator_replies', n_ops),
        ('webhook_conversations', n_conv),
        ('webhook_conversation_aliases', n_alias),
        ('webhook_conversations.contact_name', n_names),
        ('wa_message_tombstones', n_tomb);
END
$$;

-- The console's audit trail kept the text of every reply a person sent (detail.text): the
-- customer's data, in a table neither retention nor erasure touch, and shown nowhere. The
-- console now records the reply's key instead (the reply itself is in operator_replies); the
-- texts already there go. The console also stored every detail as a JSON string holding the
-- object's text (it encoded the object, and its pool's codec encoded that text again): each
-- becomes the object it holds first.
UPDATE wa_console_audit
   SET detail = (detail #>> '{}')::jsonb
 WHERE jsonb_typeof(detail) = 'string' AND left(detail #>> '{}', 1) = '{';
UPDATE wa_console_audit SET detail = detail - 'text' WHERE detail ? 'text';
