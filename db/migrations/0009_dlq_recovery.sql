-- Dead-letter items that wait out a model outage without using attempts, stranded `retrying`
-- items counted, error_count written, and the stuck views following STUCK_TIMEOUT_SECONDS.

-- A redrive the model's open circuit breaker refused made no model call: it is deferred, not
-- counted. `deferrals` and `deferred_since` bound that wait (DLQ_MAX_DEFER_SECONDS); `probe`
-- marks the item the worker let through a half-open breaker: its failure says the model is
-- still down, not that the message is bad.
ALTER TABLE webhook_dlq
    ADD COLUMN deferrals integer NOT NULL DEFAULT 0,
    ADD COLUMN deferred_since timestamptz,
    ADD COLUMN probe boolean NOT NULL DEFAULT false;

-- Settings the monitoring views must follow, written by the state service at start
-- (name -> value). A database nobody has started a service on yet gets the defaults.
CREATE TABLE wa_runtime_settings (
    name        text PRIMARY KEY,
    value       numeric NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- STUCK_TIMEOUT_SECONDS as the running services have it (120 s until one has started).
CREATE FUNCTION wa_stuck_timeout() RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT make_interval(secs => s.value) FROM wa_runtime_settings s
          WHERE s.name = 'stuck_timeout_seconds'),
        interval '120 seconds')
$$;

CREATE OR REPLACE VIEW webhook_conversation_health AS
SELECT c.id AS conversation_id,
       c.phone_number_id,
       c.wa_id,
       c.contact_name,
       c.status,
       c.fence_token,
       c.locked_at,
       c.last_activity_at,
       EXTRACT(EPOCH FROM now() - c.last_activity_at)::bigint AS seconds_since_activity,
       coalesce(m.total, 0) AS messages,
       coalesce(m.waiting, 0) AS waiting,
       coalesce(m.replied, 0) AS replied,
       coalesce(m.skipped, 0) AS skipped,
       coalesce(m.failed, 0) AS failed,
       coalesce(m.dead_lettered, 0) AS dead_lettered,
       CASE
           WHEN coalesce(m.waiting, 0) > 0 AND c.last_activity_at < now() - wa_stuck_timeout()
               THEN 'stuck'
           WHEN coalesce(m.failed, 0) + coalesce(m.dead_lettered, 0) > 0 THEN 'degraded'
           ELSE 'healthy'
       END AS health
  FROM webhook_conversations c
  LEFT JOIN LATERAL (
      SELECT count(*) AS total,
             count(*) FILTER (WHERE status IN ('received', 'processing')) AS waiting,
             count(*) FILTER (WHERE status = 'replied') AS replied,
             count(*) FILTER (WHERE status = 'skipped') AS skipped,
             count(*) FILTER (WHERE status = 'failed') AS failed,
             count(*) FILTER (WHERE status = 'dead_lettered') AS dead_lettered
        FROM processed_webhook_messages pm
       WHERE pm.conversation_id = c.id AND pm.kind = 'message'
  ) m ON true;

-- Work in flight longer than STUCK_TIMEOUT_SECONDS (the sweeper recovers it).
CREATE OR REPLACE VIEW stuck_webhook_conversations AS
SELECT m.conversation_id,
       c.wa_id,
       c.status AS conversation_status,
       c.lock_owner,
       count(*) AS stuck_messages,
       min(m.received_at) AS oldest_received_at,
       EXTRACT(EPOCH FROM now() - min(coalesce(m.started_at, m.received_at)))::bigint
           AS stuck_seconds,
       bool_or(m.status = 'processing') AS in_turn
  FROM processed_webhook_messages m
  JOIN webhook_conversations c ON c.id = m.conversation_id
 WHERE m.status IN ('received', 'processing')
   AND coalesce(m.started_at, m.received_at) < now() - wa_stuck_timeout()
 GROUP BY m.conversation_id, c.wa_id, c.status, c.lock_owner;

