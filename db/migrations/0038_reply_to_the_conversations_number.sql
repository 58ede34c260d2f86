-- A turn's reply goes to the conversation's phone number only, never to the number its message
-- came from.
--
-- wa_start_turn (0034) and wa_start_turns (0037) returned the turn's phone number as
-- COALESCE(the conversation's wa_id, the message's wa_id). Every ingest sets the conversation's
-- wa_id when a message carries a number (0035), so the message's own number counted only where
-- the conversation's had been cleared on purpose: a `user_changed_number` or
-- `user_changed_user_id` notice (services/state/queries.sql, apply_user_id_update) clears it
-- because the old number is no longer the customer's. A message of before the change still
-- waiting, resumed, or redriven from the dead-letter queue was then answered at the old
-- number: someone else's, perhaps, reading this customer's conversation. Now such a turn
-- addresses the customer by their business-scoped user id (`recipient`), and with none known
-- (a customer who never had one) the agent fails it to the dead-letter queue (`NoRecipient`)
-- before asking the model, for an operator to see.
--
-- The functions as 0034 and 0037 defined them, with that one expression changed.

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
              COALESCE(v_wa_id, ''),
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

CREATE OR REPLACE FUNCTION wa_start_turns(
    p_conversation_ids bigint[],
    p_tokens bigint[],
    p_release_from text[]
) RETURNS TABLE (
    ord integer,
    outcome text,
    fence_token bigint,
    id bigint,
    message_id text,
    conversation_id bigint,
    phone_number_id text,
    wa_id text,
    message_type text,
    wa_timestamp timestamp with time zone,
    body text,
    correlation_id text,
    traceparent text,
    attempts integer,
    turn_resumes integer,
    resumed boolean,
    queued_because text,
    contact_name text,
    user_id text,
    username text,
    payload text,
    reply_text text,
    reply_payload text,
    reply_message_id text,
    agent_type text,
    send_started_at timestamp with time zone,
    absorbed_message_ids text[],
    context_agent_type text,
    context text,
    last_customer_at timestamp with time zone,
    db_now timestamp with time zone,
    released boolean
)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- Handed off to a person: what waits is kept for the person, no turn starts (0017). Rare;
    -- the main statement below then finds nothing waiting there.
    PERFORM wa_hold_for_person(h.id, h.fence_token, h.handoff_at)
       FROM (SELECT c.id, c.fence_token, c.handoff_at
               FROM unnest(p_conversation_ids, p_tokens) WITH ORDINALITY
                    AS u(conversation_id, token, n)
               JOIN webhook_conversations c ON c.id = u.conversation_id
              WHERE c.fence_token = u.token AND c.handoff_at IS NOT NULL
              ORDER BY u.n) AS h;

    RETURN QUERY
    WITH given AS MATERIALIZED (
        -- The conversations' rows, with the customer's last message time: the 24-hour
        -- window's start (every ingest keeps it).
        SELECT u.n::integer AS n, u.conversation_id AS cid, u.token, c.fence_token AS fence,
               c.contact_name AS name, c.wa_id AS number, c.user_id AS bsuid,
               c.username AS handle, c.handoff_at, c.last_message_at
          FROM unnest(p_conversation_ids, p_tokens) WITH ORDINALITY AS u(conversation_id, token, n)
          LEFT JOIN webhook_conversations c ON c.id = u.conversation_id
         ORDER BY u.n
    ), picked AS MATERIALIZED (
        -- (A nested loop over `given` in its order: the messages are locked by conversation.)
        SELECT g.n, w.id AS row_id, w.message_id AS mid, w.correlation_id AS cor,
               w.status_reason AS why, w.status = 'processing' AS again
          FROM given g
          CROSS JOIN LATERAL (
              SELECT m.id, m.status, m.message_id, m.correlation_id, m.status_reason
                FROM processed_webhook_messages m
               WHERE m.conversation_id = g.cid AND m.status IN ('received', 'processing')
               ORDER BY m.wa_timestamp, m.id
               LIMIT 1
                 FOR UPDATE) AS w
         WHERE g.fence = g.token AND g.handoff_at IS NULL
    ), started AS (
        UPDATE processed_webhook_messages m
           SET status = 'processing',
               status_reason = NULL,
               attempts = m.attempts + 1,
               turn_resumes = m.turn_resumes + CASE WHEN p.again THEN 1 ELSE 0 END,
               started_at = now(),
               updated_at = now()
          FROM picked p
         WHERE m.id = p.row_id
        RETURNING p.n, m.id, m.message_id, m.conversation_id, m.phone_number_id, m.wa_id,
                  m.message_type, m.wa_timestamp, m.body, m.correlation_id, m.traceparent,
                  m.attempts, m.turn_resumes, m.payload::text AS payload, m.reply_text,
                  m.reply_payload::text AS reply_payload, m.reply_message_id, m.agent_type,
                  m.send_started_at, m.absorbed_message_ids
    ), audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
             correlation_id)
        SELECT g.cid, p.mid, 'message', s.from_state, s.to_state,
               CASE WHEN p.again THEN 'resumed: its previous turn never finished'
                    ELSE 'turn started' END,
               g.token, p.cor
          FROM picked p
          JOIN given g ON g.n = p.n
         CROSS JOIN (VALUES (1, 'processing', 'received'), (2, 'received', 'processing'))
               AS s (k, from_state, to_state)
         WHERE s.k = 2 OR p.again
         ORDER BY p.n, s.k
    ), freed AS (
        UPDATE webhook_conversations c
           SET status = 'idle', lock_owner = NULL, locked_at = NULL, updated_at = now()
          FROM given g
         WHERE p_release_from IS NOT NULL AND c.id = g.cid AND g.fence = g.token
           AND c.fence_token = g.token AND c.status = ANY (p_release_from)
           AND NOT EXISTS (SELECT 1 FROM picked p WHERE p.n = g.n)
        RETURNING g.n, c.id, c.fence_token
    ), freed_audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, entity, from_state, to_state, reason, fence_token)
        SELECT f.id, 'conversation', 'active', 'idle', 'no waiting messages', f.fence_token
          FROM freed f
         ORDER BY f.n
    )
    SELECT g.n,
           CASE WHEN g.fence IS DISTINCT FROM g.token THEN 'stale'
                WHEN s.id IS NULL THEN 'none'
                ELSE 'started' END,
           g.fence, s.id, s.message_id, s.conversation_id, s.phone_number_id,
           CASE WHEN s.id IS NOT NULL THEN COALESCE(g.number, '') END,
           s.message_type, s.wa_timestamp, s.body, s.correlation_id, s.traceparent,
           s.attempts, s.turn_resumes, p.again,
           -- The reason of its last move to 'received' (ingest and every transition write the
           -- two together), without reading the transitions.
           CASE WHEN p.again THEN 'resumed: its previous turn never finished' ELSE p.why END,
           g.name, g.bsuid, g.handle, s.payload, s.reply_text, s.reply_payload,
           s.reply_message_id, s.agent_type, s.send_started_at, s.absorbed_message_ids,
           x.agent_type, x.context, g.last_message_at,
           CASE WHEN s.id IS NOT NULL THEN now() END,
           EXISTS (SELECT 1 FROM freed f WHERE f.n = g.n)
      FROM given g
      LEFT JOIN picked p ON p.n = g.n
      LEFT JOIN started s ON s.n = g.n
      LEFT JOIN LATERAL (
          SELECT a.agent_type, (SELECT t FROM wa_context(a.conversation_id) t) AS context
            FROM agent_contexts a
           WHERE a.conversation_id = s.conversation_id
      ) AS x ON true
     ORDER BY g.n;
END
$$;
