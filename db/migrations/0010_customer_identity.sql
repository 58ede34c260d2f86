-- Customers without a phone number. A customer is identified by the business-scoped user id
-- (BSUID, `contacts[].user_id` / `messages[].from_user_id`) when Meta sends one, and by the
-- phone number otherwise: `customer_id` is that key, and a conversation is one per (business
-- number, customer_id). The phone number (`wa_id`) is an attribute that may come and go; a
-- conversation first seen by phone takes the customer's BSUID as its key the first time a
-- delivery names both (wa_ingest_messages), so its context and history stay with it.
--
-- Without downtime: every statement here either adds a nullable column, fills it by primary
-- key or builds an index; no table is rewritten and no lock is held beyond this transaction.
-- Services from before this change keep storing deliveries until they are replaced: their
-- inserts name no customer_id, and the trigger below derives it.
ALTER TABLE webhook_conversations
    ADD COLUMN customer_id text,
    ADD COLUMN user_id text,
    ADD COLUMN parent_user_id text,
    -- Display only, never a key: a customer can change it at any time (kept without the "@").
    ADD COLUMN username text,
    -- The last `user_preferences` webhook: 'stop' or 'resume' marketing messages, and when.
    ADD COLUMN marketing_preference text CHECK (marketing_preference IN ('stop', 'resume')),
    ADD COLUMN marketing_preference_at timestamptz;
ALTER TABLE webhook_conversations ALTER COLUMN wa_id DROP NOT NULL;

UPDATE webhook_conversations SET customer_id = wa_id WHERE customer_id IS NULL;
ALTER TABLE webhook_conversations ALTER COLUMN customer_id SET NOT NULL;

CREATE UNIQUE INDEX webhook_conversations_customer_idx
    ON webhook_conversations (phone_number_id, customer_id);
-- A phone number is no longer a key: a number given up and reused by someone else arrives
-- with another BSUID, and is then a second conversation's attribute.
ALTER TABLE webhook_conversations DROP CONSTRAINT webhook_conversations_phone_number_id_wa_id_key;
CREATE INDEX webhook_conversations_pn_wa_id_idx ON webhook_conversations (phone_number_id, wa_id);
CREATE INDEX webhook_conversations_user_id_idx ON webhook_conversations (user_id)
    WHERE user_id IS NOT NULL;
CREATE INDEX webhook_conversations_username_idx ON webhook_conversations (lower(username))
    WHERE username IS NOT NULL;

CREATE FUNCTION wa_default_customer_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.customer_id := COALESCE(NULLIF(NEW.user_id, ''), NEW.wa_id, '');
    RETURN NEW;
END
$$;
CREATE TRIGGER webhook_conversations_customer_id
    BEFORE INSERT ON webhook_conversations
    FOR EACH ROW WHEN (NEW.customer_id IS NULL)
    EXECUTE FUNCTION wa_default_customer_id();

-- The customer's BSUID on each message and status row ('' / NULL when Meta sent none).
ALTER TABLE processed_webhook_messages ADD COLUMN user_id text;

-- kind 'event': a webhook about a customer rather than a message (a BSUID changed, marketing
-- preferences), stored once like the others and applied to the customer's conversations.
ALTER TABLE processed_webhook_messages DROP CONSTRAINT processed_webhook_messages_kind_check;
ALTER TABLE processed_webhook_messages ADD CONSTRAINT processed_webhook_messages_kind_check
    CHECK (kind IN ('message', 'status', 'event'));

-- Stores a batch of messages in one round trip (see services/state/queries.sql for the
-- statement it runs after the re-keying): first, conversations known by a phone number that
-- this batch names together with a BSUID take the BSUID as their key. It cannot be a CTE of
-- the same statement: PostgreSQL applies one change per row and statement, and the upsert
-- that follows may change the same rows.
CREATE FUNCTION wa_adopt_user_ids(p_phone_number_ids text[], p_wa_ids text[], p_user_ids text[])
RETURNS void
LANGUAGE sql AS $$
    UPDATE webhook_conversations c
       SET customer_id = i.user_id, user_id = i.user_id, updated_at = now()
      FROM (SELECT DISTINCT ON (phone_number_id, wa_id) phone_number_id, wa_id, user_id
              FROM unnest(p_phone_number_ids, p_wa_ids, p_user_ids)
                   AS t(phone_number_id, wa_id, user_id)
             WHERE user_id <> '' AND wa_id <> ''
             ORDER BY phone_number_id, wa_id, user_id) i
     WHERE c.phone_number_id = i.phone_number_id AND c.customer_id = i.wa_id
       AND NOT EXISTS (SELECT 1 FROM webhook_conversations d
                        WHERE d.phone_number_id = i.phone_number_id
                          AND d.customer_id = i.user_id)
