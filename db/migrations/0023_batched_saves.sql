-- The agent's saves of many conversations' turns in one statement and one commit (issue 16).
--
-- Each turn's reply and context is saved by wa_save_turn and its debounced burst by
-- wa_save_burst (0016, 0018), one statement and one commit per turn: the commit and the round
-- trip cost more than the rows. The agent now coalesces the saves of the turns that finish at
-- once (common/coalesce.py, services/agent/saves.py) into one call of wa_save_turns, which
-- applies each of them with those same two functions, unchanged: each save is fenced by its
-- own turn's token exactly as alone, and the agent still runs one save alone through them
-- (an idle agent, and each save of a batch that failed as a whole, so that only the save that
-- raised fails).
--
-- The turns come as one jsonb array of objects (the arguments of wa_save_turn, by name, with
-- the burst as a JSON array of message ids, null or absent for none): fourteen values of
-- which one is an array of its own do not fit a set of parallel arrays. They are saved in the
-- order of their conversations' keys (phone_number_id, customer_id), then ids, then places in
-- the batch: the order in which the gateway's ingest (services/state/queries.sql,
-- ingest_messages) and the state service's batches of claims and finishes lock the
-- conversation rows they share, so that none of them and a batch of saves deadlock each other
-- across conversations. Should one happen all the same (a key changed in between), the batch
-- is undone and the agent saves each turn again alone. One row per turn comes back: its place
-- in the array (1-based) and its conversation's fence token, as wa_save_turn returns it
-- (when it is not the turn's, nothing of that turn was written).
--
-- The function runs with its caller's rights, like the two it calls (db/privileges.sql
-- grants it to the agent's role only). Columns are always qualified;
-- `#variable_conflict use_column` keeps a column from ever being read as one of the OUT
-- parameters of the same name.
CREATE FUNCTION wa_save_turns(p_turns jsonb)
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
                   previous_agent_type text, messages jsonb, token_count integer,
                   reply_text text, tokens_in bigint, tokens_out bigint, latency_ms bigint,
                   correlation_id text, send_started boolean, reply_payload jsonb,
                   absorbed text[]))
               WITH ORDINALITY
               AS s(conversation_id, token, message_id, agent_type, previous_agent_type,
                    messages, token_count, reply_text, tokens_in, tokens_out, latency_ms,
                    correlation_id, send_started, reply_payload, absorbed, n)
          -- An unlocked read, for the order only (a conversation that does not exist comes
          -- last: its save finds no fence and writes nothing).
          LEFT JOIN webhook_conversations w ON w.id = s.conversation_id
         ORDER BY w.phone_number_id, w.customer_id, s.conversation_id, s.n
    LOOP
        ord := t.n;
        fence_token := wa_save_turn(t.conversation_id, t.token, t.message_id, t.agent_type,
                                    t.previous_agent_type, t.messages, t.token_count,
                                    t.reply_text, t.tokens_in, t.tokens_out, t.latency_ms,
                                    t.correlation_id, t.send_started, t.reply_payload);
        PERFORM wa_save_burst(t.conversation_id, t.token, t.message_id, t.absorbed);
        RETURN NEXT;
    END LOOP;
END
$$;