-- `stuck_seconds`: the stuck timeout to judge by; NULL (the default) is the running services'
-- STUCK_TIMEOUT_SECONDS. A `retrying` dead-letter item is stranded when it has been retrying
-- longer than that while its message is not in flight (the dlq worker puts it back).
DROP FUNCTION check_webhook_system_health();
CREATE FUNCTION check_webhook_system_health(stuck_seconds numeric DEFAULT NULL)
RETURNS TABLE (check_name text, status text, value numeric, detail text)
LANGUAGE sql STABLE AS $$
    WITH timeout AS (
        SELECT coalesce(make_interval(secs => stuck_seconds), wa_stuck_timeout()) AS t
    ), stuck AS (
        SELECT count(DISTINCT m.conversation_id) AS n
          FROM processed_webhook_messages m, timeout
         WHERE m.status IN ('received', 'processing')
           AND coalesce(m.started_at, m.received_at) < now() - timeout.t
    ), dlq AS (
        SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'dead') AS dead,
               coalesce(EXTRACT(EPOCH FROM now() - min(created_at)
                        FILTER (WHERE status = 'pending')), 0) AS oldest
          FROM webhook_dlq WHERE status IN ('pending', 'dead')
    ), stranded AS (
        SELECT count(*) AS n
          FROM webhook_dlq d, timeout
         WHERE d.status = 'retrying' AND d.updated_at < now() - timeout.t
           AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                            WHERE m.message_id = d.message_id
                              AND m.status IN ('received', 'processing'))
    ), hour AS (
        SELECT * FROM get_webhook_performance_stats(1)
    )
    SELECT 'stuck_conversations',
           CASE WHEN n = 0 THEN 'ok' WHEN n < 10 THEN 'warning' ELSE 'critical' END,
           n::numeric,
           n || ' conversation(s) with work in flight over '
             || EXTRACT(EPOCH FROM (SELECT t FROM timeout))::bigint || ' s'
      FROM stuck
    UNION ALL
    SELECT 'dlq_pending',
           CASE WHEN pending = 0 THEN 'ok' WHEN oldest < 3600 THEN 'warning' ELSE 'critical' END,
           pending::numeric,
           pending || ' pending item(s), oldest ' || round(oldest) || ' s'
      FROM dlq
    UNION ALL
    SELECT 'dlq_dead', CASE WHEN dead = 0 THEN 'ok' ELSE 'warning' END, dead::numeric,
           dead || ' dead item(s) waiting for an operator'
      FROM dlq
    UNION ALL
    SELECT 'dlq_retrying_stranded', CASE WHEN n = 0 THEN 'ok' ELSE 'warning' END, n::numeric,
           n || ' item(s) retrying for over '
             || EXTRACT(EPOCH FROM (SELECT t FROM timeout))::bigint
             || ' s with their message not in flight (the dlq worker recovers them)'
      FROM stranded
    UNION ALL
    SELECT 'error_rate_1h',
           CASE WHEN total = 0 OR (failed + dead_lettered)::numeric / total < 0.05 THEN 'ok'
                WHEN (failed + dead_lettered)::numeric / total < 0.2 THEN 'warning'
                ELSE 'critical' END,
           round(coalesce((failed + dead_lettered)::numeric / nullif(total, 0), 0), 4),
           (failed + dead_lettered) || ' of ' || total || ' message(s) failed in the last hour'
      FROM hour
    UNION ALL
    SELECT 'latency_p95_1h',
           CASE WHEN coalesce(p95_ms, 0) < 10000 THEN 'ok'
                WHEN p95_ms < 30000 THEN 'warning' ELSE 'critical' END,
           coalesce(p95_ms, 0), 'p95 acknowledged -> replied: ' || coalesce(p95_ms, 0) || ' ms'
      FROM hour
$$;

-- 0006's transition, and a conversation's error_count counts its messages' moves to failed.
CREATE OR REPLACE FUNCTION wa_transition_message(
    p_message_id text,
    p_to_state text,
    p_from text[],
    p_reason text,
    p_token bigint,
    p_correlation_id text,
    OUT outcome text,
    OUT from_state text,
    OUT fence_token bigint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_conversation_id bigint;
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
           updated_at = now()
     WHERE m.id = v_id;

    -- Only on failure, so the happy path costs nothing more.
    IF p_to_state = 'failed' AND v_conversation_id IS NOT NULL THEN
        UPDATE webhook_conversations c
           SET error_count = c.error_count + 1, updated_at = now()
         WHERE c.id = v_conversation_id;
    END IF;

    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
         correlation_id)
    SELECT m.conversation_id, m.message_id, 'message', from_state, p_to_state, p_reason,
           p_token, COALESCE(NULLIF(p_correlation_id, ''), m.correlation_id)
      FROM processed_webhook_messages m
     WHERE m.id = v_id;
    outcome := 'done';
END
$$;