$$;

-- A claimed conversation's oldest waiting message, as in 0006, and now the customer's current
-- phone number, BSUID and username from the conversation: the reply goes to the phone number
-- when it is known (also when it was learned after the message), else to the BSUID.
DROP FUNCTION wa_start_turn(bigint, bigint);
CREATE FUNCTION wa_start_turn(
    p_conversation_id bigint,
    p_token bigint,
    OUT outcome text,
    OUT fence_token bigint,
    OUT id bigint,
    OUT message_id text,
    OUT conversation_id bigint,
    OUT phone_number_id text,
    OUT wa_id text,
    OUT message_type text,
    OUT wa_timestamp timestamptz,
    OUT body text,
    OUT correlation_id text,
    OUT traceparent text,
    OUT attempts integer,
    OUT turn_resumes integer,
    OUT resumed boolean,
    OUT queued_because text,
    OUT contact_name text,
    OUT user_id text,
    OUT username text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_status text;
    v_message_id text;
    v_correlation_id text;
    v_reason text;
    v_wa_id text;
BEGIN
    SELECT c.fence_token, c.contact_name, c.wa_id, c.user_id, c.username
      INTO fence_token, contact_name, v_wa_id, user_id, username
      FROM webhook_conversations c
     WHERE c.id = p_conversation_id
       FOR SHARE;
    IF fence_token IS DISTINCT FROM p_token THEN
        outcome := 'stale';
        RETURN;
    END IF;

    SELECT m.id, m.status, m.message_id, m.correlation_id
      INTO v_id, v_status, v_message_id, v_correlation_id
      FROM processed_webhook_messages m
     WHERE m.conversation_id = p_conversation_id AND m.status IN ('received', 'processing')
     ORDER BY m.wa_timestamp, m.id
     LIMIT 1
       FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'none';
        RETURN;
    END IF;

    resumed := v_status = 'processing';
    IF resumed THEN
        v_reason := 'resumed: its previous turn never finished';
        queued_because := v_reason;
    ELSE
        v_reason := 'turn started';
        SELECT t.reason INTO queued_because
          FROM conversation_state_transitions t
         WHERE t.message_id = v_message_id AND t.to_state = 'received'
         ORDER BY t.id DESC
         LIMIT 1;
    END IF;

    UPDATE processed_webhook_messages m
       SET status = 'processing',
           status_reason = NULL,
           attempts = m.attempts + 1,
           turn_resumes = m.turn_resumes + CASE WHEN resumed THEN 1 ELSE 0 END,
           started_at = now(),
           updated_at = now()
     WHERE m.id = v_id
    RETURNING m.id, m.message_id, m.conversation_id, m.phone_number_id,
              COALESCE(v_wa_id, NULLIF(m.wa_id, ''), ''),
              m.message_type, m.wa_timestamp, m.body, m.correlation_id, m.traceparent,
              m.attempts, m.turn_resumes
         INTO id, message_id, conversation_id, phone_number_id, wa_id, message_type,
              wa_timestamp, body, correlation_id, traceparent, attempts, turn_resumes;

    INSERT INTO conversation_state_transitions
        (conversation_id, message_id, entity, from_state, to_state, reason, fence_token,
         correlation_id)
    SELECT p_conversation_id, v_message_id, 'message', s.from_state, s.to_state, v_reason,
           p_token, v_correlation_id
      FROM (VALUES (1, 'processing', 'received'), (2, 'received', 'processing'))
           AS s (n, from_state, to_state)
     WHERE s.n = 2 OR resumed
     ORDER BY s.n;
    outcome := 'started';
END
$$;
