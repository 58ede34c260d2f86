-- The 24-hour window's start from the conversation's row (issue 16: PostgreSQL's CPU per
-- message; one way to one value).
--
-- wa_start_turn read the customer's last message time with a statement of its own, one entry
-- of processed_messages_customer_last_idx, while the operator's reply (services/agent/
-- operator.sql) read the same value from webhook_conversations.last_message_at, which every
-- ingest of the conversation's messages keeps (the GREATEST of their timestamps: the ingest's
-- upsert and adoption, db/migrations/0032). wa_start_turn reads the conversation's row first
-- anyway: the value now comes with it, one statement fewer at each turn's start (the claim's,
-- and the final move's when a next message waits). The index stays: the conversation's
-- timeline is listed by it (services/state/queries.sql timeline_messages).
--
-- The two agree: both take the customer's messages only (statuses, events and replies do not
-- move last_message_at), by Meta's timestamp; an erased customer's conversation goes whole
-- (wa_forget_customer), and retention prunes only messages older than its days, long out of
-- the window either way. tests/integration/test_state_store.py checks the window's start a
-- turn gets, with an older message ingested after a newer one.
--
-- `python -m bench.turn_sql --no-sync --rounds 8 --before 0034` (07:57 UTC): a turn's claim
-- 572 µs of backend CPU against 583 alone, 346 against 354 sixteen at once (0.98 both, within
-- the method's spread): one index probe of a few.
--
-- The function as 0030 defined it, with 0032's plan_cache_mode, and those two changes.

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
    OUT wa_timestamp timestamp with time zone,
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
    OUT send_started_at timestamp with time zone,
    OUT absorbed_message_ids text[],
    OUT context_agent_type text,
    OUT context text,
    OUT last_customer_at timestamp with time zone,
    OUT db_now timestamp with time zone
) RETURNS record
    LANGUAGE plpgsql
    SET plan_cache_mode = force_generic_plan
    AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_status text;
    v_message_id text;
    v_correlation_id text;
    v_status_reason text;
    v_reason text;
    v_wa_id text;
    v_handoff_at timestamptz;
BEGIN
    -- With the customer's last message time, the 24-hour window's start: every ingest of the
    -- conversation's messages keeps it (GREATEST of their timestamps), in the row read anyway.
    SELECT c.fence_token, c.contact_name, c.wa_id, c.user_id, c.username, c.handoff_at,
           c.last_message_at
      INTO fence_token, contact_name, v_wa_id, user_id, username, v_handoff_at,
           last_customer_at
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

    SELECT m.id, m.status, m.message_id, m.correlation_id, m.status_reason
      INTO v_id, v_status, v_message_id, v_correlation_id, v_status_reason
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
        -- The reason of its last move to 'received' (ingest and every transition write the
        -- two together), without reading the transitions.
        queued_because := v_status_reason;
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
              m.attempts, m.turn_resumes, m.payload::text, m.reply_text, m.reply_payload::text,
              m.reply_message_id, m.agent_type, m.send_started_at, m.absorbed_message_ids
         INTO id, message_id, conversation_id, phone_number_id, wa_id, message_type,
              wa_timestamp, body, correlation_id, traceparent, attempts, turn_resumes,
              payload, reply_text, reply_payload, reply_message_id, agent_type,
              send_started_at, absorbed_message_ids;

    SELECT a.agent_type,
           (SELECT c FROM wa_context(p_conversation_id) c)
      INTO context_agent_type, context
      FROM agent_contexts a
     WHERE a.conversation_id = p_conversation_id;
    db_now := now();

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
