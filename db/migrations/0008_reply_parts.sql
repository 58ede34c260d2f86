-- A reply longer than one WhatsApp text message (4,096 characters) is sent as several: the split
-- and each part's send are recorded here, so a turn resumed after a crash neither repeats nor
-- loses a part. Only long replies have rows: a one-message reply costs nothing here.
CREATE TABLE agent_reply_parts (
    message_id        text        NOT NULL
                      REFERENCES processed_webhook_messages (message_id) ON DELETE CASCADE,
    part              integer     NOT NULL CHECK (part >= 0),
    body              text        NOT NULL,
    -- The Graph API's id of the part once sent (or confirmed by its status webhook, whose
    -- biz_opaque_callback_data is '<message_id>#<part>').
    sent_id           text,
    -- When the current attempt to send it began (NULL when no attempt is open).
    send_started_at   timestamptz,
    confirmed_by      text,
    reply_status      text        CHECK (reply_status IN ('sent', 'delivered', 'read', 'failed')),
    reply_error_code  text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, part)
);

-- Replies Meta could not deliver, counted by `wa stats` over a time window.
CREATE INDEX processed_messages_delivery_failed_idx ON processed_webhook_messages (received_at)
    WHERE kind = 'status' AND reply_status = 'failed';
