-- How often a message's turn was found cut off by a dead driver and resumed. Only these count
-- towards giving up on a message that keeps killing its driver; a turn that could not start
-- (agent unreachable) does not.
ALTER TABLE processed_webhook_messages ADD COLUMN turn_resumes integer NOT NULL DEFAULT 0;
