-- The turns of many conversations claimed, and finished, in one statement (issue 16: CPU per
-- message). Each claim and each finish was a statement of its own, with its own round trip,
-- transaction and commit, whose fixed price (about 0.2 ms of PostgreSQL's CPU for the commit
-- alone, and the driver's per-call cost in the state service) is larger than its row work.
-- The state service now gathers the claims (and the finishes) of the conversations that wait
-- at the same moment (services/state/store.py, common/coalesce.py) and runs them here: one
-- row per item, its ordinal (1-based, its place in the arrays) first, then exactly what the
-- single function returns for it.
--
-- Each item is the single function (wa_claim_turn / wa_finish_turn, db/migrations/0020),
-- called unchanged: the same locks, fences, audit rows and outcomes. Each call is a
-- VOLATILE function's own statements, so it sees what the items before it wrote, as it would
-- have seen them committed before.
--
-- Lock order: the items run in the order of their conversations' keys (phone_number_id,
-- customer_id), then ids, then ordinals: the order in which the ingest statement
-- (services/state/queries.sql, ingest_messages) locks the conversation rows of its batch. So
-- two batches, and a batch and an ingest, lock the conversations they share in the same order
-- and cannot deadlock each other across conversations (the rows of one conversation are
-- locked in the order its single function always took them). The whole batch is one
-- transaction: an error in any item (a deadlock with a statement that locks in another
-- order included, or a key changed in between) undoes all of it, and the state service then
-- runs each item alone (its own statement), so only an item that fails by itself fails.
--
-- Arrays are given one element per item; what is the same for every item of a batch is a
-- scalar. A finish with a debounced burst (a text[] of its own per item) is not batched.

CREATE FUNCTION wa_claim_turns(
    p_conversation_ids bigint[],
    p_owners text[],
    p_sources text[],
    p_release_from text[] DEFAULT NULL
) RETURNS TABLE (
    ord integer,
    claimed bigint,
    outcome text,
    fence_token bigint,
    id bigint,
    message_id text,
    conversation_id bigint,
    phone_number_id text,
    wa_id text,
    message_type text,
    wa_timestamp timestamptz,
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
    send_started_at timestamptz,
    absorbed_message_ids text[],
    context_agent_type text,
    context text,
    last_customer_at timestamptz,
    db_now timestamptz,
    released boolean
)
LANGUAGE sql AS $$
    -- The sorted subquery is not flattened (it has an ORDER BY): the nested loop calls the
    -- function once per item, in that order. (A conversation that does not exist comes last;
    -- its claim finds nothing.)
    SELECT t.ord::integer, c.*
      FROM (SELECT u.conversation_id, u.owner, u.ord
              FROM unnest(p_conversation_ids, p_owners)
                   WITH ORDINALITY AS u(conversation_id, owner, ord)
              LEFT JOIN webhook_conversations w ON w.id = u.conversation_id
             ORDER BY w.phone_number_id, w.customer_id, u.conversation_id, u.ord) AS t
     CROSS JOIN LATERAL wa_claim_turn(t.conversation_id, t.owner, p_sources,
                                      p_release_from) AS c
$$;

-- Each item in the same order as above (by its conversation_id's key). p_from and
-- p_release_from: the same for every item (the caller batches together the finishes from and
-- to the same states); the burst (p_absorbed) is empty for each.
CREATE FUNCTION wa_finish_turns(
    p_message_ids text[],
    p_to_states text[],
    p_from text[],
    p_reasons text[],
    p_tokens bigint[],
    p_correlation_ids text[],
    p_conversation_ids bigint[],
    p_next boolean[],
    p_reply_message_ids text[],
    p_release_from text[] DEFAULT NULL
) RETURNS TABLE (
    ord integer,
    finished text,
    finished_from text,
    finished_fence bigint,
    outcome text,
    fence_token bigint,
    id bigint,
    message_id text,
    conversation_id bigint,
    phone_number_id text,
    wa_id text,
    message_type text,
    wa_timestamp timestamptz,
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
    send_started_at timestamptz,
    absorbed_message_ids text[],
    context_agent_type text,
    context text,
    last_customer_at timestamptz,
    db_now timestamptz,
    absorbed text[],
    released boolean
)
LANGUAGE sql AS $$
    SELECT t.ord::integer, f.*
      FROM (SELECT u.*
              FROM unnest(p_message_ids, p_to_states, p_reasons, p_tokens, p_correlation_ids,
                          p_conversation_ids, p_next, p_reply_message_ids)
                   WITH ORDINALITY AS u(message_id, to_state, reason, token, correlation_id,
                                        conversation_id, next, reply_message_id, ord)
              LEFT JOIN webhook_conversations w ON w.id = u.conversation_id
             ORDER BY w.phone_number_id, w.customer_id, u.conversation_id, u.ord) AS t
     CROSS JOIN LATERAL wa_finish_turn(t.message_id, t.to_state, p_from, t.reason, t.token,
                                       t.correlation_id, t.conversation_id, t.next, '{}', '{}',
                                       '', t.reply_message_id, p_release_from) AS f
$$;
