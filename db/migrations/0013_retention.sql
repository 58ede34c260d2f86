-- Retention and erasure: finished work older than RETENTION_DAYS is pruned in small batches
-- (wa_prune), one customer's data is erased on request (wa_forget_customer), each recorded in
-- wa_erasure_audit without personal data. Both functions run as their owner (SECURITY
-- DEFINER, a fixed search_path with pg_temp last so a caller's temporary tables cannot stand
-- in for ours): the state service's role needs EXECUTE on them and no DELETE of its own.

-- What was erased, when, and at whose request: counts per table, never who the customer was
-- (no phone number, BSUID, name or text, not even a hash of one).
CREATE TABLE wa_erasure_audit (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    kind          text NOT NULL CHECK (kind IN ('forget', 'prune')),
    counts        jsonb NOT NULL,
    requested_by  text NOT NULL
);

-- Duplicate guards of forgotten messages. Meta retries a delivery for up to 7 days: a message
-- erased by `wa forget` and delivered again must stay a duplicate (no second turn, and its
-- customer's data not stored again). Only SHA-256 digests of ids are kept: a WhatsApp message
-- id (wamid) carries the sender's phone number in base64, so the ids themselves are personal
-- data; a digest cannot be turned back into the id (its random part is long), only matched
-- against an id delivered again. Ids of our replies too, so their late status webhooks are
-- not stored. Pruned like everything else after RETENTION_DAYS (at least 8).
CREATE TABLE wa_message_tombstones (
    id_hash       bytea PRIMARY KEY,
    forgotten_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wa_message_tombstones_at_idx ON wa_message_tombstones (forgotten_at);

-- Pruning walks status and event rows by age (messages have their own index, 0004), and
-- finds a customer's rows that belong to no conversation; erasing a conversation finds its
-- dead-letter items (also what deleting a conversation checks for its foreign key).
CREATE INDEX processed_messages_other_received_idx
    ON processed_webhook_messages (received_at) WHERE kind <> 'message';
CREATE INDEX processed_messages_orphan_wa_id_idx
    ON processed_webhook_messages (wa_id) WHERE conversation_id IS NULL;
CREATE INDEX processed_messages_orphan_user_id_idx
    ON processed_webhook_messages (user_id) WHERE conversation_id IS NULL;
CREATE INDEX webhook_dlq_conversation_idx ON webhook_dlq (conversation_id);
CREATE INDEX webhook_dlq_message_idx ON webhook_dlq (message_id);

-- Below this, a message id Meta may still deliver again (its retries last up to 7 days)
-- could be pruned, and the redelivery would be processed a second time.
CREATE FUNCTION wa_retention_min_days() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 8 $$;

-- One batch of pruning: at most p_batch rows per table, each statement short and taking only
-- rows nobody holds (FOR UPDATE SKIP LOCKED); the caller calls again, each call its own
-- transaction, until a call deletes nothing. Pruned: messages finished (replied, skipped, or
-- dead-lettered with no open dead-letter item) and received and last changed before the
-- cutoff, with their transitions and reply parts; status and event rows likewise; resolved
-- and purged dead-letter items; old transitions of no message (claims, releases) or of a
-- message gone; then, once none of that is left, the contexts and sessions of conversations
-- idle since before the cutoff with nothing in flight, and such a conversation itself once
-- nothing refers to it (one whose customer stopped marketing messages is kept: the opt-out
-- must be honoured); expired tombstones. In flight (received, processing, failed) and open
-- dead-letter items (pending, retrying, dead) are never touched.
-- p_dry_run: counts what a full prune would delete now, deletes nothing.
CREATE FUNCTION wa_prune(p_days integer, p_batch integer, p_dry_run boolean)
RETURNS TABLE (table_name text, rows bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
    n_sess bigint := 0;
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
        ), idle AS (
            SELECT c.* FROM webhook_conversations c
             WHERE c.status = 'idle' AND c.last_activity_at < v_cutoff
               AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                WHERE m.conversation_id = c.id
                                  AND m.status IN ('received', 'processing', 'failed'))
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
               (SELECT count(*) FROM agent_contexts a JOIN idle i ON i.id = a.conversation_id),
               (SELECT count(*) FROM agent_sessions s JOIN idle i ON i.id = s.conversation_id),
               -- Idle conversations that nothing would refer to once the rest is pruned.
               (SELECT count(*) FROM idle i
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
                                   AND d.updated_at < v_cutoff))),
               (SELECT count(*) FROM wa_message_tombstones t WHERE t.forgotten_at < v_cutoff)
          INTO n_msg, n_other, n_parts, n_trans, n_dlq, n_ctx, n_sess, n_conv, n_tomb;
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
        -- deleted when no message, transition or dead-letter item is left.
        IF n_msg + n_other + n_dlq + n_trans = 0 THEN
            WITH v AS (
                SELECT c.id,
                       c.marketing_preference IS DISTINCT FROM 'stop'
                       AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                        WHERE m.conversation_id = c.id)
                       AND NOT EXISTS (SELECT 1 FROM conversation_state_transitions t
                                        WHERE t.conversation_id = c.id)
                       AND NOT EXISTS (SELECT 1 FROM webhook_dlq d
                                        WHERE d.conversation_id = c.id) AS unused
                  FROM webhook_conversations c
                 WHERE c.status = 'idle' AND c.last_activity_at < v_cutoff
                   AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                    WHERE m.conversation_id = c.id
                                      AND m.status IN ('received', 'processing', 'failed'))
                   AND (EXISTS (SELECT 1 FROM agent_contexts a WHERE a.conversation_id = c.id)
                        OR EXISTS (SELECT 1 FROM agent_sessions s
                                    WHERE s.conversation_id = c.id)
                        OR (c.marketing_preference IS DISTINCT FROM 'stop'
                            AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                                             WHERE m.conversation_id = c.id)
                            AND NOT EXISTS (SELECT 1 FROM conversation_state_transitions t
                                             WHERE t.conversation_id = c.id)
                            AND NOT EXISTS (SELECT 1 FROM webhook_dlq d
                                             WHERE d.conversation_id = c.id)))
                 ORDER BY c.id
                 LIMIT p_batch
                   FOR UPDATE SKIP LOCKED
            ), ctx AS (
                DELETE FROM agent_contexts a USING v WHERE a.conversation_id = v.id
                RETURNING 1
            ), sess AS (
                DELETE FROM agent_sessions s USING v WHERE s.conversation_id = v.id
                RETURNING 1
            ), conv AS (
                DELETE FROM webhook_conversations c USING v WHERE c.id = v.id AND v.unused
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM ctx), (SELECT count(*) FROM sess),
                   (SELECT count(*) FROM conv)
              INTO n_ctx, n_sess, n_conv;
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
        ('agent_sessions', n_sess),
        ('webhook_conversations', n_conv),
        ('wa_message_tombstones', n_tomb);
