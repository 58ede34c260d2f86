-- One definition of a reply's delivery state when its send is recorded: the furthest status
-- Meta reported for it (a status webhook can come before the send is recorded), else 'sent'.
-- The final transition (wa_transition_message, below), the agent's record of its sends
-- (services/agent/queries.sql record_sent, record_unanswered_sends) and the state's record of a
-- stale turn's send (services/state/queries.sql record_stale_send) each wrote it out.
--
-- It returns a set of one row, used as `(SELECT seen FROM wa_reply_status_seen(id) seen)`, so
-- that PostgreSQL inlines it: a scalar SQL function that reads a table is never inlined, and
-- before PostgreSQL 18 it is parsed and planned again at every statement that calls it (~100
-- µs more per record of a send on PostgreSQL 15). Inlined, the calling statement's plan holds
-- the lookup itself, by processed_messages_reply_id_idx, as before. Hence also neither STRICT
-- nor VOLATILE nor SECURITY DEFINER, each of which forbids inlining: it reads with the
-- caller's rights, under the caller's row level security, in the caller's snapshot.

CREATE FUNCTION wa_reply_status_seen(p_reply_message_id text) RETURNS SETOF text
LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT COALESCE(
        (SELECT s.reply_status FROM processed_webhook_messages s
          WHERE s.reply_message_id = p_reply_message_id AND s.kind = 'status'
          ORDER BY wa_delivery_rank(s.reply_status) DESC LIMIT 1),
        'sent')
$$;

-- As in 0026, but for the reply's delivery state, which is wa_reply_status_seen's.
CREATE OR REPLACE FUNCTION wa_transition_message(
    p_message_id text,
    p_to_state text,
    p_from text[],
    p_reason text,
    p_token bigint,
    p_correlation_id text,
    p_reply_message_id text DEFAULT NULL,
    OUT outcome text,
    OUT from_state text,
    OUT fence_token bigint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_conversation_id bigint;
    v_correlation_id text;
    v_kind text;
BEGIN
    IF p_to_state = 'failed' THEN
        -- Its error_count is written below: the conversation is locked first, in the order
        -- wa_start_turn takes the two rows, so two holders never wait on each other.
        PERFORM 1 FROM webhook_conversations c
          WHERE c.id = (SELECT m.conversation_id FROM processed_webhook_messages m
                         WHERE m.message_id = p_message_id)
            FOR NO KEY UPDATE;
    END IF;
    -- By its unique key alone: with `kind = 'message'` in the condition, a plan made while the
    -- table is small may read the whole partial index on kind instead (same estimated cost),
    -- and that plan is kept. The message_id is unique across kinds, so this reads one row.
    SELECT m.id, m.status, m.conversation_id, c.fence_token, m.kind
      INTO v_id, from_state, v_conversation_id, fence_token, v_kind
      FROM processed_webhook_messages m
      LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
     WHERE m.message_id = p_message_id
       FOR UPDATE OF m;
    IF NOT FOUND OR v_kind <> 'message' THEN
        outcome := 'unknown';
        RETURN;
    END IF;
    IF p_token IS NOT NULL AND fence_token IS DISTINCT FROM p_token THEN
        outcome := 'stale';
        RETURN;
    END IF;
    IF NOT (from_state = ANY (p_from)) THEN
        outcome := 'illegal';
        RETURN;
    END IF;

    UPDATE processed_webhook_messages m
       SET status = p_to_state,
           status_reason = NULLIF(p_reason, ''),
           attempts = m.attempts + CASE WHEN p_to_state = 'processing' THEN 1 ELSE 0 END,
           started_at = CASE WHEN p_to_state = 'processing' THEN now() ELSE m.started_at END,
           finished_at = CASE WHEN p_to_state IN ('replied', 'skipped', 'failed',
                                                  'dead_lettered')
                              THEN now() ELSE m.finished_at END,
           reply_message_id = COALESCE(p_reply_message_id, m.reply_message_id),
           -- A status that arrived before the send was recorded still counts.
           reply_status = CASE
               WHEN p_reply_message_id IS NULL THEN m.reply_status
               ELSE (SELECT seen FROM wa_reply_status_seen(p_reply_message_id) seen)
           END,
           updated_at = now()
     WHERE m.id = v_id
    RETURNING m.correlation_id INTO v_correlation_id;

    -- Only on failure, so the happy path costs nothing more.
    IF p_to_state = 'failed' AND v_conversation_id IS NOT NULL THEN
        UPDATE webhook_conversations c
           SET error_count = c.error_count + 1, updated_at = now()
         WHERE c.id = v_conversation_id;
    END IF;

    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
         correlation_id)
    VALUES (v_conversation_id, p_message_id, 'message', from_state, p_to_state, p_reason,
            p_token, COALESCE(NULLIF(p_correlation_id, ''), v_correlation_id));
    outcome := 'done';
END
$$;
