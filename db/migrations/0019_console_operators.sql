-- The operator console's people (services/console): who may log in, with which role, to
-- which business numbers; their sessions; and every action they take, kept and shown.
-- The console connects as the operator login role (db/privileges.sql) and names the person
-- of each request in the setting `wa.console_operator` (set_config(..., true): that
-- transaction only); wa_operator_may then also holds the rows to that person's numbers, so a
-- page forgetting a filter still shows nothing of another number.

CREATE TABLE wa_console_operators (
    name             text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    role             text        NOT NULL CHECK (role IN ('admin', 'viewer')),
    -- scrypt$N$r$p$salt$hash (services/console/passwords.py), never the password.
    password_hash    text        NOT NULL,
    -- Failures since first_failed_at; past the limit, no login until locked_until.
    failed_attempts  integer     NOT NULL DEFAULT 0,
    first_failed_at  timestamptz,
    locked_until     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- The business numbers (phone_number_id) a console operator may see: none listed means all
-- (the operator login role's own limits, wa_operator_numbers, still apply on top).
CREATE TABLE wa_console_operator_numbers (
    operator         text        NOT NULL REFERENCES wa_console_operators (name) ON DELETE CASCADE,
    phone_number_id  text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operator, phone_number_id)
);

-- A logged-in browser: the cookie holds a random token, the table only its SHA-256.
CREATE TABLE wa_console_sessions (
    token_hash  bytea       PRIMARY KEY,
    operator    text        NOT NULL REFERENCES wa_console_operators (name) ON DELETE CASCADE,
    csrf_token  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX wa_console_sessions_expires_idx ON wa_console_sessions (expires_at);

-- Every action an operator took (retry, purge, release, reply, login, logout): who, what,
-- on what, when. phone_number_id: the business number it touched, when one (RLS shows an
-- operator the actions on its numbers).
CREATE TABLE wa_console_audit (
    id               bigserial   PRIMARY KEY,
    operator         text        NOT NULL,
    action           text        NOT NULL,
    target           text        NOT NULL DEFAULT '',
    phone_number_id  text,
    detail           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wa_console_audit_at_idx ON wa_console_audit (at DESC, id DESC);

-- The conversations page: newest activity first, paged by (last_activity_at, id).
CREATE INDEX webhook_conversations_activity_idx
    ON webhook_conversations (last_activity_at DESC, id DESC);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['wa_console_operators', 'wa_console_operator_numbers',
                             'wa_console_sessions', 'wa_console_audit']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY wa_owner ON %1$I USING ((SELECT wa_owns(%1$L)))'
                       ' WITH CHECK ((SELECT wa_owns(%1$L)))', t);
    END LOOP;
END
$$;

-- 0012's rule (the login role's numbers) and, when the console names its operator, that
-- operator's numbers too. An operator named but unknown sees nothing.
CREATE OR REPLACE FUNCTION wa_operator_may(p_phone_number_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT (NOT EXISTS (SELECT 1 FROM wa_operator_numbers o WHERE o.role_name = current_user)
            OR EXISTS (SELECT 1 FROM wa_operator_numbers o
                        WHERE o.role_name = current_user
                          AND o.phone_number_id = p_phone_number_id))
       AND (coalesce(current_setting('wa.console_operator', true), '') = ''
            OR EXISTS (
                SELECT 1 FROM wa_console_operators c
                 WHERE c.name = current_setting('wa.console_operator', true)
                   AND (NOT EXISTS (SELECT 1 FROM wa_console_operator_numbers n
                                     WHERE n.operator = c.name)
                        OR EXISTS (SELECT 1 FROM wa_console_operator_numbers n
                                    WHERE n.operator = c.name
                                      AND n.phone_number_id = p_phone_number_id))))
$$;
