-- Replies beyond plain text (reply buttons, a list, a message template) and WhatsApp's 24-hour
-- customer service window.
--
-- reply_payload: the structured reply (services/agent/replies.py to_json), stored with
-- reply_text (its readable form) before it is sent, so a turn run again after a crash sends
-- the same interactive message or template and never asks the model again. NULL: plain text.
ALTER TABLE processed_webhook_messages ADD COLUMN reply_payload jsonb;

-- The customer's last message in a conversation (the window's start), read by every turn
-- with its state: one index entry, not a scan of the conversation's history.
CREATE INDEX processed_messages_customer_last_idx
    ON processed_webhook_messages (conversation_id, wa_timestamp DESC)
    WHERE kind = 'message';

-- wa_save_turn as in 0006, storing the structured reply too (p_reply_payload).
DROP FUNCTION wa_save_turn(bigint, bigint, text, text, text, jsonb, integer, text, bigint,
                           bigint, bigint, text, boolean);

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
    p_send_started boolean,
    p_reply_payload jsonb
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
