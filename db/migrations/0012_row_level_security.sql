-- Row level security, enabled and forced on every table: a role sees and writes only the rows a
-- policy gives it. The owner's policy lives here (it names no role: whoever owns the table);
-- the services' login roles differ per database (common/roles.py), so their grants and
-- policies are in db/privileges.sql, applied after every migration and provisioning.

-- Which login role plays which service in this database (written by common/roles.py).
CREATE TABLE wa_service_roles (
    service     text PRIMARY KEY CHECK (service IN ('state', 'agent', 'dlq', 'operator')),
    role_name   name        NOT NULL UNIQUE,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- What db/privileges.sql last applied (its text with the role names, and the migrations then
-- applied): provisioning with nothing changed rewrites no policy (that would lock the tables).
CREATE TABLE wa_privileges_applied (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    fingerprint  text        NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- The business phone numbers an operator's login role may see: none listed means all.
CREATE TABLE wa_operator_numbers (
    role_name        name        NOT NULL,
    phone_number_id  text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role_name, phone_number_id)
);

-- True for the table's owner (or a role with its rights): FORCE ROW LEVEL SECURITY holds the
-- owner to policies too, and this one gives it every row. Called as `(SELECT wa_owns(...))`,
-- it runs once per statement, not per row.
CREATE FUNCTION wa_owns(p_table regclass) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE')
      FROM pg_catalog.pg_class c
     WHERE c.oid = p_table
$$;

-- Whether the current operator role may see a business number's data (NULL: data of no
-- number, which only an operator limited to no number sees).
CREATE FUNCTION wa_operator_may(p_phone_number_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT NOT EXISTS (SELECT 1 FROM wa_operator_numbers o WHERE o.role_name = current_user)
        OR EXISTS (SELECT 1 FROM wa_operator_numbers o
                    WHERE o.role_name = current_user AND o.phone_number_id = p_phone_number_id)
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'webhook_conversations', 'processed_webhook_messages',
        'conversation_state_transitions', 'webhook_dlq', 'agent_contexts', 'agent_sessions',
        'agent_reply_parts', 'wa_runtime_settings', 'schema_migrations', 'wa_service_roles',
        'wa_privileges_applied', 'wa_operator_numbers']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY wa_owner ON %1$I USING ((SELECT wa_owns(%1$L)))'
                       ' WITH CHECK ((SELECT wa_owns(%1$L)))', t);
    END LOOP;
END
$$;

-- The monitoring views read their tables with the rights of who queries them, not of their
-- owner: an operator limited to some numbers sees only those through them too.
ALTER VIEW webhook_conversation_health SET (security_invoker = true);
ALTER VIEW stuck_webhook_conversations SET (security_invoker = true);
ALTER VIEW webhook_agent_performance SET (security_invoker = true);
ALTER VIEW webhook_message_processing_metrics SET (security_invoker = true);
ALTER VIEW webhook_dlq_summary SET (security_invoker = true);
