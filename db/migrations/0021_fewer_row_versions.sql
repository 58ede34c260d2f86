-- Fewer index entries and row versions per message (issue 16: PostgreSQL's CPU per message).
-- A non-HOT update writes an entry into every index of its table (a partial one when the new
-- row matches its predicate), and an update is HOT only when it changes no column any index
-- names (key, INCLUDE or predicate) and the page has room for the new version.

-- processed_webhook_messages: a message row is updated about three times without HOT (its
-- status is in partial indexes), each time entering every index.
-- * inflight_idx had the same predicate as waiting_idx, which is small (only waiting rows) and
--   serves the sweep and the stuck view as well, scanned whole.
-- * correlation_idx served no query (traces are found by message, the correlation id is read
--   from the row).
-- * delivery_failed_idx named reply_status, which every delivery status webhook (sent,
--   delivered, read) moves on the reply's message row: those updates could never be HOT. The
--   count of failed deliveries over a window (performance_stats, `wa stats`, not per message)
--   reads the window's status rows through other_received_idx instead.
DROP INDEX processed_messages_inflight_idx;
DROP INDEX processed_messages_correlation_idx;
DROP INDEX processed_messages_delivery_failed_idx;
-- Room on each page for the updated versions that can be HOT (the reply saved before sending).
ALTER TABLE processed_webhook_messages SET (fillfactor = 90);

-- webhook_conversations: active_idx served no query, and it named locked_at and status, which
-- every claim and release of a conversation change.
DROP INDEX webhook_conversations_active_idx;
ALTER TABLE webhook_conversations SET (fillfactor = 70);

-- agent_sessions: one update per turn, never HOT while last_active_at was indexed, and no
-- query looks sessions up by it (the views only aggregate it).
DROP INDEX agent_sessions_last_active_idx;
ALTER TABLE agent_sessions SET (fillfactor = 70);
ALTER TABLE agent_contexts SET (fillfactor = 70);

-- conversation_state_transitions is the audit trail, written three to four times per message,
-- always by a statement or function that has just read or locked the conversation it names:
-- its foreign key check (a key-share lock on the conversation row per audit row) guarded
-- nothing. Retention deletes a conversation only when no transition names it
-- (wa_prune), erasure deletes the transitions first (wa_forget_customer).
ALTER TABLE conversation_state_transitions
    DROP CONSTRAINT conversation_state_transitions_conversation_id_fkey;

-- agent_contexts.messages, the whole context, is written at every turn and read at the next:
-- pglz compression of a conversation's text rarely pays (little repeats, and PostgreSQL tries
-- the whole value before giving up), and every value over 2 kB went to the TOAST table. Stored
-- uncompressed, inline up to a page (out of line beyond, still uncompressed): measured on the
-- embedded PostgreSQL 18, an upsert and a read of a context of 20 / 60 / 100 messages cost the
-- backend about 570 / 830 / 1320 µs before, 370 / 480 / 570 µs after.
ALTER TABLE agent_contexts ALTER COLUMN messages SET STORAGE EXTERNAL;
ALTER TABLE agent_contexts SET (toast_tuple_target = 8160);

-- webhook_conversations.message_count: counted by the ingest statement's one update of each
-- conversation row (services/state/queries.sql, ingest_messages) instead of by a trigger that
-- updated the same rows a second time (another row version per conversation and batch, and a
-- PL/pgSQL call per ingest statement, statuses' included). Exact as before, concurrent
-- deliveries of the same messages to one conversation included; the one case it is not: the
-- same message id stored at the same moment under two different conversations (one delivery
-- naming the customer by BSUID, the other by phone number before they were linked) counts it
-- in both.
DROP TRIGGER processed_messages_count ON processed_webhook_messages;
DROP FUNCTION wa_count_messages();

-- How many of these message ids are not stored, as of now: VOLATILE, so it reads with a
-- snapshot of its own, taken after the caller locked the conversation row (the ingest counts
-- with it when a concurrent delivery changed the row after its statement began).
CREATE FUNCTION wa_unstored_messages(p_ids text[]) RETURNS integer
LANGUAGE sql VOLATILE AS $$
    SELECT count(*)::integer
      FROM unnest(p_ids) AS t(id)
     WHERE NOT EXISTS (SELECT 1 FROM processed_webhook_messages m WHERE m.message_id = t.id)
$$;
