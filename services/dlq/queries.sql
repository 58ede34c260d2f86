-- name: enqueue
-- One open item per message: a second failure of the same message adds an attempt to it.
-- Delays grow as base * 2^(attempts-1), jittered within its top quarter: a burst of failures
-- spreads out, and each retry still waits longer than the one before.
INSERT INTO webhook_dlq AS d
    (message_id, conversation_id, payload, error_class, error_message, retryable, attempts,
     history, status, next_attempt_at, correlation_id)
VALUES ($1, $2, $3::jsonb, $4::text, $5::text, $6, 1,
        jsonb_build_array(jsonb_build_object('at', now(), 'error_class', $4::text,
                                             'error_message', $5::text)),
        CASE WHEN $6 AND $7 >= 1 THEN 'pending' ELSE 'dead' END,
        CASE WHEN $6 AND $7 >= 1
             THEN now() + make_interval(secs => $8 * (0.75 + random() / 4)) END,
        $9)
ON CONFLICT (message_id) WHERE status IN ('pending', 'retrying', 'dead') DO UPDATE
   SET attempts = d.attempts + 1,
       history = d.history || EXCLUDED.history,
       error_class = EXCLUDED.error_class,
       error_message = EXCLUDED.error_message,
       retryable = EXCLUDED.retryable,
       status = CASE WHEN EXCLUDED.retryable AND d.attempts + 1 <= $7 THEN 'pending'
                     ELSE 'dead' END,
       next_attempt_at = CASE WHEN EXCLUDED.retryable AND d.attempts + 1 <= $7
             THEN now() + make_interval(secs => $8 * power(2, d.attempts) * (0.75 + random() / 4))
             END,
       updated_at = now()
RETURNING *, (xmax = 0) AS created

-- name: claim_due
UPDATE webhook_dlq
   SET status = 'retrying', updated_at = now()
 WHERE id IN (SELECT id FROM webhook_dlq
               WHERE status = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at
               LIMIT $1
                 FOR UPDATE SKIP LOCKED)
RETURNING id, message_id, correlation_id, attempts,
          (SELECT m.traceparent FROM processed_webhook_messages m
            WHERE m.message_id = webhook_dlq.message_id) AS traceparent

-- name: claim_ids
UPDATE webhook_dlq
   SET status = 'retrying', updated_at = now()
 WHERE id = ANY($1::bigint[]) AND status IN ('pending', 'dead', 'retrying')
RETURNING id, message_id, correlation_id, attempts,
          (SELECT m.traceparent FROM processed_webhook_messages m
            WHERE m.message_id = webhook_dlq.message_id) AS traceparent

-- name: claim_status
UPDATE webhook_dlq
   SET status = 'retrying', updated_at = now()
 WHERE status = ANY($1::text[])
RETURNING id, message_id, correlation_id, attempts,
          (SELECT m.traceparent FROM processed_webhook_messages m
            WHERE m.message_id = webhook_dlq.message_id) AS traceparent

-- name: back_to_pending
-- The redrive itself could not be handed over (state unreachable): try again later.
UPDATE webhook_dlq
   SET status = 'pending',
       next_attempt_at = now() + make_interval(secs => $2),
       history = history || jsonb_build_array(jsonb_build_object(
           'at', now(), 'error_class', 'RedriveFailed', 'error_message', $3::text)),
       updated_at = now()
 WHERE id = $1 AND status = 'retrying'

-- name: resolve_message
UPDATE webhook_dlq
   SET status = 'resolved', resolved_at = now(), updated_at = now()
 WHERE message_id = $1 AND status IN ('pending', 'retrying', 'dead')
RETURNING id

-- name: resolve_id
UPDATE webhook_dlq
   SET status = 'resolved', resolved_at = now(), updated_at = now()
 WHERE id = $1 AND status IN ('pending', 'retrying', 'dead')

-- name: purge
UPDATE webhook_dlq
   SET status = 'purged', updated_at = now()
 WHERE id = ANY($1::bigint[]) AND status <> 'purged'
RETURNING id

-- name: list
SELECT d.*, c.wa_id
  FROM webhook_dlq d
  LEFT JOIN webhook_conversations c ON c.id = d.conversation_id
 WHERE (($1 = '' AND d.status <> 'purged') OR d.status = $1)
   AND ($3 = '' OR d.message_id = $3)
 ORDER BY d.created_at DESC, d.id DESC
 LIMIT $2

-- name: get
SELECT d.*, c.wa_id
  FROM webhook_dlq d
  LEFT JOIN webhook_conversations c ON c.id = d.conversation_id
 WHERE d.id = $1

-- name: gauges
SELECT status, count(*) AS n,
       EXTRACT(EPOCH FROM now() - min(created_at)) AS oldest_seconds
  FROM webhook_dlq
 WHERE status IN ('pending', 'retrying', 'dead')
 GROUP BY status

-- name: message_payload
SELECT payload FROM processed_webhook_messages WHERE message_id = $1
