-- A conversation's context is kept as entries of a few messages each, and a turn writes only
-- its own two messages (issue 16: no per-turn work that does not depend on the turn).
--
-- agent_contexts.messages held the whole context, up to AGENT_CONTEXT_MAX_MESSAGES (100)
-- messages, as one jsonb value that every turn parsed, wrote and logged again whole to add a
-- question and its answer: in a conversation that has reached the bound, about 23 kB a turn,
-- out of line in the TOAST table. `bench.e2e` with customers of 50 messages' history
-- (`--history 50`) wrote 25 kB of WAL per message against 10 kB for new customers. Now a save
-- adds the turn's messages to the conversation's newest entry (agent_context_entries) while
-- that stays under 1,800 bytes (inline: below the 2 kB at which PostgreSQL moves a value out
-- of line), or starts a new one, and deletes the entries whose messages all fell
-- out of the bound: what a turn writes no longer depends on how long the conversation is, and
-- a context of 100 messages reads as about a dozen rows (one row a turn made it fifty, each on
-- its own page: its read cost PostgreSQL twice the single value's). Messages are numbered per
-- conversation by agent_contexts.last_seq; an entry holds messages seq to seq + n - 1. The
-- entry across the bound is kept whole until it is past it (the agent keeps the newest
-- AGENT_CONTEXT_MAX_MESSAGES of what it reads).
--
-- The read that starts a turn still returns the whole context as one JSON array (wa_start_turn,
-- the agent's turn_state): the entries joined in order. So an entry is kept as the text of its
-- messages as the agent wrote them, comma-separated, without the brackets of their array: the
-- read is a concatenation, with no JSON conversion either way (a `jsonb` array would be parsed
-- on every write and printed on every read; a `json` array's brackets would have to be cut off
-- on every read, which costs more than the rest of the read for a context of 100 messages, the
-- text being UTF-8). The check keeps every entry a non-empty list of JSON values, which is
-- what makes the join valid JSON.
--
-- agent_contexts keeps what is one per conversation (the agent in charge, the context's
-- tokens, the fence of the last save) and the counter; its entries go with it (ON DELETE
-- CASCADE: retention and erasure delete a context as before, wa_prune and wa_forget_customer
-- unchanged). last_seq is moved on by the upsert of the conversation's agent_contexts row, so
-- two writers of one context (a turn's save, an operator's reply: services/agent/operator.sql)
-- number their messages one after the other, each seeing the other's row as committed.
CREATE TABLE agent_context_entries (
    conversation_id bigint NOT NULL
        REFERENCES agent_contexts (conversation_id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    n integer NOT NULL CHECK (n > 0),
    messages text NOT NULL
        CHECK (messages <> '' AND json_typeof(('[' || messages || ']')::json) = 'array'),
    PRIMARY KEY (conversation_id, seq)
) WITH (fillfactor = 70);  -- room on the page for the newest entry's next version (HOT)
-- An entry that one write makes longer than a page is stored out of line, uncompressed (0021).
ALTER TABLE agent_context_entries ALTER COLUMN messages SET STORAGE EXTERNAL;
ALTER TABLE agent_context_entries ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY wa_owner ON agent_context_entries USING ((SELECT wa_owns('agent_context_entries')))
    WITH CHECK ((SELECT wa_owns('agent_context_entries')));

ALTER TABLE agent_contexts ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;

-- Each stored context becomes its first entry.
INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
SELECT a.conversation_id, 1, jsonb_array_length(a.messages),
       substr(a.messages::text, 2, length(a.messages::text) - 2)
  FROM agent_contexts a
 WHERE jsonb_typeof(a.messages) = 'array' AND jsonb_array_length(a.messages) > 0;
UPDATE agent_contexts a
   SET last_seq = jsonb_array_length(a.messages)
 WHERE jsonb_typeof(a.messages) = 'array';

ALTER TABLE agent_contexts DROP COLUMN messages;
-- Set for the whole context inline (0021); a row of a few columns needs neither.
ALTER TABLE agent_contexts RESET (toast_tuple_target);

-- A conversation's context as one JSON array: its entries' messages in order; NULL when it has
-- none. A one-row set-returning SQL function, so that PostgreSQL inlines it where it is read
-- (`(SELECT c FROM wa_context(id) c)`), as 0029's wa_reply_status_seen.
CREATE FUNCTION wa_context(p_conversation_id bigint) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT '[' || string_agg(x.messages, ',' ORDER BY x.seq) || ']'
      FROM agent_context_entries x
     WHERE x.conversation_id = p_conversation_id
$$;

-- The turn's context, from its entries. One statement for the agent in charge and the messages.
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

    SELECT a.agent_type,
           (SELECT c FROM wa_context(p_conversation_id) c)
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

-- A turn's save: p_appended holds the turn's own context messages (its question and its
-- answer), no longer the whole context; p_keep is how many of the newest the context keeps
-- (AGENT_CONTEXT_MAX_MESSAGES). A new signature, so that an agent of an earlier release,
-- which passes the whole context, fails its saves loudly instead of appending it again.
DROP FUNCTION wa_save_turn(bigint, bigint, text, text, text, jsonb, integer, text, bigint,
                           bigint, bigint, text, boolean, jsonb);
CREATE FUNCTION wa_save_turn(
    p_conversation_id bigint,
    p_token bigint,
    p_message_id text,
    p_agent_type text,
    p_previous_agent_type text,
    p_appended json,
    p_keep integer,
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
    v_added integer;
    v_last bigint;
    v_text text;
BEGIN
    IF p_keep IS NULL OR p_keep < 1 THEN
        RAISE EXCEPTION 'wa_save_turn: a context keeps at least one message (p_keep %)', p_keep;
    END IF;
    IF json_typeof(p_appended) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'wa_save_turn: the messages appended are not a JSON array';
    END IF;
    SELECT c.fence_token INTO v_fence
      FROM webhook_conversations c
     WHERE c.id = p_conversation_id
       FOR SHARE;
    IF v_fence IS DISTINCT FROM p_token THEN
        RETURN v_fence;
    END IF;

    v_added := json_array_length(p_appended);
    INSERT INTO agent_contexts AS a
        (conversation_id, agent_type, token_count, fence_token, correlation_id, last_seq)
    VALUES (p_conversation_id, p_agent_type, p_token_count, p_token, p_correlation_id,
            v_added)
    ON CONFLICT (conversation_id) DO UPDATE
       SET agent_type = EXCLUDED.agent_type,
           token_count = EXCLUDED.token_count,
           fence_token = EXCLUDED.fence_token,
           correlation_id = EXCLUDED.correlation_id,
           last_seq = a.last_seq + EXCLUDED.last_seq,
           updated_at = now()
    RETURNING a.last_seq INTO v_last;
    IF v_added > 0 THEN
        v_text := btrim(p_appended::text);
        v_text := substr(v_text, 2, length(v_text) - 2);
        -- To the newest entry (its last message is v_last - v_added: numbers are given in
        -- order, under this row's lock) while it stays under 1,800 bytes; else a new one.
        UPDATE agent_context_entries x
           SET messages = x.messages || ',' || v_text, n = x.n + v_added
         WHERE x.conversation_id = p_conversation_id
           AND x.seq = (SELECT max(y.seq) FROM agent_context_entries y
                         WHERE y.conversation_id = p_conversation_id)
           AND octet_length(x.messages) + octet_length(v_text) < 1800;
        IF NOT FOUND THEN
            INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
            VALUES (p_conversation_id, v_last - v_added + 1, v_added, v_text);
        END IF;
    END IF;
    -- The entries whose messages all fell out of the bound (the agent keeps the newest p_keep
    -- of what it reads).
    DELETE FROM agent_context_entries x
     WHERE x.conversation_id = p_conversation_id AND x.seq + x.n - 1 <= v_last - p_keep;

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

-- Its batch (0023), with the turns' `appended` and `keep` in place of `messages`.
CREATE OR REPLACE FUNCTION wa_save_turns(p_turns jsonb)
RETURNS TABLE (ord integer, fence_token bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT s.*
          FROM ROWS FROM (jsonb_to_recordset(p_turns) AS (
                   conversation_id bigint, token bigint, message_id text, agent_type text,
                   previous_agent_type text, appended json, keep integer, token_count integer,
                   reply_text text, tokens_in bigint, tokens_out bigint, latency_ms bigint,
                   correlation_id text, send_started boolean, reply_payload jsonb,
                   absorbed text[]))
               WITH ORDINALITY
               AS s(conversation_id, token, message_id, agent_type, previous_agent_type,
                    appended, keep, token_count, reply_text, tokens_in, tokens_out,
                    latency_ms, correlation_id, send_started, reply_payload, absorbed, n)
          -- An unlocked read, for the order only (a conversation that does not exist comes
          -- last: its save finds no fence and writes nothing).
          LEFT JOIN webhook_conversations w ON w.id = s.conversation_id
         ORDER BY w.phone_number_id, w.customer_id, s.conversation_id, s.n
    LOOP
        ord := t.n;
        fence_token := wa_save_turn(t.conversation_id, t.token, t.message_id, t.agent_type,
                                    t.previous_agent_type, t.appended, t.keep, t.token_count,
                                    t.reply_text, t.tokens_in, t.tokens_out, t.latency_ms,
                                    t.correlation_id, t.send_started, t.reply_payload);
        PERFORM wa_save_burst(t.conversation_id, t.token, t.message_id, t.absorbed);
        RETURN NEXT;
    END LOOP;
END
$$;
