-- The click-to-WhatsApp ad a message came from (Meta's `messages[].referral`: source_url,
-- source_id, source_type, headline, body, media_type, ctwa_clid, ...), NULL when it came from
-- none. Adding a nullable column rewrites nothing.
ALTER TABLE processed_webhook_messages ADD COLUMN referral jsonb;
