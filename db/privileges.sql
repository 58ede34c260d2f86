-- What each service's login role may do in this database, and nothing more.
--
-- common/roles.py applies this file in one transaction after every migration and every
-- provisioning (`wa migrate`, `python -m common.migrate`, `make run`), with :"state",
-- :"agent", :"dlq", :"operator" and :"database" replaced by the quoted names of this
-- database's roles and of the database. It starts from nothing (everything revoked, every
-- `role_*` policy dropped beforehand), so a line removed here is a right removed there.
-- Every grant below is what a service's SQL does (services/<service>/queries.sql and the
-- functions it calls, which run with the caller's rights): adding a right is one line.
-- Row level security is enabled and forced on every table (db/migrations/0012); a role
-- reaches a row only through a `role_*` policy naming it.

-- Nobody else connects, creates temporary tables or runs our functions.
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"state", :"agent", :"dlq", :"operator";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC, :"state", :"agent", :"dlq", :"operator";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public
    FROM PUBLIC, :"state", :"agent", :"dlq", :"operator";
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public
    FROM PUBLIC, :"state", :"agent", :"dlq", :"operator";
-- Every policy's owner clause calls it.
GRANT EXECUTE ON FUNCTION wa_owns TO :"state", :"agent", :"dlq", :"operator";
-- Which migrations are applied: the state service refuses to start with one pending, and each
-- service's Kubernetes init container waits for them with its own role
-- (`python -m common.migrate --wait`).
GRANT SELECT ON schema_migrations TO :"state", :"agent", :"dlq", :"operator";
CREATE POLICY role_services ON schema_migrations FOR SELECT
    TO :"state", :"agent", :"dlq", :"operator" USING (true);

-- state: ingests, claims conversations, moves messages through their states, audits, reports.
GRANT SELECT, INSERT, UPDATE ON webhook_conversations, processed_webhook_messages TO :"state";
GRANT SELECT, INSERT ON conversation_state_transitions TO :"state";
GRANT SELECT, UPDATE ON agent_reply_parts TO :"state";  -- status webhooks confirm parts
GRANT SELECT ON webhook_dlq TO :"state";  -- check_webhook_system_health
GRANT SELECT, INSERT, UPDATE ON wa_runtime_settings TO :"state";
GRANT USAGE ON SEQUENCE webhook_conversations_id_seq, processed_webhook_messages_id_seq,
    conversation_state_transitions_id_seq TO :"state";
GRANT EXECUTE ON FUNCTION wa_start_turn, wa_claim_turn, wa_finish_turn, wa_transition_message,
    wa_delivery_rank, get_webhook_performance_stats, check_webhook_system_health,
    wa_stuck_timeout, wa_unstored_messages, wa_default_customer_id TO :"state";
GRANT EXECUTE ON FUNCTION wa_hold_for_person TO :"state";  -- handoff (0017)
GRANT EXECUTE ON FUNCTION wa_release_conversation TO :"state";  -- with a turn (0020)
GRANT EXECUTE ON FUNCTION wa_claim_turns, wa_finish_turns TO :"state";  -- batched (0022)
GRANT EXECUTE ON FUNCTION wa_start_turns, wa_lock_turn_messages TO :"state";  -- set-based (0037)
GRANT EXECUTE ON FUNCTION wa_reply_status_seen TO :"state";  -- a send's delivery state (0029)
GRANT EXECUTE ON FUNCTION wa_context TO :"state";  -- a turn's context, from its entries (0030)
GRANT EXECUTE ON FUNCTION wa_ingest_messages, wa_ingest_statuses TO :"state";  -- ingest (0032)
-- Retention and erasure: only through these functions, which run as the owner (0013).
GRANT EXECUTE ON FUNCTION wa_prune, wa_record_prune, wa_forget_customer TO :"state";
GRANT SELECT ON wa_message_tombstones TO :"state";  -- ingest: a forgotten id stays a duplicate
GRANT SELECT ON agent_contexts, agent_context_entries TO :"state";  -- a turn's context (0020)
-- A conversation's earlier identifiers, written with a BSUID change, read by `wa forget` (0031).
GRANT SELECT, INSERT ON webhook_conversation_aliases TO :"state";
CREATE POLICY role_state ON webhook_conversations TO :"state" USING (true) WITH CHECK (true);
CREATE POLICY role_state ON processed_webhook_messages TO :"state"
    USING (true) WITH CHECK (true);
CREATE POLICY role_state ON conversation_state_transitions TO :"state"
    USING (true) WITH CHECK (true);
