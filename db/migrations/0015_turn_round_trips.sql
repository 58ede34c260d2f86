-- Fewer round trips per turn: the state service's driver finished a turn (the message replied)
-- and then started the next one in two statements, and claimed a conversation and started its
-- first turn in two more. Each pair is now one statement (one commit), calling the same
-- functions in the same order: what they check, lock and audit is unchanged.
--
-- Columns are always qualified; `#variable_conflict use_column` keeps a column from ever being
-- read as one of the OUT parameters of the same name.

-- A finished turn's transition (wa_transition_message) and, only when it was applied and
-- `p_next` asks for it, the conversation's next turn (wa_start_turn with the same token).
-- finished / finished_from / finished_fence: the transition's outcome, from_state and
-- fence_token; outcome: wa_start_turn's, or 'unasked' when it was not called.
CREATE FUNCTION wa_finish_turn(
    p_message_id text,
    p_to_state text,
    p_from text[],
    p_reason text,
    p_token bigint,
    p_correlation_id text,
    p_conversation_id bigint,
    p_next boolean,
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
    OUT username text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    SELECT t.outcome, t.from_state, t.fence_token
      INTO finished, finished_from, finished_fence
      FROM wa_transition_message(p_message_id, p_to_state, p_from, p_reason, p_token,
                                 p_correlation_id) t;
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
