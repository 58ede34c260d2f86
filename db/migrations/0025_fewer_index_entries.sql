-- Fewer index entries and row versions per message (issue 16: PostgreSQL's CPU per message).
-- An update is HOT (no index entry anywhere) only when it changes no indexed column and the
-- page has room for the new version; otherwise every index of the table (a partial one when
-- the new version matches its predicate) gets an entry, and the old one a dead entry that
-- later scans step over until it is removed.

-- processed_webhook_messages: a message row is written at the claim, at the reply's save
-- (before sending: reply_text, reply_payload, agent_type, send_started_at, none indexed) and at
-- the finish. The save can be HOT, but the claim's new version (not HOT: status is in
-- waiting_idx) often took the room fillfactor 90 left on the page, and the save then entered
-- every index of the table too. Measured on the bench's order of things (200 conversations,
-- 20 messages each, rows of ~670 bytes as the gateway stores them): 2967 of 4000 saves HOT at
-- fillfactor 90 (`bench.e2e --statements` saw the same, 0.72-0.84 HOT updates per message),
-- 3993 of 4000 at 70, for a table 5% larger (409 pages against 389: the claim's and the
-- finish's versions stay on their page, where pruning reclaims the dead ones).
ALTER TABLE processed_webhook_messages SET (fillfactor = 70);

-- finished_idx served no query: no statement reads messages by finished_at alone (the
-- monitoring views and functions read a window by received_at through kind_received_idx, the
-- failed ones waiting for the dead-letter queue are found through failed_idx), and every
-- finish, and every move to dead_lettered, entered it.
DROP INDEX processed_messages_finished_idx;
