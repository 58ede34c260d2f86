-- name: enqueue
-- One open item per message (db/migrations/0009: how attempts and deferrals count).
SELECT * FROM wa_dlq_enqueue($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9, $10)

-- name: claim_due
-- One due item at a time, handed over at once: an item is `retrying` without having been
-- handed to the state service for at most one hand-over (recover_retrying relies on it).
UPDATE webhook_dlq
   SET status = 'retrying', probe = false, updated_at = now()
 WHERE id IN (SELECT id FROM webhook_dlq
               WHERE status = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at
               LIMIT 1
                 FOR UPDATE SKIP LOCKED)
RETURNING id, message_id, correlation_id, attempts,
          (SELECT m.traceparent FROM processed_webhook_messages m
            WHERE m.message_id = webhook_dlq.message_id) AS traceparent

-- name: claim_probe
-- The model's breaker is half-open: one due item goes through as its probe, unless one of
-- ours is probing already (retrying as a probe for less than $1 seconds).
UPDATE webhook_dlq
   SET status = 'retrying', probe = true, updated_at = now()
 WHERE id IN (SELECT id FROM webhook_dlq
               WHERE status = 'pending' AND next_attempt_at <= now()
                 AND NOT EXISTS (SELECT 1 FROM webhook_dlq p
                                  WHERE p.status = 'retrying' AND p.probe
                                    AND p.updated_at > now() - make_interval(secs => $1))
               ORDER BY next_attempt_at
               LIMIT 1
                 FOR UPDATE SKIP LOCKED)
RETURNING id, message_id, correlation_id, attempts,
          (SELECT m.traceparent FROM processed_webhook_messages m
            WHERE m.message_id = webhook_dlq.message_id) AS traceparent

-- name: defer_due
-- The model's breaker is open: due items wait (no attempt used), with the backoff of
-- wa_dlq_enqueue's deferrals; one deferred for over $3 seconds in a row is dead.
UPDATE webhook_dlq d
   SET deferrals = d.deferrals + 1,
       deferred_since = coalesce(d.deferred_since, now()),
       history = d.history || jsonb_build_array(jsonb_build_object(
           'at', now(), 'error_class', 'BreakerOpen',
           'error_message', 'the model''s circuit breaker is open: redrive deferred',
           'deferred', true)),
       status = CASE WHEN x.expired THEN 'dead' ELSE 'pending' END,
       error_class = CASE WHEN x.expired THEN 'BreakerOpen' ELSE d.error_class END,
       error_message = CASE WHEN x.expired
             THEN 'the model stayed unavailable for over ' || $3 || ' s'
             ELSE d.error_message END,
       next_attempt_at = CASE WHEN NOT x.expired
             THEN now() + make_interval(secs => least($2 * 2 ^ d.deferrals, 4 * $2)
                                                * (0.75 + random() / 4)) END,
       updated_at = now()
  FROM (SELECT id, now() - coalesce(deferred_since, now()) >= make_interval(secs => $3)
                   AS expired
          FROM webhook_dlq
         WHERE status = 'pending' AND next_attempt_at <= now()
         ORDER BY next_attempt_at
         LIMIT $1
           FOR UPDATE SKIP LOCKED) x
 WHERE d.id = x.id
RETURNING d.id, d.message_id, d.status, d.deferrals

-- name: claim_ids
UPDATE webhook_dlq
   SET status = 'retrying', probe = false, updated_at = now()
 WHERE id = ANY($1::bigint[]) AND status IN ('pending', 'dead', 'retrying')
RETURNING id, message_id, correlation_id, attempts,
          (SELECT m.traceparent FROM processed_webhook_messages m
            WHERE m.message_id = webhook_dlq.message_id) AS traceparent

-- name: retry_candidates
-- An operator's `retry --all`: the items, oldest first; each is claimed as it is handed over.
SELECT id FROM webhook_dlq WHERE status = ANY($1::text[]) ORDER BY created_at, id LIMIT $2

