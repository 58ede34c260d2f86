-- The ingest looks conversations up twice per message (services/state/queries.sql): by their
-- unique key (phone_number_id, customer_id), when a BSUID arrives with a phone number and may
-- adopt the conversation keyed by that number; and by phone number, for a message without a
-- BSUID whose number came with one before. While the table's statistics are those of an empty
-- table (a new deployment's first burst, before autovacuum analyzes it), every index is one
-- page, every lookup is estimated at one row, and the planner took the path with the fewest
-- conditions to check: (phone_number_id, wa_id) or the unique key with phone_number_id alone,
-- reading one business number's every conversation per message (about 0.25 ms of CPU per
-- message in bench.e2e's first seconds; tests/integration/test_row_versions.py).
--
-- No index but the unique key now leads with phone_number_id, and the lookup by phone number
-- has an index that answers all of its conditions (its predicate is the lookup's
-- `user_id IS NOT NULL`), so it is the cheapest path whatever the statistics. Phone numbers
-- lead: a number is in the conversations of a handful of business numbers at most. Other
-- lookups by phone number use webhook_conversations_wa_id_idx, as before.
DROP INDEX webhook_conversations_pn_wa_id_idx;
CREATE INDEX webhook_conversations_bsuid_phone_idx ON webhook_conversations (wa_id, phone_number_id)
    WHERE user_id IS NOT NULL;
