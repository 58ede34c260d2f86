-- The owner's row level security policy costs its callers less (issue 16: PostgreSQL's CPU per
-- message).
--
-- Every table's owner policy is `USING ((SELECT wa_owns(t)))` (0012), a policy for every role:
-- beside a service's own `USING (true)` PostgreSQL folds it away, but beside a condition (the
-- agent's update of a message: `kind = 'message'`; the dlq's and the operator's reads) it is an
-- InitPlan run at every execution of the statement. As a SQL function wa_owns was planned
-- again at each of them (PostgreSQL before 18 keeps a SQL function's plan only for the calling
-- statement's run); PL/pgSQL keeps its statement's plan for the session. Same query, same
-- answer.
--
-- Measured on this machine's PostgreSQL 15 (2026-12-06 about 11:25 UTC): `SELECT wa_owns(..)`
-- 27 µs a call against 7 (20,000 calls in a DO loop); the agent's update of a message's reply
-- columns, as the agent's role (two InitPlans: USING and WITH CHECK), 81-119 µs a statement
-- against 38-60 (six alternating rounds of 300 in a DO loop). A turn makes one such update.
CREATE OR REPLACE FUNCTION wa_owns(p_table regclass) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- True for the table's owner (or a role with its rights): see 0012.
    RETURN (SELECT pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE')
              FROM pg_catalog.pg_class c
             WHERE c.oid = p_table);
END
$$;
