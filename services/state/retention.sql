-- Retention and erasure (db/migrations/0013_retention.sql holds the deletes; README,
-- "Retention and erasure").

-- name: prune
-- One batch (each call its own short transaction), or with $3 the counts of a dry run.
SELECT table_name, rows FROM wa_prune($1, $2, $3)

-- name: record_prune
SELECT wa_record_prune($1::jsonb, $2)

-- name: forget
SELECT table_name, rows FROM wa_forget_customer($1, $2)

-- name: customer_conversations
-- What wa_forget_customer erases: the customer's conversations on every business number,
-- also those that knew them by an earlier phone number or BSUID (db/migrations/0031).
SELECT id FROM webhook_conversations
 WHERE wa_id = $1 OR user_id = $1 OR customer_id = $1 OR parent_user_id = $1
    OR id IN (SELECT a.conversation_id FROM webhook_conversation_aliases a WHERE a.alias = $1)
 ORDER BY id

-- name: try_lock
-- One prune pass at a time across replicas (held by the pass's connection; released with it
-- should the process die).
SELECT pg_try_advisory_lock($1)

-- name: unlock
SELECT pg_advisory_unlock($1)