-- name: recover_retrying
-- Items `retrying` for over $1 seconds whose message is not in flight: the hand-over never
-- happened (the dlq process died mid-redrive, or an operator's retry was cut off), or the
-- message was replied or skipped and its Resolve was lost. Back to pending, due now, no
-- attempt used; or resolved. A `failed` message is the state service's to hand over again.
WITH stale AS (
    SELECT d.id, m.status AS message_status
      FROM webhook_dlq d
      JOIN processed_webhook_messages m ON m.message_id = d.message_id
     WHERE d.status = 'retrying' AND d.updated_at < now() - make_interval(secs => $1)
       AND m.status IN ('dead_lettered', 'replied', 'skipped')
     ORDER BY d.updated_at
     LIMIT $2
       FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_dlq d
   SET status = CASE WHEN s.message_status = 'dead_lettered' THEN 'pending' ELSE 'resolved' END,
       resolved_at = CASE WHEN s.message_status = 'dead_lettered' THEN NULL ELSE now() END,
       next_attempt_at = CASE WHEN s.message_status = 'dead_lettered' THEN now() END,
       probe = false,
       history = CASE WHEN s.message_status = 'dead_lettered'
             THEN d.history || jsonb_build_array(jsonb_build_object(
                 'at', now(), 'error_class', 'RedriveStranded',
                 'error_message', 'retrying for over ' || $1 || ' s and never handed over: '
                                  || 'due again, no attempt used',
                 'deferred', true))
             ELSE d.history END,
       updated_at = now()
  FROM stale s
 WHERE d.id = s.id
RETURNING d.id, d.message_id, d.status, s.message_status

-- name: back_to_pending
-- The redrive itself could not be handed over (state unreachable): try again later.
UPDATE webhook_dlq
   SET status = 'pending',
       next_attempt_at = now() + make_interval(secs => $2),
       history = history || jsonb_build_array(jsonb_build_object(
           'at', now(), 'error_class', 'RedriveFailed', 'error_message', $3::text,
           'deferred', true)),
       updated_at = now()
 WHERE id = $1 AND status = 'retrying'

-- name: refused
-- The state service answered that the message cannot be redriven (it is gone): dead, with
-- why, for an operator to see and purge; never due again.
UPDATE webhook_dlq
   SET status = 'dead',
       next_attempt_at = NULL,
       history = history || jsonb_build_array(jsonb_build_object(
           'at', now(), 'error_class', 'RedriveRefused', 'error_message', $2::text,
           'deferred', false)),
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
-- $4: a customer, named by phone number, BSUID or username (with or without "@").
SELECT d.*, c.wa_id, c.user_id, c.username
  FROM webhook_dlq d
  LEFT JOIN webhook_conversations c ON c.id = d.conversation_id
 WHERE (($1 = '' AND d.status <> 'purged') OR d.status = $1)
   AND ($3 = '' OR d.message_id = $3)
   AND ($4 = '' OR d.conversation_id IN (
            SELECT k.id FROM webhook_conversations k
             WHERE k.wa_id = $4 OR k.user_id = $4
                OR (k.username IS NOT NULL AND lower(k.username) = lower(ltrim($4, '@')))))
 ORDER BY d.created_at DESC, d.id DESC
 LIMIT $2

-- name: get
SELECT d.*, c.wa_id, c.user_id, c.username
  FROM webhook_dlq d
  LEFT JOIN webhook_conversations c ON c.id = d.conversation_id
 WHERE d.id = $1

-- name: gauges
-- Per open status, and `stranded`: retrying for over $1 seconds with the message not in
-- flight (what check_webhook_system_health() counts too).
SELECT status, count(*) AS n,
       EXTRACT(EPOCH FROM now() - min(created_at)) AS oldest_seconds
  FROM webhook_dlq
 WHERE status IN ('pending', 'retrying', 'dead')
 GROUP BY status
UNION ALL
SELECT 'stranded', count(*), NULL
  FROM webhook_dlq d
 WHERE d.status = 'retrying' AND d.updated_at < now() - make_interval(secs => $1)
   AND NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                    WHERE m.message_id = d.message_id AND m.status IN ('received', 'processing'))

-- name: message_payload
SELECT payload FROM processed_webhook_messages WHERE message_id = $1
