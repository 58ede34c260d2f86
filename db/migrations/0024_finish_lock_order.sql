-- A turn's final statement locked its message before its conversation (wa_transition_message,
-- then wa_start_turn and the release), the reverse of every other writer: an ingest batch that
-- carried a duplicate delivery of the message held the conversation (its upsert counts the
-- conversation's messages) and waited for the message's row, and PostgreSQL broke the deadlock
-- by failing the final statement, whose reply was sent but not yet recorded; the resumed turn,
-- finding no status webhook, sent it again (seen once in tests/e2e/test_inbound.py's twelve
-- deliveries of one message under load). wa_finish_turn now takes the conversation first.
-- tests/integration/test_turn_lock_order.py fails without it.

CREATE OR REPLACE FUNCTION wa_finish_turn(
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
    p_reply_message_id text DEFAULT NULL,
    p_release_from text[] DEFAULT NULL,
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
    OUT payload text,
    OUT reply_text text,
    OUT reply_payload text,
    OUT reply_message_id text,
    OUT agent_type text,
    OUT send_started_at timestamptz,
    OUT absorbed_message_ids text[],
    OUT context_agent_type text,
    OUT context text,
    OUT last_customer_at timestamptz,
    OUT db_now timestamptz,
    OUT absorbed text[],
    OUT released boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id text;
    v_moved text;
BEGIN
    -- The conversation first, then its message: the order every other writer of the two
    -- rows takes them in (wa_start_turn, wa_transition_message's failure path, the ingest's
    -- upsert of the conversation before the insert of its messages).
    PERFORM 1 FROM webhook_conversations c WHERE c.id = p_conversation_id FOR NO KEY UPDATE;
    SELECT t.outcome, t.from_state, t.fence_token
      INTO finished, finished_from, finished_fence
      FROM wa_transition_message(p_message_id, p_to_state, p_from, p_reason, p_token,
                                 p_correlation_id, p_reply_message_id) t;
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
           s.username, s.payload, s.reply_text, s.reply_payload, s.reply_message_id,
           s.agent_type, s.send_started_at, s.absorbed_message_ids, s.context_agent_type,
           s.context, s.last_customer_at, s.db_now
      INTO outcome, fence_token, id, message_id, conversation_id, phone_number_id, wa_id,
           message_type, wa_timestamp, body, correlation_id, traceparent, attempts,
           turn_resumes, resumed, queued_because, contact_name, user_id, username, payload,
           reply_text, reply_payload, reply_message_id, agent_type, send_started_at,
           absorbed_message_ids, context_agent_type, context, last_customer_at, db_now
      FROM wa_start_turn(p_conversation_id, p_token) s;
    released := false;
    IF outcome = 'none' AND p_release_from IS NOT NULL THEN
        released := wa_release_conversation(p_conversation_id, p_token, p_release_from);
    END IF;
END
$$;
