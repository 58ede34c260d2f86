-- Row level security, forced, on the two tables 0013 added, as 0012 does on the others: the
-- owner keeps every row through `wa_owner`; what a service role may do is db/privileges.sql's.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['wa_erasure_audit', 'wa_message_tombstones']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY wa_owner ON %1$I USING ((SELECT wa_owns(%1$L)))'
                       ' WITH CHECK ((SELECT wa_owns(%1$L)))', t);
    END LOOP;
END
$$;
