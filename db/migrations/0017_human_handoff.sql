-- Human handoff (README, "Human handoff"). A conversation routed to a handoff agent type
-- (config/agents.toml `handoff = true`) is handed to a person once that agent's message is
-- sent: until an operator releases it, no turn starts for it and the model is never called.
-- Messages that arrive meanwhile are stored as usual and end `skipped` with the reason
-- "waiting for a person (...)": a terminal state with a recorded reason, listed for the
-- operators (State.ListHandoffs). Operators answer through the agent service
-- (Agent.SendOperatorReply), each answer stored before it is sent and sent once.
--
-- Without downtime: nullable columns, a new table, a widened check added NOT VALID and then
-- validated (which does not block writes), functions replaced in place.

-- When the conversation was handed to a person (NULL: the bot answers), and the message
-- whose turn handed it off (what arrived after it is what waits for the person).
ALTER TABLE webhook_conversations
    ADD COLUMN handoff_at timestamptz,
    ADD COLUMN handoff_message_id text;
-- The operators' list of conversations waiting for a person: only those are indexed.
CREATE INDEX webhook_conversations_handoff_idx ON webhook_conversations (handoff_at)
    WHERE handoff_at IS NOT NULL;

-- Audited: 'handoff' (handed off to a person / released, and by whom) and 'operator' (an
-- operator's reply sent to the customer).
ALTER TABLE conversation_state_transitions
    DROP CONSTRAINT conversation_state_transitions_entity_check;
ALTER TABLE conversation_state_transitions
    ADD CONSTRAINT conversation_state_transitions_entity_check
    CHECK (entity IN ('message', 'conversation', 'agent', 'handoff', 'operator')) NOT VALID;
ALTER TABLE conversation_state_transitions
    VALIDATE CONSTRAINT conversation_state_transitions_entity_check;

-- Operators' replies, each stored before it is sent: `idempotency_key` (one per `wa reply`
-- invocation or console form) makes a repeated request find the first one instead of sending
-- again; `send_started_at` without `sent_id` is a send whose outcome is unknown, never
-- repeated blindly.
CREATE TABLE operator_replies (
    id               bigserial PRIMARY KEY,
    idempotency_key  text        NOT NULL UNIQUE,
    conversation_id  bigint      NOT NULL REFERENCES webhook_conversations (id)
                                 ON DELETE CASCADE,
    phone_number_id  text        NOT NULL,
    operator         text        NOT NULL,
    body             text        NOT NULL,
    sent_id          text,
    send_started_at  timestamptz,
    error_code       text,
    correlation_id   text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);
CREATE INDEX operator_replies_conversation_idx ON operator_replies (conversation_id, id);
ALTER TABLE operator_replies ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY wa_owner ON operator_replies USING ((SELECT wa_owns('operator_replies')))
    WITH CHECK ((SELECT wa_owns('operator_replies')));

-- Every message of a handed-off conversation that waits (or whose turn was cut off) ends
-- skipped, kept for the person, audited under the holder's token; except a cut-off turn's
-- whose reply was sent already (its send recorded): that one is replied. Called by
-- wa_start_turn with the conversation share-locked and its token checked.
CREATE FUNCTION wa_hold_for_person(
    p_conversation_id bigint,
    p_token bigint,
    p_handoff_at timestamptz
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_reason text := 'waiting for a person (handed off at '
        || to_char(p_handoff_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC)';
    v_held integer;
BEGIN
    WITH held AS (
        SELECT m.id, m.message_id, m.status, m.correlation_id,
               -- processing -> replied, like the turn would have ended (the machine's move).
               CASE WHEN m.reply_message_id IS NOT NULL AND m.status = 'processing'
                    THEN 'replied' ELSE 'skipped' END AS ends,
               CASE WHEN m.reply_message_id IS NOT NULL AND m.status = 'processing'
                    THEN 'reply sent as ' || m.reply_message_id || ' (its turn was cut off; '
                         || 'the conversation is ' || v_reason || ')'
                    ELSE v_reason END AS why
          FROM processed_webhook_messages m
         WHERE m.conversation_id = p_conversation_id AND m.status IN ('received', 'processing')
         ORDER BY m.wa_timestamp, m.id
           FOR UPDATE
    ), moved AS (
        UPDATE processed_webhook_messages m
           SET status = h.ends, status_reason = h.why, finished_at = now(),
               updated_at = now()
          FROM held h
         WHERE m.id = h.id
        RETURNING m.id
    ), audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
             correlation_id)
        SELECT p_conversation_id, h.message_id, 'message', h.status, h.ends, h.why,
               p_token, h.correlation_id
          FROM held h
         ORDER BY h.id
    )
    SELECT count(*) INTO v_held FROM moved;
    RETURN v_held;
END
$$;

-- A claimed conversation's oldest waiting message, as in 0010, except in a conversation handed
-- off to a person: its waiting messages are held for the person instead (outcome 'none').
-- A later version of this function must keep that check (the `v_handoff_at` block after the
-- fence check): tests/e2e/test_handoff.py fails without it.
CREATE OR REPLACE FUNCTION wa_start_turn(
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
    OUT contact_name text,
    OUT user_id text,
    OUT username text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_status text;
    v_message_id text;
    v_correlation_id text;
    v_reason text;
    v_wa_id text;
    v_handoff_at timestamptz;
BEGIN
    SELECT c.fence_token, c.contact_name, c.wa_id, c.user_id, c.username, c.handoff_at
      INTO fence_token, contact_name, v_wa_id, user_id, username, v_handoff_at
      FROM webhook_conversations c
     WHERE c.id = p_conversation_id
       FOR SHARE;
    IF fence_token IS DISTINCT FROM p_token THEN
        outcome := 'stale';
        RETURN;
    END IF;
    -- Handed off to a person: what waits is kept for the person, no turn starts (0017).
    IF v_handoff_at IS NOT NULL THEN
        PERFORM wa_hold_for_person(p_conversation_id, p_token, v_handoff_at);
        outcome := 'none';
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
    RETURNING m.id, m.message_id, m.conversation_id, m.phone_number_id,
              COALESCE(v_wa_id, NULLIF(m.wa_id, ''), ''),
              m.message_type, m.wa_timestamp, m.body, m.correlation_id, m.traceparent,
              m.attempts, m.turn_resumes
         INTO id, message_id, conversation_id, phone_number_id, wa_id, message_type,
              wa_timestamp, body, correlation_id, traceparent, attempts, turn_resumes;

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