END
$$;

-- A prune pass's audit row (one per pass that deleted something, not one per batch).
CREATE FUNCTION wa_record_prune(p_counts jsonb, p_requested_by text) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
    INSERT INTO wa_erasure_audit (kind, counts, requested_by)
    VALUES ('prune', p_counts, p_requested_by)
    RETURNING id
$$;

-- Erases one customer, named by phone number or business-scoped user id (BSUID, or parent
-- BSUID), on every business number: their conversations, messages, statuses and events,
-- transitions, contexts, sessions, reply parts and dead-letter items (payloads included), in
-- one transaction, and writes the audit row. The ids of the erased messages and replies stay
-- as digests (wa_message_tombstones). The caller holds the conversations' leases, so no turn
-- runs meanwhile; a turn that overstayed its lease is refused by its fencing token (its
-- conversation is gone). Returns the rows erased per table.
CREATE FUNCTION wa_forget_customer(p_customer text, p_requested_by text)
RETURNS TABLE (table_name text, rows bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_convs bigint[];
    v_ids text[];
    n_msg bigint;
    n_parts bigint;
    n_trans bigint;
    n_dlq bigint;
    n_ctx bigint;
    n_sess bigint;
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
         ORDER BY c.id
           FOR UPDATE) x;
    SELECT coalesce(array_agg(message_id), '{}') INTO v_ids FROM (
        SELECT m.message_id FROM processed_webhook_messages m
         WHERE m.conversation_id = ANY (v_convs)
        UNION
        SELECT m.message_id FROM processed_webhook_messages m
         WHERE m.conversation_id IS NULL
           AND (m.wa_id = p_customer OR m.user_id = p_customer)) x;

    INSERT INTO wa_message_tombstones (id_hash)
    SELECT DISTINCT sha256(convert_to(i, 'UTF8')) FROM (
        SELECT m.message_id AS i FROM processed_webhook_messages m
         WHERE m.message_id = ANY (v_ids) AND m.kind <> 'status'
        UNION ALL
        SELECT m.reply_message_id FROM processed_webhook_messages m
         WHERE m.message_id = ANY (v_ids) AND m.reply_message_id IS NOT NULL
        UNION ALL
        SELECT p.sent_id FROM agent_reply_parts p
         WHERE p.message_id = ANY (v_ids) AND p.sent_id IS NOT NULL) x
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
    DELETE FROM agent_contexts a WHERE a.conversation_id = ANY (v_convs);
    GET DIAGNOSTICS n_ctx = ROW_COUNT;
    DELETE FROM agent_sessions s WHERE s.conversation_id = ANY (v_convs);
    GET DIAGNOSTICS n_sess = ROW_COUNT;
    DELETE FROM processed_webhook_messages m WHERE m.message_id = ANY (v_ids);
    GET DIAGNOSTICS n_msg = ROW_COUNT;
    DELETE FROM webhook_conversations c WHERE c.id = ANY (v_convs);
    GET DIAGNOSTICS n_conv = ROW_COUNT;

    v_counts := jsonb_build_object(
        'webhook_conversations', n_conv,
        'processed_webhook_messages', n_msg,
        'conversation_state_transitions', n_trans,
        'agent_reply_parts', n_parts,
        'webhook_dlq', n_dlq,
        'agent_contexts', n_ctx,
        'agent_sessions', n_sess,
        'wa_message_tombstones', n_tomb);
    INSERT INTO wa_erasure_audit (kind, counts, requested_by)
    VALUES ('forget', v_counts, p_requested_by);
    RETURN QUERY SELECT key, value::bigint FROM jsonb_each_text(v_counts);
END
$$;

-- Functions are executable by everyone unless told otherwise: these erase data, so nobody but
-- their owner may run them until a role is granted EXECUTE (the state service's role).
REVOKE EXECUTE ON FUNCTION wa_prune(integer, integer, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION wa_record_prune(jsonb, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION wa_forget_customer(text, text) FROM PUBLIC;
