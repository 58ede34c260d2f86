-- When the current attempt to send a message's reply began (NULL when no attempt is open).
-- A turn that finds it set after a crash knows the reply may already be with the customer and
-- does not send it again; the status webhook's biz_opaque_callback_data later confirms it.
ALTER TABLE processed_webhook_messages ADD COLUMN send_started_at timestamptz;
ALTER TABLE processed_webhook_messages ADD COLUMN reply_confirmed_by text;
