-- The ingest of a delivery without hash joins (issue 16: PostgreSQL's CPU per message, at a
-- customer's pace).
--
-- wa_ingest_messages and wa_ingest_statuses run their statements with a generic plan
-- (db/migrations/0032), made for arrays of ten items, the planner's guess for an unnest of a
-- parameter. For ten rows it joins the CTEs by hashing: each call then builds a hash table of
-- 1,024 buckets per join, and scans every bucket again for a left join's unmatched rows,
-- whether the call holds one message or ten. A customer's message comes alone, in a call of
-- its own, as does each of its reply's two or three status webhooks, and at that pace the
-- executor's start and end are most of a call's cost (`perf record --call-graph dwarf -p` on a
-- backend calling wa_ingest_messages for one message at a time: ExecInitNode 28 %, the hash
-- joins' hash tables and their unmatched-row scans a sixth).
--
-- With hash and merge joins off for their statements, every join is a nested loop: over the
-- CTEs' few rows, and into the tables by their indexes, as before (the lookups were nested
-- loops already; tests/integration/test_monitoring_sql.py checks the plans on a million
-- messages). A delivery of a hundred messages compares at most 100 x 100 rows of CTEs, far
-- below what one index probe costs.
--
-- Measured with `python -m bench.turn_sql --statuses --no-sync --before 0034` (a backend each,
-- rounds interleaved, 40,000 answered messages of history): a message's ingest 654 µs of
-- backend CPU against 749 alone (0.87), 195 against 196 ten to a call; a status webhook's
-- 418 against 439 (0.95). The batched turn statements (wa_claim_turns, wa_finish_turns), tried
-- the same way, gained nothing and are left as they were.

ALTER FUNCTION wa_ingest_messages(
    text[], text[], text[], text[], text[], timestamptz[], text[], text[], text[], text[],
    text[], text[], text[], text[], text[], text[]
) SET enable_hashjoin = off SET enable_mergejoin = off;

ALTER FUNCTION wa_ingest_statuses(
    text[], text[], text[], text[], timestamptz[], text[], text[], text[], text[], text[],
    text[]
) SET enable_hashjoin = off SET enable_mergejoin = off;
