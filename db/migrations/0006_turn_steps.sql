-- Each step of a turn in one round trip. They were five or six statements in a client-side
-- transaction each (BEGIN, the fence, the row, the update, the audit, COMMIT): at hundreds of
-- messages a second those round trips were most of the state service's and PostgreSQL's CPU.
-- The state machine itself stays in Python (services/state/machine.py): these functions take
-- the states a move may leave and report what they found when the move does not apply.
--
-- Columns are always qualified; `#variable_conflict use_column` keeps a column from ever being
-- read as one of the OUT parameters of the same name.

-- A claimed conversation's oldest waiting message, moved to processing and audited.
-- outcome: 'started', 'none' (nothing waits) or 'stale' (a later claim moved the fence on).
CREATE FUNCTION wa_start_turn(
    p_conversation_id bigint,
    p_token bigint,
    OUT outcome text,
    OUT fence_token bigint,
    OUT id bigint,
    OUT message_id text,
    OUT conversation_id bigint,
    OUT phone_number_id text,
    OUT wa_id text,
    OUT message_type text,
    OUT wa_timestamp timestamptz,
    OUT body text,
    OUT correlation_id text,
    OUT traceparent text,
    OUT attempts integer,
    OUT turn_resumes integer,
    OUT resumed boolean,
    OUT queued_because text,
    OUT contact_name text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_status text;
    v_message_id text;
    v_correlation_id text;
    v_reason text;
BEGIN
    SELECT c.fence_token, c.contact_name INTO fence_token, contact_name
      FROM webhook_conversations c
     WHERE c.id = p_conversation_id
       FOR SHARE;
    IF fence_token IS DISTINCT FROM p_token THEN
        outcome := 'stale';
        RETURN;
    END IF;

    SELECT m.id, m.status, m.message_id, m.correlation_id
      INTO v_id, v_status, v_message_id, v_correlation_id
      FROM processed_webhook_messages m
     WHERE m.conversation_id = p_conversation_id AND m.status IN ('received', 'processing')
     ORDER BY m.wa_timestamp, m.id
     LIMIT 1
       FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'none';
        RETURN;
    END IF;

    resumed := v_status = 'processing';
    IF resumed THEN
        v_reason := 'resumed: its previous turn never finished';
        queued_because := v_reason;
    ELSE
        v_reason := 'turn started';
        SELECT t.reason INTO queued_because
          FROM conversation_state_transitions t
         WHERE t.message_id = v_message_id AND t.to_state = 'received'
         ORDER BY t.id DESC
         LIMIT 1;
    END IF;

    UPDATE processed_webhook_messages m
       SET status = 'processing',
           status_reason = NULL,
           attempts = m.attempts + 1,
           turn_resumes = m.turn_resumes + CASE WHEN resumed THEN 1 ELSE 0 END,
           started_at = now(),
           updated_at = now()
     WHERE m.id = v_id
    RETURNING m.id, m.message_id, m.conversation_id, m.phone_number_id, m.wa_id,
              m.message_type, m.wa_timestamp, m.body, m.correlation_id, m.traceparent,
              m.attempts, m.turn_resumes
         INTO id, message_id, conversation_id, phone_number_id, wa_id, message_type,
              wa_timestamp, body, correlation_id, traceparent, attempts, turn_resumes;

    -- The audit, in order: a turn whose previous holder died mid-turn shows
    -- processing -> received -> processing.
    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
         correlation_id)
    SELECT p_conversation_id, v_message_id, 'message', s.from_state, s.to_state, v_reason,
           p_token, v_correlation_id
      FROM (VALUES (1, 'processing', 'received'), (2, 'received', 'processing'))
           AS s (n, from_state, to_state)
     WHERE s.n = 2 OR resumed
     ORDER BY s.n;
    outcome := 'started';
END
$$;

-- One validated, audited transition of a message.
-- outcome: 'done', 'unknown' (no such message), 'stale' (p_token given and no longer the
-- conversation's) or 'illegal' (its state is not one of p_from); from_state is what it found.
CREATE FUNCTION wa_transition_message(
    p_message_id text,
    p_to_state text,
    p_from text[],
    p_reason text,
    p_token bigint,
    p_correlation_id text,
    OUT outcome text,
    OUT from_state text,
    OUT fence_token bigint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    SELECT m.id, m.status, c.fence_token INTO v_id, from_state, fence_token
      FROM processed_webhook_messages m
      LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
     WHERE m.message_id = p_message_id AND m.kind = 'message'
       FOR UPDATE OF m;
    IF NOT FOUND THEN
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
           updated_at = now()
     WHERE m.id = v_id;

    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
         correlation_id)
    SELECT m.conversation_id, m.message_id, 'message', from_state, p_to_state, p_reason,
           p_token, COALESCE(NULLIF(p_correlation_id, ''), m.correlation_id)
      FROM processed_webhook_messages m
     WHERE m.id = v_id;
    outcome := 'done';
END
$$;

-- The agent's record of a turn, in one round trip: its context, the reply (stored before it
-- is sent, and with p_send_started marked as being sent: the send follows at once), an agent
-- switch in the audit, and the session's metrics; written only while p_token is still the
-- conversation's. Returns the conversation's fence token: when it is not p_token, nothing was
-- written.
CREATE FUNCTION wa_save_turn(
    p_conversation_id bigint,
    p_token bigint,
    p_message_id text,
    p_agent_type text,
    p_previous_agent_type text,
    p_messages jsonb,
    p_token_count integer,
    p_reply_text text,
    p_tokens_in bigint,
    p_tokens_out bigint,
    p_latency_ms bigint,
    p_correlation_id text,
    p_send_started boolean
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_fence bigint;
BEGIN
    SELECT c.fence_token INTO v_fence
      FROM webhook_conversations c
     WHERE c.id = p_conversation_id
       FOR SHARE;
    IF v_fence IS DISTINCT FROM p_token THEN
        RETURN v_fence;
    END IF;

    INSERT INTO agent_contexts AS a
        (conversation_id, agent_type, messages, token_count, fence_token, correlation_id)
    VALUES (p_conversation_id, p_agent_type, p_messages, p_token_count, p_token,
            p_correlation_id)
    ON CONFLICT (conversation_id) DO UPDATE
       SET agent_type = EXCLUDED.agent_type,
           messages = EXCLUDED.messages,
           token_count = EXCLUDED.token_count,
           fence_token = EXCLUDED.fence_token,
           correlation_id = EXCLUDED.correlation_id,
           updated_at = now();

    UPDATE processed_webhook_messages m
       SET reply_text = p_reply_text,
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

-- Every one-hour window filters kind = 'message' and uses processed_messages_kind_received_idx
-- (0004); this one only cost each insert and each non-HOT update an index entry.
DROP INDEX processed_messages_received_at_idx;

-- The sweeper's look for failed messages not yet handed to the DLQ (every sweep): failed is a
-- short-lived state, so this index stays tiny, where a scan would read every message.
CREATE INDEX processed_messages_failed_idx ON processed_webhook_messages (finished_at)
    WHERE status = 'failed';
