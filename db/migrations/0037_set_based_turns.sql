-- A batch of turns' claims, saves and final moves, each in a few statements for the whole
-- batch instead of a few for each turn (issue 16: PostgreSQL's CPU per message).
--
-- Since 0022 (0023 for the saves) the batch functions ran their single ones once per item: a
-- burst's batch of 16 turns ran about a hundred statements (the claim, the turn's start and its
-- five statements, the release), each paying PostgreSQL's executor start and end, for a few
-- index probes of row work each. `bench.turn_sql --together 16` put a claim at 391 µs and a
-- finish at 399 µs of backend CPU a message, against 158 µs for the ingest, which is one
-- statement for the whole batch. Each step is now one statement over the batch: the claims'
-- updates, the messages' moves, the next turns' starts (with the releases of conversations
-- where none waits), the saves' contexts and then the rest of the saves.
--
-- What stays the same: each item's outcome, fences, audit rows and returned row are what its
-- single function gives (wa_claim_turn, wa_finish_turn, wa_start_turn), tested item by item in
-- tests/integration/test_set_based_turns.py. Locks are taken in the order every batch and
-- ingest takes them (0022: by the conversations' keys), each kind in a statement of its own
-- before the statement that writes: first every conversation row of the batch, then every
-- message row the batch may move (wa_lock_turn_messages: by the conversations' keys, then ids,
-- the order wa_ingest_statuses takes them in). A statement that waited for a lock reads what
-- it waited for with the snapshot it had before the wait; so the writes run in later
-- statements, whose snapshots see what the holders committed (tested with a status webhook
-- and an operator's answer committing while a batch waits for them). Items of one batch no
-- longer see each other's writes, which only matters for two items of one conversation (or
-- one message): such a batch runs its items one by one, as before. A deadlock with a statement
-- that locks in another order still undoes the whole batch, and the state service then runs
-- each item alone.

-- The message rows a batch of turns may move, locked in that order: the given messages (the
-- turns that end), and for each given conversation the message its next turn would start (its
-- oldest waiting message other than those), or, for a conversation handed off to a person,
-- every waiting message (wa_hold_for_person moves them all).
CREATE FUNCTION wa_lock_turn_messages(p_conversation_ids bigint[], p_message_ids text[])
RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    PERFORM 1
       FROM processed_webhook_messages m
       LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
      WHERE m.id IN (SELECT t.id
                       FROM processed_webhook_messages t
                      WHERE t.message_id = ANY (p_message_ids)
                     UNION ALL
                     SELECT w.id
                       FROM webhook_conversations v
                      CROSS JOIN LATERAL (
                          SELECT t.id
                            FROM processed_webhook_messages t
                           WHERE t.conversation_id = v.id
                             AND t.status IN ('received', 'processing')
                             AND t.message_id <> ALL (p_message_ids)
                           ORDER BY t.wa_timestamp, t.id
                           -- (LIMIT NULL: all of them)
                           LIMIT CASE WHEN v.handoff_at IS NULL THEN 1 END) AS w
                      WHERE v.id = ANY (p_conversation_ids))
      ORDER BY c.phone_number_id, c.customer_id, m.conversation_id, m.id
        FOR UPDATE OF m;
END
$$;

-- The oldest waiting message of each conversation moved to processing, as wa_start_turn does
-- for one, and, with p_release_from, each conversation where none waits released as
-- wa_release_conversation does. The caller holds the conversation rows' locks and those of
-- the messages it may move (wa_lock_turn_messages), and gives the conversations in the order of
-- their keys. One row per item, its place in the arrays first.
CREATE FUNCTION wa_start_turns(
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
           CASE WHEN s.id IS NOT NULL THEN COALESCE(g.number, NULLIF(s.wa_id, ''), '') END,
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

CREATE OR REPLACE FUNCTION wa_claim_turns(
    p_conversation_ids bigint[],
    p_owners text[],
    p_sources text[],
    p_release_from text[] DEFAULT NULL::text[]
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
DECLARE
    v_items integer[];
    v_ids bigint[];
    v_owners text[];
    v_tokens bigint[];
BEGIN
    IF (SELECT count(DISTINCT x) FROM unnest(p_conversation_ids) AS x)
       < cardinality(p_conversation_ids) THEN
        -- Two claims of one conversation: the second sees the first's, one by one (0022).
        RETURN QUERY
            SELECT t.ord::integer, c.*
              FROM (SELECT u.conversation_id, u.owner, u.ord
                      FROM unnest(p_conversation_ids, p_owners)
                           WITH ORDINALITY AS u(conversation_id, owner, ord)
                      LEFT JOIN webhook_conversations w ON w.id = u.conversation_id
                     ORDER BY w.phone_number_id, w.customer_id, u.conversation_id, u.ord) AS t
             CROSS JOIN LATERAL wa_claim_turn(t.conversation_id, t.owner, p_sources,
                                              p_release_from) AS c;
        RETURN;
    END IF;

    -- The items in the order of their conversations' keys (a conversation that does not
    -- exist comes last: its claim finds nothing).
    SELECT array_agg(u.n::integer ORDER BY w.phone_number_id, w.customer_id, u.cid, u.n),
           array_agg(u.cid ORDER BY w.phone_number_id, w.customer_id, u.cid, u.n),
           array_agg(u.owner ORDER BY w.phone_number_id, w.customer_id, u.cid, u.n)
      INTO v_items, v_ids, v_owners
      FROM unnest(p_conversation_ids, p_owners) WITH ORDINALITY AS u(cid, owner, n)
      LEFT JOIN webhook_conversations w ON w.id = u.cid;

    -- The claims: each fencing token moved on, each conversation marked active (audited).
    WITH locked AS MATERIALIZED (
        SELECT c.id AS cid, c.status AS was
          FROM webhook_conversations c
         WHERE c.id = ANY (v_ids)
         ORDER BY c.phone_number_id, c.customer_id, c.id
           FOR NO KEY UPDATE
    ), moved AS (
        UPDATE webhook_conversations c
           SET fence_token = c.fence_token + 1, status = 'active', lock_owner = u.owner,
               locked_at = now(), updated_at = now()
          FROM locked l
          JOIN unnest(v_ids, v_owners) AS u(cid, owner) ON u.cid = l.cid
         WHERE c.id = l.cid AND l.was = ANY (p_sources)
        RETURNING c.id AS cid, c.fence_token AS token, l.was, u.owner
    ), audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, entity, from_state, to_state, reason, fence_token)
        SELECT m.cid, 'conversation', m.was, 'active',
               CASE WHEN m.was = 'idle' THEN 'claimed' ELSE 'taken over from a previous holder'
               END || ' by ' || m.owner, m.token
          FROM moved m
         ORDER BY array_position(v_ids, m.cid)
    )
    SELECT array_agg(m.token ORDER BY k.n)
      INTO v_tokens
      FROM unnest(v_ids) WITH ORDINALITY AS k(cid, n)
      LEFT JOIN moved m ON m.cid = k.cid;

    PERFORM wa_lock_turn_messages(
        ARRAY(SELECT k.cid FROM unnest(v_ids, v_tokens) AS k(cid, token)
               WHERE k.token IS NOT NULL),
        '{}');

    -- Each claimed conversation's turn (an unclaimed one, with no token, starts nothing).
    RETURN QUERY
        SELECT k.item, k.token, s.outcome, s.fence_token, s.id, s.message_id,
               s.conversation_id, s.phone_number_id, s.wa_id, s.message_type, s.wa_timestamp,
               s.body, s.correlation_id, s.traceparent, s.attempts, s.turn_resumes, s.resumed,
               s.queued_because, s.contact_name, s.user_id, s.username, s.payload,
               s.reply_text, s.reply_payload, s.reply_message_id, s.agent_type,
               s.send_started_at, s.absorbed_message_ids, s.context_agent_type, s.context,
               s.last_customer_at, s.db_now, s.released
          FROM unnest(v_items, v_tokens) WITH ORDINALITY AS k(item, token, n)
          LEFT JOIN wa_start_turns(v_ids, v_tokens, p_release_from) AS s
                 ON s.ord = k.n AND k.token IS NOT NULL
         ORDER BY k.n;