-- A failure handed to the dead-letter queue. One open item per message: a second failure of
-- the same message adds to it. Delays grow as base * 2^(attempts-1), jittered within its top
-- quarter: a burst of failures spreads out, and each retry still waits longer than the one
-- before.
-- A failure while the model is known to be down uses no attempt: BreakerOpen (no model call
-- was made), or a model failure of the item the worker let through a half-open breaker (the
-- probe: the model is still down). It is deferred instead (base * 2^deferrals, at most
-- 4 * base), recorded in the history as deferred; an item deferred for longer than
-- p_max_defer_seconds since its first deferral in a row is dead.
CREATE FUNCTION wa_dlq_enqueue(
    p_message_id text,
    p_conversation_id bigint,
    p_payload jsonb,
    p_error_class text,
    p_error_message text,
    p_retryable boolean,
    p_max_attempts integer,
    p_base_seconds double precision,
    p_correlation_id text,
    p_max_defer_seconds double precision
) RETURNS SETOF webhook_dlq
LANGUAGE plpgsql AS $$
DECLARE
    d webhook_dlq;
    v_deferred boolean;
    v_expired boolean;
    v_jitter double precision := 0.75 + random() / 4;
BEGIN
    LOOP
        SELECT * INTO d FROM webhook_dlq x
         WHERE x.message_id = p_message_id AND x.status IN ('pending', 'retrying', 'dead')
           FOR UPDATE;
        IF NOT FOUND THEN
            v_deferred := p_error_class = 'BreakerOpen' AND p_retryable;
            INSERT INTO webhook_dlq
                (message_id, conversation_id, payload, error_class, error_message, retryable,
                 attempts, deferrals, deferred_since, history, status, next_attempt_at,
                 correlation_id)
            VALUES (p_message_id, p_conversation_id, p_payload, p_error_class, p_error_message,
                    p_retryable,
                    CASE WHEN v_deferred THEN 0 ELSE 1 END,
                    CASE WHEN v_deferred THEN 1 ELSE 0 END,
                    CASE WHEN v_deferred THEN now() END,
                    jsonb_build_array(jsonb_build_object(
                        'at', now(), 'error_class', p_error_class,
                        'error_message', p_error_message, 'deferred', v_deferred)),
                    CASE WHEN v_deferred AND p_max_defer_seconds > 0 THEN 'pending'
                         WHEN NOT v_deferred AND p_retryable AND p_max_attempts >= 1
                         THEN 'pending'
                         ELSE 'dead' END,
                    CASE WHEN (v_deferred AND p_max_defer_seconds > 0)
                           OR (NOT v_deferred AND p_retryable AND p_max_attempts >= 1)
                         THEN now() + make_interval(secs => p_base_seconds * v_jitter) END,
                    p_correlation_id)
            ON CONFLICT (message_id) WHERE status IN ('pending', 'retrying', 'dead')
            DO NOTHING
            RETURNING * INTO d;
            IF FOUND THEN
                RETURN NEXT d;
                RETURN;
            END IF;
            CONTINUE;  -- inserted concurrently: add to that item
        END IF;

        v_deferred := (p_error_class = 'BreakerOpen'
                       OR (d.probe AND p_error_class LIKE 'Model%')) AND p_retryable;
        v_expired := v_deferred AND now() - coalesce(d.deferred_since, now())
                                    >= make_interval(secs => p_max_defer_seconds);
        UPDATE webhook_dlq x
           SET attempts = d.attempts + CASE WHEN v_deferred THEN 0 ELSE 1 END,
               deferrals = d.deferrals + CASE WHEN v_deferred THEN 1 ELSE 0 END,
               -- A counted failure ends a wait: the next outage gets its own.
               deferred_since = CASE WHEN v_deferred THEN coalesce(d.deferred_since, now()) END,
               history = d.history || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'error_class', p_error_class, 'error_message', p_error_message,
                   'deferred', v_deferred)),
               error_class = p_error_class,
               error_message = CASE WHEN v_expired
                   THEN 'the model stayed unavailable for over ' || p_max_defer_seconds
                        || ' s: ' || p_error_message
                   ELSE p_error_message END,
               retryable = p_retryable,
               probe = false,
               status = CASE WHEN v_deferred AND NOT v_expired THEN 'pending'
                             WHEN v_deferred THEN 'dead'
                             WHEN p_retryable AND d.attempts + 1 <= p_max_attempts THEN 'pending'
                             ELSE 'dead' END,
               next_attempt_at = CASE
                   WHEN v_deferred AND NOT v_expired
                   THEN now() + make_interval(secs => least(p_base_seconds * 2 ^ d.deferrals,
                                                            4 * p_base_seconds) * v_jitter)
                   WHEN NOT v_deferred AND p_retryable AND d.attempts + 1 <= p_max_attempts
                   THEN now() + make_interval(secs => p_base_seconds * 2 ^ d.attempts
                                                      * v_jitter)
                   END,
               updated_at = now()
         WHERE x.id = d.id
        RETURNING * INTO d;
        RETURN NEXT d;
        RETURN;
    END LOOP;
END
$$;