CREATE POLICY role_state ON agent_reply_parts TO :"state" USING (true) WITH CHECK (true);
CREATE POLICY role_state ON webhook_dlq FOR SELECT TO :"state" USING (true);
CREATE POLICY role_state ON wa_runtime_settings TO :"state" USING (true) WITH CHECK (true);
CREATE POLICY role_state ON wa_message_tombstones FOR SELECT TO :"state" USING (true);
CREATE POLICY role_state ON agent_contexts FOR SELECT TO :"state" USING (true);
CREATE POLICY role_state ON agent_context_entries FOR SELECT TO :"state" USING (true);
CREATE POLICY role_state ON webhook_conversation_aliases TO :"state"
    USING (true) WITH CHECK (true);

-- agent: reads the message it answers and its conversation, writes the context, the reply
-- and its send state; never a message's status (no UPDATE on that column), never a
-- conversation (it may lock one, FOR SHARE, to fence its writes: that needs UPDATE on a
-- column, and the policy refuses every row an UPDATE would write).
GRANT SELECT ON processed_webhook_messages TO :"agent";
GRANT UPDATE (reply_text, reply_payload, agent_type, send_started_at, reply_message_id,
    reply_status, reply_error_code, updated_at) ON processed_webhook_messages TO :"agent";
GRANT UPDATE (absorbed_message_ids) ON processed_webhook_messages TO :"agent";  -- a burst
GRANT EXECUTE ON FUNCTION wa_save_burst TO :"agent";
GRANT SELECT, UPDATE (updated_at) ON webhook_conversations TO :"agent";
GRANT SELECT, INSERT, UPDATE ON agent_contexts, agent_sessions, agent_reply_parts TO :"agent";
-- A turn adds its messages to the newest entry or a new one, and deletes those past the bound
-- (0030).
GRANT SELECT, INSERT, UPDATE, DELETE ON agent_context_entries TO :"agent";
GRANT INSERT ON conversation_state_transitions TO :"agent";  -- a change of agent, audited
GRANT USAGE ON SEQUENCE agent_sessions_id_seq, conversation_state_transitions_id_seq
    TO :"agent";
GRANT EXECUTE ON FUNCTION wa_save_turn, increment_session_metrics, wa_delivery_rank
    TO :"agent";
GRANT EXECUTE ON FUNCTION wa_save_turns TO :"agent";  -- many turns' saves at once (0023)
GRANT EXECUTE ON FUNCTION wa_reply_status_seen TO :"agent";  -- a send's delivery state (0029)
GRANT EXECUTE ON FUNCTION wa_context TO :"agent";  -- a turn's context, from its entries (0030)
-- Operators' replies (Agent.SendOperatorReply): stored, sent, audited, added to the context.
GRANT SELECT, INSERT, UPDATE ON operator_replies TO :"agent";
GRANT USAGE ON SEQUENCE operator_replies_id_seq TO :"agent";
CREATE POLICY role_agent ON processed_webhook_messages FOR SELECT TO :"agent" USING (true);
CREATE POLICY role_agent_reply ON processed_webhook_messages FOR UPDATE TO :"agent"
    USING (kind = 'message') WITH CHECK (kind = 'message');
CREATE POLICY role_agent ON webhook_conversations FOR SELECT TO :"agent" USING (true);
CREATE POLICY role_agent_lock ON webhook_conversations FOR UPDATE TO :"agent"
    USING (true) WITH CHECK (false);
CREATE POLICY role_agent ON agent_contexts TO :"agent" USING (true) WITH CHECK (true);
CREATE POLICY role_agent ON agent_context_entries TO :"agent" USING (true) WITH CHECK (true);
CREATE POLICY role_agent ON agent_sessions TO :"agent" USING (true) WITH CHECK (true);
CREATE POLICY role_agent ON agent_reply_parts TO :"agent" USING (true) WITH CHECK (true);
CREATE POLICY role_agent ON conversation_state_transitions FOR INSERT TO :"agent"
    WITH CHECK (entity IN ('agent', 'operator'));
CREATE POLICY role_agent ON operator_replies TO :"agent" USING (true) WITH CHECK (true);

-- dlq: its own table; of a message only what a redrive needs; of a conversation only how to
-- name its customer. No context, session or history.
GRANT SELECT, INSERT, UPDATE ON webhook_dlq TO :"dlq";
GRANT USAGE ON SEQUENCE webhook_dlq_id_seq TO :"dlq";
GRANT SELECT (message_id, kind, status, payload, traceparent) ON processed_webhook_messages
    TO :"dlq";
GRANT SELECT (id, wa_id, user_id, username) ON webhook_conversations TO :"dlq";
GRANT EXECUTE ON FUNCTION wa_dlq_enqueue TO :"dlq";
CREATE POLICY role_dlq ON webhook_dlq TO :"dlq" USING (true) WITH CHECK (true);
CREATE POLICY role_dlq ON processed_webhook_messages FOR SELECT TO :"dlq"
    USING (kind = 'message');
