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

-- A conversation's claim (the fence moved on, the conversation active, the claim audited: the
-- state service's claim_conversation) and its first turn (wa_start_turn with the new token).
-- claimed: the new fencing token, NULL when the conversation does not exist or the machine
-- does not let it become active from where it is (nothing is started then).
CREATE FUNCTION wa_claim_turn(
    p_conversation_id bigint,
    p_owner text,
    p_sources text[],
    OUT claimed bigint,
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
    WITH previous AS (
        SELECT c.status FROM webhook_conversations c WHERE c.id = p_conversation_id
    ), moved AS (
        UPDATE webhook_conversations c
           SET fence_token = c.fence_token + 1, status = 'active', lock_owner = p_owner,
               locked_at = now(), last_activity_at = now(), updated_at = now()
         WHERE c.id = p_conversation_id AND c.status = ANY (p_sources)
        RETURNING c.id, c.fence_token
    ), audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, entity, from_state, to_state, reason, fence_token)
        SELECT m.id, 'conversation', p.status, 'active',
               CASE WHEN p.status = 'idle' THEN 'claimed' ELSE 'taken over from a previous holder'
               END || ' by ' || p_owner, m.fence_token
          FROM moved m, previous p
    )
    SELECT m.fence_token INTO claimed FROM moved m;
    IF claimed IS NULL THEN
        RETURN;
    END IF;
    SELECT s.outcome, s.fence_token, s.id, s.message_id, s.conversation_id, s.phone_number_id,
           s.wa_id, s.message_type, s.wa_timestamp, s.body, s.correlation_id, s.traceparent,
           s.attempts, s.turn_resumes, s.resumed, s.queued_because, s.contact_name, s.user_id,
           s.username
      INTO outcome, fence_token, id, message_id, conversation_id, phone_number_id, wa_id,
           message_type, wa_timestamp, body, correlation_id, traceparent, attempts,
           turn_resumes, resumed, queued_because, contact_name, user_id, username
      FROM wa_start_turn(p_conversation_id, claimed) s;
END
$$;
