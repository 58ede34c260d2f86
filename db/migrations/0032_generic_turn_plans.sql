-- A turn's functions keep one plan of each statement per connection (issue 16: PostgreSQL's
-- CPU per message).
--
-- PL/pgSQL plans a statement for its parameters' values the first five times a connection runs
-- it, then keeps a generic plan only if it is estimated to cost no more than those did. The
-- message's move in wa_transition_message never qualified once the business had answered
-- messages: its custom plans fold `CASE WHEN p_reply_message_id IS NULL ...` away, the generic
-- one keeps wa_reply_status_seen's lookup in the estimate, so PostgreSQL planned the UPDATE at
-- every run, which cost more than running it (~300 µs against ~100: 162 µs of planning a
-- message in `bench.e2e --statements 60` with pg_stat_statements.track_planning). The read of
-- the context in wa_start_turn was planned at 45 % of its runs in the same bench.
--
-- Every statement of both functions reads by a key whatever the parameters (a message by its
-- id, a conversation by its id, its waiting messages and context entries by conversation), so
-- the generic plan is the plan; test_context_entries checks wa_start_turn's with a million
-- entries. The setting holds while each function runs, nested calls included; a later
-- CREATE OR REPLACE of either function must repeat it (tests/integration/test_turn_plans.py).
ALTER FUNCTION wa_transition_message(text, text, text[], text, bigint, text, text)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION wa_start_turn(bigint, bigint)
    SET plan_cache_mode = force_generic_plan;