END
$$;

CREATE OR REPLACE FUNCTION wa_finish_turns(
    p_message_ids text[],
    p_to_states text[],
    p_from text[],
    p_reasons text[],
    p_tokens bigint[],
    p_correlation_ids text[],
    p_conversation_ids bigint[],
    p_next boolean[],
    p_reply_message_ids text[],
    p_release_from text[] DEFAULT NULL::text[]
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
    absorbed text[],
    released boolean
)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_finished text[];
    v_from text[];
    v_fence bigint[];
    v_items integer[];
    v_ids bigint[];
    v_tokens bigint[];
BEGIN
    IF (SELECT count(DISTINCT x) FROM unnest(p_conversation_ids) AS x)
           < cardinality(p_conversation_ids)
       OR (SELECT count(DISTINCT x) FROM unnest(p_message_ids) AS x)
           < cardinality(p_message_ids) THEN
        -- Two items of one conversation or message: each sees the one before, one by one.
        RETURN QUERY
            SELECT t.ord::integer, f.*
              FROM (SELECT u.*
                      FROM unnest(p_message_ids, p_to_states, p_reasons, p_tokens,
                                  p_correlation_ids, p_conversation_ids, p_next,
                                  p_reply_message_ids)
                           WITH ORDINALITY AS u(message_id, to_state, reason, token,
                                                correlation_id, conversation_id, next,
                                                reply_message_id, ord)
                      LEFT JOIN webhook_conversations w ON w.id = u.conversation_id
                     ORDER BY w.phone_number_id, w.customer_id, u.conversation_id, u.ord) AS t
             CROSS JOIN LATERAL wa_finish_turn(t.message_id, t.to_state, p_from, t.reason,
                                               t.token, t.correlation_id, t.conversation_id,
                                               t.next, '{}', '{}', '', t.reply_message_id,
                                               p_release_from) AS f;
        RETURN;
    END IF;

    -- The conversations first, then their messages: the order every writer of the two rows
    -- takes them in (wa_finish_turn), across conversations by their keys.
    PERFORM 1
       FROM webhook_conversations c
      WHERE c.id = ANY (p_conversation_ids)
      ORDER BY c.phone_number_id, c.customer_id, c.id
        FOR NO KEY UPDATE;
    PERFORM wa_lock_turn_messages(
        ARRAY(SELECT u.cid FROM unnest(p_conversation_ids, p_next) AS u(cid, next)
               WHERE u.next IS NOT FALSE),
        p_message_ids);

    -- Each message's move, judged as wa_transition_message judges one: unknown (no such
    -- message), stale (its conversation's token is not the turn's), illegal (not from a state
    -- it may leave for this one), else done: moved and audited.
    WITH given AS (
        SELECT u.*
          FROM unnest(p_message_ids, p_to_states, p_reasons, p_tokens, p_correlation_ids,
                      p_conversation_ids, p_next, p_reply_message_ids)
               WITH ORDINALITY AS u(mid, to_state, reason, token, cor, cid, next, reply_id, n)
    ), current AS MATERIALIZED (
        SELECT g.n, m.id AS row_id, m.status AS was, m.conversation_id AS mcid,
               c.fence_token AS fence, m.kind, m.correlation_id AS mcor
          FROM given g
          JOIN processed_webhook_messages m ON m.message_id = g.mid
          LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
    ), judged AS MATERIALIZED (
        SELECT g.*, c.row_id, c.was, c.mcid, c.fence, c.mcor,
               CASE WHEN c.row_id IS NULL OR c.kind <> 'message' THEN 'unknown'
                    WHEN g.token IS NOT NULL AND c.fence IS DISTINCT FROM g.token THEN 'stale'
                    WHEN NOT (c.was = ANY (p_from)) THEN 'illegal'
                    ELSE 'done' END AS verdict
          FROM given g
          LEFT JOIN current c ON c.n = g.n
    ), moved AS (
        UPDATE processed_webhook_messages m
           SET status = j.to_state,
               status_reason = NULLIF(j.reason, ''),
               attempts = m.attempts + CASE WHEN j.to_state = 'processing' THEN 1 ELSE 0 END,
               started_at = CASE WHEN j.to_state = 'processing' THEN now() ELSE m.started_at END,
               finished_at = CASE WHEN j.to_state IN ('replied', 'skipped', 'failed',
                                                      'dead_lettered')
                                  THEN now() ELSE m.finished_at END,
               reply_message_id = COALESCE(j.reply_id, m.reply_message_id),
               -- A status that arrived before the send was recorded still counts.
               reply_status = CASE
                   WHEN j.reply_id IS NULL THEN m.reply_status
                   ELSE (SELECT seen FROM wa_reply_status_seen(j.reply_id) seen)
               END,
               updated_at = now()
          FROM judged j
         WHERE m.id = j.row_id AND j.verdict = 'done'
        RETURNING m.id
    ), errors AS (
        UPDATE webhook_conversations c
           SET error_count = c.error_count + 1, updated_at = now()
          FROM judged j
         WHERE j.verdict = 'done' AND j.to_state = 'failed' AND c.id = j.mcid
        RETURNING c.id
    ), audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
             correlation_id)
        SELECT j.mcid, j.mid, 'message', j.was, j.to_state, j.reason, j.token,
               COALESCE(NULLIF(j.cor, ''), j.mcor)
          FROM judged j
         WHERE j.verdict = 'done'
         ORDER BY j.n
    )
    SELECT array_agg(j.verdict ORDER BY j.n),
           array_agg(j.was ORDER BY j.n),
           array_agg(j.fence ORDER BY j.n),
           -- The next turns to look for, in the order of their conversations' keys.
           array_agg(j.n::integer ORDER BY w.phone_number_id, w.customer_id, j.cid)
               FILTER (WHERE j.verdict = 'done' AND j.next IS NOT FALSE),
           array_agg(j.cid ORDER BY w.phone_number_id, w.customer_id, j.cid)
               FILTER (WHERE j.verdict = 'done' AND j.next IS NOT FALSE),
           array_agg(j.token ORDER BY w.phone_number_id, w.customer_id, j.cid)
               FILTER (WHERE j.verdict = 'done' AND j.next IS NOT FALSE)
      INTO v_finished, v_from, v_fence, v_items, v_ids, v_tokens
      FROM judged j
      LEFT JOIN webhook_conversations w ON w.id = j.cid;

    RETURN QUERY
        SELECT t.n::integer, t.verdict, t.was, t.fence,
               COALESCE(s.outcome, 'unasked'), s.fence_token, s.id, s.message_id,
               s.conversation_id, s.phone_number_id, s.wa_id, s.message_type, s.wa_timestamp,
               s.body, s.correlation_id, s.traceparent, s.attempts, s.turn_resumes, s.resumed,
               s.queued_because, s.contact_name, s.user_id, s.username, s.payload,
               s.reply_text, s.reply_payload, s.reply_message_id, s.agent_type,
               s.send_started_at, s.absorbed_message_ids, s.context_agent_type, s.context,
               s.last_customer_at, s.db_now, '{}'::text[], s.released
          FROM unnest(v_finished, v_from, v_fence) WITH ORDINALITY AS t(verdict, was, fence, n)
          LEFT JOIN (SELECT v_items[r.ord] AS item, r.*
                       FROM wa_start_turns(v_ids, v_tokens, p_release_from) AS r) AS s
                 ON s.item = t.n
         ORDER BY t.n;
