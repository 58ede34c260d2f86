-- Delivery states of an outbound message only move forward.
CREATE FUNCTION wa_delivery_rank(status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE status
        WHEN 'sent' THEN 1
        WHEN 'delivered' THEN 2
        WHEN 'read' THEN 3
        WHEN 'failed' THEN 4
        ELSE 0
    END
$$;

-- The seed's increment_session_metrics: one atomic upsert per turn (or failed turn).
CREATE FUNCTION increment_session_metrics(
    p_conversation_id bigint,
    p_agent_type text,
    p_turns integer,
    p_tokens_in bigint,
    p_tokens_out bigint,
    p_latency_ms bigint,
    p_errors integer,
    p_correlation_id text
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO agent_sessions AS s
        (conversation_id, agent_type, turns, tokens_in, tokens_out, total_latency_ms, errors,
         correlation_id)
    VALUES (p_conversation_id, p_agent_type, p_turns, p_tokens_in, p_tokens_out, p_latency_ms,
            p_errors, p_correlation_id)
    ON CONFLICT (conversation_id, agent_type) DO UPDATE
       SET turns = s.turns + EXCLUDED.turns,
           tokens_in = s.tokens_in + EXCLUDED.tokens_in,
           tokens_out = s.tokens_out + EXCLUDED.tokens_out,
           total_latency_ms = s.total_latency_ms + EXCLUDED.total_latency_ms,
           errors = s.errors + EXCLUDED.errors,
           correlation_id = EXCLUDED.correlation_id,
           last_active_at = now()
$$;
