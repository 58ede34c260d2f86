-- Fewer round trips, commits and row versions per agent turn (issue 16).
--
-- 1. The sent reply's id is written with the turn's final transition: the state service passes
--    the id the agent sent (wa_finish_turn p_reply_message_id) and wa_transition_message writes
--    it with status 'replied' in the same row update. The agent no longer records it in a
--    statement of its own for a single-message reply (services/agent/turn.py). A turn cut off
--    between the send and that transition is left as one cut off between the send and the
--    agent's own record was: send_started_at set, no reply id; its next run waits for the
--    reply's status webhook (callback data: the message id) and sends again only without one.
-- 2. The turn's stored state (what the agent read in its own first statement, turn_state) is
--    returned by the statement that starts the turn (wa_start_turn, through wa_claim_turn and
--    wa_finish_turn) and travels in Agent.Reply: the agent reads nothing before calling the
--    model.
-- 3. wa_transition_message writes its audit row from what its update returned instead of
--    reading the message row again; wa_start_turn reads why a message was queued from the
--    message row it already locks (status_reason holds the reason of its last move to
--    'received': every move writes both) instead of the transitions table.
--
-- 4. A turn that finds nothing waiting marks its conversation idle in the same statement
--    (wa_finish_turn / wa_claim_turn p_release_from), instead of the driver's separate
--    release_conversation: one statement and one commit fewer each time a conversation's
--    queue runs dry (about once per message when replies keep up with arrivals).
-- 5. A claim and a release leave last_activity_at alone (each ingested message sets it; the
--    console and retention need no more): with no indexed column changed, they can be HOT
--    updates (db/migrations/0021 drops the index that had status in it).
--
-- The OUT parameters change, so each function is dropped and created again (privileges are
-- applied again after every migration: db/privileges.sql). Columns are always qualified;
-- `#variable_conflict use_column` keeps a column from ever being read as one of the OUT
-- parameters of the same name.

DROP FUNCTION wa_finish_turn(text, text, text[], text, bigint, text, bigint, boolean, text[],
                             text[], text);
DROP FUNCTION wa_claim_turn(bigint, text, text[]);
DROP FUNCTION wa_start_turn(bigint, bigint);
DROP FUNCTION wa_transition_message(text, text, text[], text, bigint, text);

-- 0009's transition and, with p_reply_message_id, the reply sent as that id recorded in the
-- same update (what the agent's record_sent wrote: the furthest delivery status already seen
-- for it, else 'sent').
CREATE FUNCTION wa_transition_message(
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
BEGIN
    IF p_to_state = 'failed' THEN
        -- Its error_count is written below: the conversation is locked first, in the order
        -- wa_start_turn takes the two rows, so two holders never wait on each other.
        PERFORM 1 FROM webhook_conversations c
          WHERE c.id = (SELECT m.conversation_id FROM processed_webhook_messages m
                         WHERE m.message_id = p_message_id)
            FOR NO KEY UPDATE;
    END IF;
    SELECT m.id, m.status, m.conversation_id, c.fence_token
      INTO v_id, from_state, v_conversation_id, fence_token
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
           reply_message_id = COALESCE(p_reply_message_id, m.reply_message_id),
           -- A status that arrived before the send was recorded still counts.
           reply_status = CASE
               WHEN p_reply_message_id IS NULL THEN m.reply_status
               ELSE COALESCE(
                   (SELECT s.reply_status FROM processed_webhook_messages s
                     WHERE s.reply_message_id = p_reply_message_id AND s.kind = 'status'
                     ORDER BY wa_delivery_rank(s.reply_status) DESC LIMIT 1),
                   'sent')
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

-- The state service's release_conversation: conversation p_conversation_id idle (audited) if
-- p_token still holds it and the machine lets it leave p_sources for 'idle'; whether it did.
CREATE FUNCTION wa_release_conversation(
    p_conversation_id bigint,
    p_token bigint,
    p_sources text[]
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_released boolean;
BEGIN
    WITH released AS (
        UPDATE webhook_conversations c
           SET status = 'idle', lock_owner = NULL, locked_at = NULL, updated_at = now()
         WHERE c.id = p_conversation_id AND c.fence_token = p_token
           AND c.status = ANY (p_sources)
        RETURNING c.id, c.fence_token
    ), audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, entity, from_state, to_state, reason, fence_token)
        SELECT r.id, 'conversation', 'active', 'idle', 'no waiting messages', r.fence_token
          FROM released r
    )
    SELECT count(*) > 0 INTO v_released FROM released;
    RETURN v_released;
END
$$;

-- 0017's turn start (a handed-off conversation starts none: the `v_handoff_at` block after the
-- fence check stays; tests/e2e/test_handoff.py fails without it), returning the turn's stored
-- state as well: the message's type and Meta's object of it, the reply stored by an earlier
-- run of the turn and its send state, the burst saved with it, the conversation's context,
-- the customer's last message time (the 24-hour window's start) and the database's clock
-- (services/agent/turn.py reads these; JSON as text, passed on without being parsed).
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
    OUT db_now timestamptz
)
LANGUAGE plpgsql AS $$
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

    SELECT a.agent_type, a.messages::text
      INTO context_agent_type, context
      FROM agent_contexts a
     WHERE a.conversation_id = p_conversation_id;
    -- One entry of processed_messages_customer_last_idx.
    SELECT l.wa_timestamp INTO last_customer_at
      FROM processed_webhook_messages l
     WHERE l.conversation_id = p_conversation_id AND l.kind = 'message'
     ORDER BY l.wa_timestamp DESC
     LIMIT 1;
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

-- 0018's finish, recording the sent reply's id (p_reply_message_id) with the transition.
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

-- 0015's claim, its first turn started with the turn's stored state (wa_start_turn above).
CREATE FUNCTION wa_claim_turn(
    p_conversation_id bigint,
    p_owner text,
    p_sources text[],
    p_release_from text[] DEFAULT NULL,
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
    OUT released boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    WITH previous AS (
        SELECT c.status FROM webhook_conversations c WHERE c.id = p_conversation_id
    ), moved AS (
        UPDATE webhook_conversations c
           SET fence_token = c.fence_token + 1, status = 'active', lock_owner = p_owner,
               locked_at = now(), updated_at = now()
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
           s.username, s.payload, s.reply_text, s.reply_payload, s.reply_message_id,
           s.agent_type, s.send_started_at, s.absorbed_message_ids, s.context_agent_type,
           s.context, s.last_customer_at, s.db_now
      INTO outcome, fence_token, id, message_id, conversation_id, phone_number_id, wa_id,
           message_type, wa_timestamp, body, correlation_id, traceparent, attempts,
           turn_resumes, resumed, queued_because, contact_name, user_id, username, payload,
           reply_text, reply_payload, reply_message_id, agent_type, send_started_at,
           absorbed_message_ids, context_agent_type, context, last_customer_at, db_now
      FROM wa_start_turn(p_conversation_id, claimed) s;
    released := false;
    IF outcome = 'none' AND p_release_from IS NOT NULL THEN
        released := wa_release_conversation(p_conversation_id, claimed, p_release_from);
    END IF;
END
$$;