END
$$;

-- The saves of a batch of turns (0023), each what wa_save_turn and wa_save_burst do for one, in
-- two statements: the fences checked under the conversations' shared locks (taken in the order
-- of their keys) with the contexts of the turns that hold their conversation, then their
-- context entries, replies (with their bursts), routing audit rows and session figures. A
-- batch with two turns of one conversation, or with arguments the single function refuses
-- (which it says how), runs its turns one by one as before.
CREATE OR REPLACE FUNCTION wa_save_turns(p_turns jsonb)
RETURNS TABLE (ord integer, fence_token bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    t record;
    v_one_by_one boolean;
    v_fences bigint[];
    v_lasts bigint[];
BEGIN
    SELECT count(*) > count(DISTINCT s.conversation_id)
           OR bool_or(s.keep IS NULL OR s.keep < 1
                      OR json_typeof(s.appended) IS DISTINCT FROM 'array')
      INTO v_one_by_one
      FROM jsonb_to_recordset(p_turns) AS s(conversation_id bigint, keep integer, appended json);
    IF v_one_by_one THEN
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
        RETURN;
    END IF;

    -- The fences, under the conversations' shared locks (in the order of their keys), and the
    -- contexts of the turns that hold theirs. An operator's answer may hold a context's row:
    -- the upsert waits for it and counts on its newest version; what the answer added to the
    -- entries is read by the next statement.
    WITH given AS MATERIALIZED (
        SELECT s.*
          FROM ROWS FROM (jsonb_to_recordset(p_turns) AS (
                   conversation_id bigint, token bigint, agent_type text, appended json,
                   token_count integer, correlation_id text))
               WITH ORDINALITY AS s(cid, token, agent, appended, token_count, cor, n)
    ), locked AS MATERIALIZED (
        SELECT c.id AS cid, c.fence_token AS fence,
               row_number() OVER () AS k
          FROM (SELECT c.id, c.fence_token
                  FROM webhook_conversations c
                 WHERE c.id IN (SELECT g.cid FROM given g)
                 ORDER BY c.phone_number_id, c.customer_id, c.id
                   FOR SHARE) AS c
    ), ctx AS (
        INSERT INTO agent_contexts AS a
            (conversation_id, agent_type, token_count, fence_token, correlation_id, last_seq)
        SELECT g.cid, g.agent, g.token_count, g.token, g.cor, json_array_length(g.appended)
          FROM given g
          JOIN locked l ON l.cid = g.cid AND l.fence = g.token
         ORDER BY l.k
        ON CONFLICT (conversation_id) DO UPDATE
           SET agent_type = EXCLUDED.agent_type,
               token_count = EXCLUDED.token_count,
               fence_token = EXCLUDED.fence_token,
               correlation_id = EXCLUDED.correlation_id,
               last_seq = a.last_seq + EXCLUDED.last_seq,
               updated_at = now()
        RETURNING a.conversation_id AS cid, a.last_seq AS last
    )
    SELECT array_agg(l.fence ORDER BY g.n), array_agg(c.last ORDER BY g.n)
      INTO v_fences, v_lasts
      FROM given g
      LEFT JOIN locked l ON l.cid = g.cid
      LEFT JOIN ctx c ON c.cid = g.cid;

    -- The rest of each saved turn: its context's entries, its reply (the message locked in the
    -- order of the conversations' keys first), the routing's audit row, the session's figures.
    RETURN QUERY
    WITH given AS MATERIALIZED (
        SELECT s.*, json_array_length(s.appended) AS added,
               -- The messages without the array's brackets: appended to an entry's as text.
               substr(btrim(s.appended::text), 2, length(btrim(s.appended::text)) - 2) AS text,
               v_lasts[s.n] AS last
          FROM ROWS FROM (jsonb_to_recordset(p_turns) AS (
                   conversation_id bigint, token bigint, message_id text, agent_type text,
                   previous_agent_type text, appended json, keep integer,
                   reply_text text, tokens_in bigint, tokens_out bigint, latency_ms bigint,
                   correlation_id text, send_started boolean, reply_payload jsonb,
                   absorbed text[]))
               WITH ORDINALITY
               AS s(cid, token, mid, agent, previous_agent, appended, keep, reply, tokens_in,
                    tokens_out, latency_ms, cor, send_started, reply_payload, absorbed, n)
    ), ok AS MATERIALIZED (
        -- The turns that hold their conversation: their context was saved above.
        SELECT g.* FROM given g WHERE g.last IS NOT NULL
    ), held AS MATERIALIZED (
        SELECT m.id
          FROM processed_webhook_messages m
          JOIN ok o ON o.mid = m.message_id
          LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
         ORDER BY c.phone_number_id, c.customer_id, m.conversation_id, m.id
           FOR NO KEY UPDATE OF m
    ), grown AS (
        -- To the newest entry while it stays under 1,800 bytes and a day old (wa_save_turn);
        -- else a new one, below.
        UPDATE agent_context_entries x
           SET messages = x.messages || ',' || o.text, n = x.n + o.added
          FROM ok o
         WHERE o.added > 0 AND x.conversation_id = o.cid
           AND x.seq = (SELECT max(y.seq) FROM agent_context_entries y
                         WHERE y.conversation_id = o.cid)
           AND octet_length(x.messages) + octet_length(o.text) < 1800
           AND x.created_at > now() - interval '1 day'
        RETURNING x.conversation_id AS cid, x.seq
    ), fresh AS (
        INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
        SELECT o.cid, o.last - o.added + 1, o.added, o.text
          FROM ok o
         WHERE o.added > 0 AND NOT EXISTS (SELECT 1 FROM grown r WHERE r.cid = o.cid)
         ORDER BY o.cid
    ), dropped AS (
        -- The entries whose messages all fell out of the bound (what grew keeps its newest).
        DELETE FROM agent_context_entries x
         USING ok o
         WHERE x.conversation_id = o.cid AND x.seq + x.n - 1 <= o.last - o.keep
           AND NOT EXISTS (SELECT 1 FROM grown r WHERE r.cid = x.conversation_id
                                                   AND r.seq = x.seq)
    ), replied AS (
        UPDATE processed_webhook_messages m
           SET reply_text = o.reply,
               reply_payload = o.reply_payload,
               agent_type = o.agent,
               send_started_at = CASE WHEN o.send_started THEN now() ELSE m.send_started_at END,
               -- The debounced burst it answers (wa_save_burst).
               absorbed_message_ids = CASE
                   WHEN cardinality(o.absorbed) > 0 AND m.kind = 'message'
                        AND m.conversation_id = o.cid THEN o.absorbed
                   ELSE m.absorbed_message_ids END,
               updated_at = now()
          FROM ok o
          JOIN held h ON true
         WHERE m.message_id = o.mid AND m.id = h.id
    ), routed AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
             correlation_id)
        SELECT o.cid, o.mid, 'agent', o.previous_agent, o.agent,
               'routed by keyword in message ' || o.mid, o.token, o.cor
          FROM ok o
         WHERE o.agent IS DISTINCT FROM o.previous_agent
         ORDER BY o.cid
    ), sessions AS (
        INSERT INTO agent_sessions AS s
            (conversation_id, agent_type, turns, tokens_in, tokens_out, total_latency_ms,
             errors, correlation_id)
        SELECT o.cid, o.agent, 1, o.tokens_in, o.tokens_out, o.latency_ms, 0, o.cor
          FROM ok o
         ORDER BY o.cid
        ON CONFLICT (conversation_id, agent_type) DO UPDATE
           SET turns = s.turns + EXCLUDED.turns,
               tokens_in = s.tokens_in + EXCLUDED.tokens_in,
               tokens_out = s.tokens_out + EXCLUDED.tokens_out,
               total_latency_ms = s.total_latency_ms + EXCLUDED.total_latency_ms,
               errors = s.errors + EXCLUDED.errors,
               correlation_id = EXCLUDED.correlation_id,
               last_active_at = now()
    )
    SELECT g.n::integer, v_fences[g.n]
      FROM given g
     ORDER BY g.n;
