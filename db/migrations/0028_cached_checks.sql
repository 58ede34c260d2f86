-- The CHECK constraints that every turn's writes meet, at a fraction of their cost (issue 16:
-- PostgreSQL's CPU per message).
--
-- PostgreSQL keeps a table's CHECK constraint as the text of its expression and, at every
-- statement that inserts or updates a row, reads that text back into an expression tree,
-- simplifies and prepares it, for every CHECK of the table (whichever columns the statement
-- writes). A list of allowed values is a list of constants, each read back field by field:
-- the three CHECKs of processed_webhook_messages cost ~124,000 instructions per statement
-- (callgrind, `postgres --single`, 4,000 one-row updates: 160,000 instructions each against
-- 36,000 without them), and a message's turn writes that table, its conversation and the
-- audit trail some 17 times: ExecConstraints was 18 % of a turn's instructions and ~5 % of
-- PostgreSQL's CPU in `bench.e2e` (perf).
--
-- A domain's CHECK is read once per connection (the type cache keeps it prepared). So each
-- list of values now lives in a domain, whose constraint has the table constraint's name, and
-- the table's CHECK casts the column to it: the expression read back at each statement is a
-- column and a cast (~46,000 instructions per statement for the same three). A value outside
-- the list fails as before, with SQLSTATE 23514 (check_violation) naming the same constraint;
-- only the message's wording differs ("value for domain ... violates check constraint").
-- NULL passes as before (a domain's CHECK passes NULL; the nullable columns compare the cast
-- with the column, which is NULL, not false, for NULL).

CREATE DOMAIN wa_message_kind AS text
    CONSTRAINT processed_webhook_messages_kind_check
    CHECK (VALUE IN ('message', 'status', 'event'));
CREATE DOMAIN wa_message_status AS text
    CONSTRAINT processed_webhook_messages_status_check
    CHECK (VALUE IN ('received', 'processing', 'replied', 'skipped', 'failed',
                     'dead_lettered'));
CREATE DOMAIN wa_reply_status AS text
    CONSTRAINT processed_webhook_messages_reply_status_check
    CHECK (VALUE IN ('sent', 'delivered', 'read', 'failed'));
CREATE DOMAIN wa_conversation_status AS text
    CONSTRAINT webhook_conversations_status_check
    CHECK (VALUE IN ('idle', 'active'));
CREATE DOMAIN wa_marketing_preference AS text
    CONSTRAINT webhook_conversations_marketing_preference_check
    CHECK (VALUE IN ('stop', 'resume'));
CREATE DOMAIN wa_transition_entity AS text
    CONSTRAINT conversation_state_transitions_entity_check
    CHECK (VALUE IN ('message', 'conversation', 'agent', 'handoff', 'operator'));

-- NOT VALID, then validated: the rows there were checked by the constraints these replace.
ALTER TABLE processed_webhook_messages
    DROP CONSTRAINT processed_webhook_messages_kind_check,
    DROP CONSTRAINT processed_webhook_messages_status_check,
    DROP CONSTRAINT processed_webhook_messages_reply_status_check,
    ADD CONSTRAINT processed_webhook_messages_kind_check
        CHECK (kind::wa_message_kind IS NOT NULL) NOT VALID,
    ADD CONSTRAINT processed_webhook_messages_status_check
        CHECK (status::wa_message_status IS NOT NULL) NOT VALID,
    ADD CONSTRAINT processed_webhook_messages_reply_status_check
        CHECK (reply_status::wa_reply_status = reply_status) NOT VALID;
ALTER TABLE processed_webhook_messages
    VALIDATE CONSTRAINT processed_webhook_messages_kind_check,
    VALIDATE CONSTRAINT processed_webhook_messages_status_check,
    VALIDATE CONSTRAINT processed_webhook_messages_reply_status_check;

ALTER TABLE webhook_conversations
    DROP CONSTRAINT webhook_conversations_status_check,
    DROP CONSTRAINT webhook_conversations_marketing_preference_check,
    ADD CONSTRAINT webhook_conversations_status_check
        CHECK (status::wa_conversation_status IS NOT NULL) NOT VALID,
    ADD CONSTRAINT webhook_conversations_marketing_preference_check
        CHECK (marketing_preference::wa_marketing_preference = marketing_preference) NOT VALID;
ALTER TABLE webhook_conversations
    VALIDATE CONSTRAINT webhook_conversations_status_check,
    VALIDATE CONSTRAINT webhook_conversations_marketing_preference_check;

ALTER TABLE conversation_state_transitions
    DROP CONSTRAINT conversation_state_transitions_entity_check,
    ADD CONSTRAINT conversation_state_transitions_entity_check
        CHECK (entity::wa_transition_entity IS NOT NULL) NOT VALID;
ALTER TABLE conversation_state_transitions
    VALIDATE CONSTRAINT conversation_state_transitions_entity_check;
