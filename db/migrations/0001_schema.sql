-- The six tables of the seed, with the keys that make the guarantees hold in the database.

CREATE TABLE webhook_conversations (
    id                bigserial PRIMARY KEY,
    phone_number_id   text        NOT NULL,
    wa_id             text        NOT NULL,
    contact_name      text,
    status            text        NOT NULL DEFAULT 'idle'
                      CHECK (status IN ('idle', 'active')),
    -- Grows with every claim of the conversation; a turn's writes carry the value they were
    -- given and are refused once a later claim has moved it on (fencing).
    fence_token       bigint      NOT NULL DEFAULT 0,
    lock_owner        text,
    locked_at         timestamptz,
    message_count     integer     NOT NULL DEFAULT 0,
    error_count       integer     NOT NULL DEFAULT 0,
    last_message_at   timestamptz,
    last_activity_at  timestamptz NOT NULL DEFAULT now(),
    correlation_id    text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (phone_number_id, wa_id)
);
CREATE INDEX webhook_conversations_wa_id_idx ON webhook_conversations (wa_id);
CREATE INDEX webhook_conversations_active_idx ON webhook_conversations (locked_at)
    WHERE status = 'active';

-- Every inbound message and every status update, once, keyed by its WhatsApp id.
CREATE TABLE processed_webhook_messages (
    id                 bigserial PRIMARY KEY,
    message_id         text        NOT NULL UNIQUE,
    kind               text        NOT NULL CHECK (kind IN ('message', 'status')),
    conversation_id    bigint      REFERENCES webhook_conversations (id),
    phone_number_id    text        NOT NULL,
    wa_id              text        NOT NULL,
    message_type       text        NOT NULL,
    wa_timestamp       timestamptz NOT NULL,
    body               text,
    payload            jsonb       NOT NULL,
    status             text        NOT NULL
                       CHECK (status IN ('received', 'processing', 'replied', 'skipped',
                                         'failed', 'dead_lettered')),
    status_reason      text,
    attempts           integer     NOT NULL DEFAULT 0,
    agent_type         text,
    reply_text         text,
    reply_message_id   text,
    reply_status       text        CHECK (reply_status IN ('sent', 'delivered', 'read', 'failed')),
    reply_error_code   text,
    correlation_id     text        NOT NULL,
    traceparent        text        NOT NULL DEFAULT '',
    received_at        timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- The claim of a conversation's next message: oldest WhatsApp timestamp first, then arrival.
CREATE INDEX processed_messages_waiting_idx
    ON processed_webhook_messages (conversation_id, wa_timestamp, id)
    WHERE status IN ('received', 'processing');
-- The sweeper: in-flight work by age.
CREATE INDEX processed_messages_inflight_idx
    ON processed_webhook_messages (received_at)
    WHERE status IN ('received', 'processing');
CREATE INDEX processed_messages_received_at_idx ON processed_webhook_messages (received_at);
CREATE INDEX processed_messages_conversation_idx
    ON processed_webhook_messages (conversation_id, received_at);
CREATE INDEX processed_messages_reply_id_idx ON processed_webhook_messages (reply_message_id)
    WHERE reply_message_id IS NOT NULL;
CREATE INDEX processed_messages_correlation_idx ON processed_webhook_messages (correlation_id);

-- The audit trail: one row per state change of a message or a conversation.
CREATE TABLE conversation_state_transitions (
    id               bigserial PRIMARY KEY,
    conversation_id  bigint      REFERENCES webhook_conversations (id),
    message_id       text,
    entity           text        NOT NULL CHECK (entity IN ('message', 'conversation', 'agent')),
    from_state       text,
    to_state         text        NOT NULL,
    reason           text        NOT NULL DEFAULT '',
    fence_token      bigint,
    correlation_id   text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX state_transitions_conversation_idx
    ON conversation_state_transitions (conversation_id, created_at);
CREATE INDEX state_transitions_message_idx ON conversation_state_transitions (message_id);
CREATE INDEX state_transitions_created_idx ON conversation_state_transitions (created_at);

CREATE TABLE webhook_dlq (
    id               bigserial PRIMARY KEY,
    message_id       text        NOT NULL,
    conversation_id  bigint      REFERENCES webhook_conversations (id),
    payload          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error_class      text        NOT NULL,
    error_message    text        NOT NULL DEFAULT '',
    retryable        boolean     NOT NULL DEFAULT true,
    attempts         integer     NOT NULL DEFAULT 1,
    history          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'retrying', 'dead', 'resolved', 'purged')),
    next_attempt_at  timestamptz,
    correlation_id   text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz
);
-- One open item per message: a failure reported twice is one item with two attempts.
CREATE UNIQUE INDEX webhook_dlq_open_message_idx ON webhook_dlq (message_id)
    WHERE status IN ('pending', 'retrying', 'dead');
CREATE INDEX webhook_dlq_due_idx ON webhook_dlq (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_dlq_status_idx ON webhook_dlq (status, created_at);

CREATE TABLE agent_contexts (
    conversation_id  bigint      PRIMARY KEY REFERENCES webhook_conversations (id),
    agent_type       text        NOT NULL,
    messages         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    token_count      integer     NOT NULL DEFAULT 0,
    fence_token      bigint      NOT NULL DEFAULT 0,
    correlation_id   text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agent_sessions (
    id                bigserial PRIMARY KEY,
    conversation_id   bigint      NOT NULL REFERENCES webhook_conversations (id),
    agent_type        text        NOT NULL,
    turns             integer     NOT NULL DEFAULT 0,
    tokens_in         bigint      NOT NULL DEFAULT 0,
    tokens_out        bigint      NOT NULL DEFAULT 0,
    total_latency_ms  bigint      NOT NULL DEFAULT 0,
    errors            integer     NOT NULL DEFAULT 0,
    correlation_id    text        NOT NULL DEFAULT '',
    started_at        timestamptz NOT NULL DEFAULT now(),
    last_active_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (conversation_id, agent_type)
);
CREATE INDEX agent_sessions_last_active_idx ON agent_sessions (last_active_at);