END
$$;

-- Only a statement that holds a conversation's row may make one of its messages wait: the
-- batches lock every message they may start while holding the conversation (above), and a
-- message made to wait meanwhile by a redrive, which locked the conversation only to fail a
-- message, was started unlocked, with a context read before the lock's wait. Unchanged but for
-- the lock; the plan setting of 0032 repeated (CREATE OR REPLACE drops it).
CREATE OR REPLACE FUNCTION wa_transition_message(
    p_message_id text,
    p_to_state text,
    p_from text[],
    p_reason text,
    p_token bigint,
    p_correlation_id text,
    p_reply_message_id text DEFAULT NULL::text,
    OUT outcome text,
    OUT from_state text,
    OUT fence_token bigint
) RETURNS record
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_conversation_id bigint;
    v_correlation_id text;
    v_kind text;
BEGIN
    IF p_to_state IN ('failed', 'received') THEN
        -- A failure's error_count is written below; a message made to wait again (a redrive,
        -- a turn whose agent did not answer) is what a batch of turns locks its conversation
        -- for before it looks for waiting messages (wa_lock_turn_messages, 0037): whatever makes
        -- a message wait holds its conversation's row, as the ingest does. The conversation is
        -- locked first, in the order wa_start_turn takes the two rows, so two holders never
        -- wait on each other.
        PERFORM 1 FROM webhook_conversations c
          WHERE c.id = (SELECT m.conversation_id FROM processed_webhook_messages m
                         WHERE m.message_id = p_message_id)
            FOR NO KEY UPDATE;
    END IF;
    -- By its unique key alone: with `kind = 'message'` in the condition, a plan made while the
    -- table is small may read the whole partial index on kind instead (same estimated cost),
    -- and that plan is kept. The message_id is unique across kinds, so this reads one row.
    SELECT m.id, m.status, m.conversation_id, c.fence_token, m.kind
      INTO v_id, from_state, v_conversation_id, fence_token, v_kind
      FROM processed_webhook_messages m
      LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
     WHERE m.message_id = p_message_id
       FOR UPDATE OF m;
    IF NOT FOUND OR v_kind <> 'message' THEN
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
               ELSE (SELECT seen FROM wa_reply_status_seen(p_reply_message_id) seen)
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
