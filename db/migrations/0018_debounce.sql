-- Quick bursts become one turn (config/agents.toml `debounce_seconds`): the turn of a
-- conversation's oldest waiting message M may answer the conversation's other waiting
-- messages together with it, in one model call and one reply. Which ones is decided once and
-- saved with M's reply, in the same fenced statement (wa_save_burst), so that a turn run again
-- after a crash answers the same burst and never calls the model again; the turn's final
-- transition (wa_finish_turn) then moves each of them received -> replied with M, audited,
-- fenced by the same token, and only while it is still received.
--
-- Columns are always qualified; `#variable_conflict use_column` keeps a column from ever being
-- read as one of the OUT parameters of the same name.

-- On M's row: the messages its reply answers besides M, in the order the model read them
-- (NULL: a turn of one message). No default: adding it rewrites nothing.
ALTER TABLE processed_webhook_messages ADD COLUMN absorbed_message_ids text[];

-- The burst answered with p_message_id, written only while p_token is still the conversation's.
-- The agent calls it in the same statement as wa_save_turn (services/agent/queries.sql,
-- save_turn), so the reply and its burst are saved together or not at all; a separate
-- function, so that it holds whatever else a version of wa_save_turn saves. Nothing to do
-- (and no lock taken) for a turn of one message.
CREATE FUNCTION wa_save_burst(
    p_conversation_id bigint,
    p_token bigint,
    p_message_id text,
    p_absorbed text[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_fence bigint;
BEGIN
    IF p_absorbed IS NULL OR cardinality(p_absorbed) = 0 THEN
        RETURN;
    END IF;
    SELECT c.fence_token INTO v_fence
      FROM webhook_conversations c
     WHERE c.id = p_conversation_id
       FOR SHARE;
    IF v_fence IS DISTINCT FROM p_token THEN
        RETURN;
    END IF;
    UPDATE processed_webhook_messages m
       SET absorbed_message_ids = p_absorbed, updated_at = now()
     WHERE m.message_id = p_message_id AND m.kind = 'message'
       AND m.conversation_id = p_conversation_id;
END
$$;

-- wa_finish_turn (0015) and, new: once p_message_id's transition applied, each message of
-- p_absorbed (the agent's answer) that M's saved reply answered (absorbed_message_ids), that
-- belongs to the same conversation and is still in one of p_absorbed_from, moves to p_to_state
-- with p_absorbed_reason, through wa_transition_message (fenced by p_token, audited). One not
-- in such a state is left alone: it gets its own turn. absorbed: the ids moved, in order.
-- All before the next turn is started, so that it is never one of them.
DROP FUNCTION wa_finish_turn(text, text, text[], text, bigint, text, bigint, boolean);

CREATE FUNCTION wa_finish_turn(
    p_message_id text,
    p_to_state text,
    p_from text[],
    p_reason text,
    p_token bigint,
    p_correlation_id text,
    p_conversation_id bigint,
    p_next boolean,
    p_absorbed text[] DEFAULT '{}',
    p_absorbed_from text[] DEFAULT '{}',
    p_absorbed_reason text DEFAULT '',
    OUT finished text,
    OUT finished_from text,
    OUT finished_fence bigint,
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
    OUT contact_name text,
    OUT user_id text,
    OUT username text,
    OUT absorbed text[]
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id text;
    v_moved text;
BEGIN
    SELECT t.outcome, t.from_state, t.fence_token
      INTO finished, finished_from, finished_fence
      FROM wa_transition_message(p_message_id, p_to_state, p_from, p_reason, p_token,
                                 p_correlation_id) t;
    absorbed := '{}';
    IF finished = 'done' AND cardinality(p_absorbed) > 0 THEN
        FOR v_id IN
            SELECT a.message_id
              FROM processed_webhook_messages m
              JOIN processed_webhook_messages a
                ON a.message_id = ANY (m.absorbed_message_ids)
               AND a.message_id = ANY (p_absorbed)
             WHERE m.message_id = p_message_id
               AND a.kind = 'message'
               AND a.conversation_id = m.conversation_id
               AND a.conversation_id = p_conversation_id
             ORDER BY a.wa_timestamp, a.id
        LOOP
            SELECT t.outcome INTO v_moved
              FROM wa_transition_message(v_id, p_to_state, p_absorbed_from, p_absorbed_reason,
                                         p_token, '') t;
            IF v_moved = 'done' THEN
                absorbed := absorbed || v_id;
            END IF;
        END LOOP;
    END IF;
    outcome := 'unasked';
    IF finished <> 'done' OR NOT p_next THEN
        RETURN;
    END IF;
    SELECT s.outcome, s.fence_token, s.id, s.message_id, s.conversation_id, s.phone_number_id,
           s.wa_id, s.message_type, s.wa_timestamp, s.body, s.correlation_id, s.traceparent,
           s.attempts, s.turn_resumes, s.resumed, s.queued_because, s.contact_name, s.user_id,
           s.username
      INTO outcome, fence_token, id, message_id, conversation_id, phone_number_id, wa_id,
           message_type, wa_timestamp, body, correlation_id, traceparent, attempts,
           turn_resumes, resumed, queued_because, contact_name, user_id, username
      FROM wa_start_turn(p_conversation_id, p_token) s;
END
$$;
