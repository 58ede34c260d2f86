-- The seed's monitoring layer: five views and two functions, over indexes that keep a one-hour
-- window off a sequential scan of all messages.

-- Latency of a finished message: from acknowledgement to its final state.
CREATE INDEX processed_messages_finished_idx ON processed_webhook_messages (finished_at)
    WHERE kind = 'message' AND finished_at IS NOT NULL;
CREATE INDEX processed_messages_kind_received_idx
    ON processed_webhook_messages (received_at) INCLUDE (status, finished_at)
    WHERE kind = 'message';

-- One row per conversation: where it stands and how it has gone.
CREATE VIEW webhook_conversation_health AS
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
           WHEN coalesce(m.waiting, 0) > 0 AND c.last_activity_at < now() - interval '2 minutes'
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

-- Work in flight longer than the seed's two minutes (the sweeper recovers it).
CREATE VIEW stuck_webhook_conversations AS
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
   AND coalesce(m.started_at, m.received_at) < now() - interval '2 minutes'
 GROUP BY m.conversation_id, c.wa_id, c.status, c.lock_owner;

-- Per agent type: how much it works, how fast, how often it fails.
CREATE VIEW webhook_agent_performance AS
SELECT agent_type,
       count(*) AS sessions,
       sum(turns) AS turns,
       sum(tokens_in) AS tokens_in,
       sum(tokens_out) AS tokens_out,
       round(sum(total_latency_ms)::numeric / nullif(sum(turns), 0), 1) AS avg_latency_ms,
       sum(errors) AS errors,
       round(sum(errors)::numeric / nullif(sum(turns) + sum(errors), 0), 4) AS error_rate,
       max(last_active_at) AS last_active_at
  FROM agent_sessions
 GROUP BY agent_type;

-- Hourly processing figures of the last 24 hours.
CREATE VIEW webhook_message_processing_metrics AS
SELECT date_trunc('hour', received_at) AS hour,
       count(*) AS messages,
       count(*) FILTER (WHERE status = 'replied') AS replied,
       count(*) FILTER (WHERE status = 'skipped') AS skipped,
       count(*) FILTER (WHERE status IN ('failed', 'dead_lettered')) AS failed,
       count(*) FILTER (WHERE status IN ('received', 'processing')) AS in_flight,
       round(avg(EXTRACT(EPOCH FROM finished_at - received_at) * 1000)
             FILTER (WHERE status = 'replied')::numeric, 1) AS avg_ms,
       round((percentile_cont(0.95) WITHIN GROUP (
             ORDER BY EXTRACT(EPOCH FROM finished_at - received_at) * 1000)
             FILTER (WHERE status = 'replied'))::numeric, 1) AS p95_ms,
       round((percentile_cont(0.99) WITHIN GROUP (
             ORDER BY EXTRACT(EPOCH FROM finished_at - received_at) * 1000)
             FILTER (WHERE status = 'replied'))::numeric, 1) AS p99_ms
  FROM processed_webhook_messages
 WHERE kind = 'message' AND received_at >= now() - interval '24 hours'
 GROUP BY 1;

-- The dead-letter queue at a glance.
CREATE VIEW webhook_dlq_summary AS
SELECT status,
       count(*) AS items,
       round(avg(attempts), 2) AS avg_attempts,
       min(created_at) AS oldest,
       max(updated_at) AS newest,
       EXTRACT(EPOCH FROM now() - min(created_at))::bigint AS oldest_age_seconds,
       min(next_attempt_at) AS next_attempt_at
  FROM webhook_dlq
 GROUP BY status;

-- Counts and latency percentiles (acknowledged -> replied) of the last `hours` hours.
-- A plain SQL function, inlined by the planner: the window uses the received_at index.
CREATE FUNCTION get_webhook_performance_stats(hours numeric DEFAULT 1)
RETURNS TABLE (
    total bigint, replied bigint, skipped bigint, failed bigint, dead_lettered bigint,
    in_flight bigint, avg_ms numeric, p95_ms numeric, p99_ms numeric
)
LANGUAGE sql STABLE AS $$
    SELECT count(*),
           count(*) FILTER (WHERE status = 'replied'),
           count(*) FILTER (WHERE status = 'skipped'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'dead_lettered'),
           count(*) FILTER (WHERE status IN ('received', 'processing')),
           round(avg(EXTRACT(EPOCH FROM finished_at - received_at) * 1000)
                 FILTER (WHERE status = 'replied')::numeric, 1),
           round((percentile_cont(0.95) WITHIN GROUP (
                 ORDER BY EXTRACT(EPOCH FROM finished_at - received_at) * 1000)
                 FILTER (WHERE status = 'replied'))::numeric, 1),
           round((percentile_cont(0.99) WITHIN GROUP (
                 ORDER BY EXTRACT(EPOCH FROM finished_at - received_at) * 1000)
                 FILTER (WHERE status = 'replied'))::numeric, 1)
      FROM processed_webhook_messages
     WHERE kind = 'message' AND received_at >= now() - make_interval(secs => hours * 3600)
$$;

-- The system's health from the database's point of view: one row per check, with the figure
-- it is judged on and the threshold that was crossed.
CREATE FUNCTION check_webhook_system_health()
RETURNS TABLE (check_name text, status text, value numeric, detail text)
LANGUAGE sql STABLE AS $$
    WITH stuck AS (
        SELECT count(*) AS n FROM stuck_webhook_conversations
    ), dlq AS (
        SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'dead') AS dead,
               coalesce(EXTRACT(EPOCH FROM now() - min(created_at)
                        FILTER (WHERE status = 'pending')), 0) AS oldest
          FROM webhook_dlq WHERE status IN ('pending', 'dead')
    ), hour AS (
        SELECT * FROM get_webhook_performance_stats(1)
    )
    SELECT 'stuck_conversations',
           CASE WHEN n = 0 THEN 'ok' WHEN n < 10 THEN 'warning' ELSE 'critical' END,
           n::numeric, n || ' conversation(s) with work in flight over 2 minutes'
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