CREATE POLICY role_dlq ON webhook_conversations FOR SELECT TO :"dlq" USING (true);

-- operator (the CLI and the console): reads, and resolves or purges dead-letter items, of
-- the business numbers wa_operator_numbers lists for it (all when it lists none).
GRANT SELECT ON webhook_conversations, processed_webhook_messages,
    conversation_state_transitions, webhook_dlq, agent_contexts, agent_context_entries,
    agent_sessions,
    agent_reply_parts, wa_runtime_settings, wa_operator_numbers, webhook_conversation_health,
    stuck_webhook_conversations, webhook_agent_performance, webhook_message_processing_metrics,
    webhook_dlq_summary, operator_replies TO :"operator";
GRANT UPDATE (status, resolved_at, updated_at) ON webhook_dlq TO :"operator";
GRANT EXECUTE ON FUNCTION wa_operator_may, get_webhook_performance_stats,
    check_webhook_system_health, wa_stuck_timeout, wa_delivery_rank TO :"operator";
CREATE POLICY role_operator ON wa_operator_numbers FOR SELECT TO :"operator"
    USING (role_name = current_user);
CREATE POLICY role_operator ON wa_runtime_settings FOR SELECT TO :"operator" USING (true);
CREATE POLICY role_operator ON webhook_conversations FOR SELECT TO :"operator"
    USING (wa_operator_may(phone_number_id));
CREATE POLICY role_operator ON processed_webhook_messages FOR SELECT TO :"operator"
    USING (wa_operator_may(phone_number_id));
CREATE POLICY role_operator ON operator_replies FOR SELECT TO :"operator"
    USING (wa_operator_may(phone_number_id));
CREATE POLICY role_operator ON agent_reply_parts FOR SELECT TO :"operator"
    USING (wa_operator_may((SELECT m.phone_number_id FROM processed_webhook_messages m
                             WHERE m.message_id = agent_reply_parts.message_id)));
CREATE POLICY role_operator ON conversation_state_transitions FOR SELECT TO :"operator"
    USING (wa_operator_may((SELECT c.phone_number_id FROM webhook_conversations c
                             WHERE c.id = conversation_state_transitions.conversation_id)));
CREATE POLICY role_operator ON agent_contexts FOR SELECT TO :"operator"
    USING (wa_operator_may((SELECT c.phone_number_id FROM webhook_conversations c
                             WHERE c.id = agent_contexts.conversation_id)));
CREATE POLICY role_operator ON agent_context_entries FOR SELECT TO :"operator"
    USING (wa_operator_may((SELECT c.phone_number_id FROM webhook_conversations c
                             WHERE c.id = agent_context_entries.conversation_id)));
CREATE POLICY role_operator ON agent_sessions FOR SELECT TO :"operator"
    USING (wa_operator_may((SELECT c.phone_number_id FROM webhook_conversations c
                             WHERE c.id = agent_sessions.conversation_id)));
CREATE POLICY role_operator ON webhook_dlq TO :"operator"
    USING (wa_operator_may((SELECT c.phone_number_id FROM webhook_conversations c
                             WHERE c.id = webhook_dlq.conversation_id)))
    WITH CHECK (wa_operator_may((SELECT c.phone_number_id FROM webhook_conversations c
                                  WHERE c.id = webhook_dlq.conversation_id)));

-- The console's operators (db/migrations/0019): `wa operator add` and the console's login
-- write them through the operator role; sessions and the audit trail likewise. The audit
-- shows an operator limited to some numbers the actions on those and its own; the others
-- (and the CLI) see every action.
GRANT SELECT, INSERT, UPDATE, DELETE ON wa_console_operators TO :"operator";
GRANT SELECT, INSERT, DELETE ON wa_console_operator_numbers TO :"operator";
GRANT SELECT, INSERT, UPDATE, DELETE ON wa_console_sessions TO :"operator";
GRANT SELECT, INSERT ON wa_console_audit TO :"operator";
GRANT USAGE ON SEQUENCE wa_console_audit_id_seq TO :"operator";
CREATE POLICY role_operator ON wa_console_operators TO :"operator" USING (true) WITH CHECK (true);
CREATE POLICY role_operator ON wa_console_operator_numbers TO :"operator"
    USING (true) WITH CHECK (true);
CREATE POLICY role_operator ON wa_console_sessions TO :"operator" USING (true) WITH CHECK (true);
CREATE POLICY role_operator ON wa_console_audit FOR SELECT TO :"operator"
    USING (wa_operator_may(phone_number_id)
           OR operator = current_setting('wa.console_operator', true));
CREATE POLICY role_operator_write ON wa_console_audit FOR INSERT TO :"operator"
    WITH CHECK (true);
