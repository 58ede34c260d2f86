-- webhook_conversations.message_count: the messages stored in the conversation, duplicates
-- not counted. Counted by the statement that stores them, from the rows it inserted: the
-- ingest statement cannot do it itself, since it has already upserted those conversation rows
-- and PostgreSQL applies only one change to a row within one statement.
CREATE FUNCTION wa_count_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- The ingest statement has locked these conversation rows already (in key order), so this
    -- waits for no other batch.
    UPDATE webhook_conversations c
       SET message_count = c.message_count + n.added
      FROM (SELECT conversation_id, count(*)::integer AS added
              FROM inserted
             WHERE kind = 'message' AND conversation_id IS NOT NULL
             GROUP BY conversation_id) n
     WHERE c.id = n.conversation_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER processed_messages_count
    AFTER INSERT ON processed_webhook_messages
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION wa_count_messages();

-- Conversations stored before this migration: their count so far.
UPDATE webhook_conversations c
   SET message_count = n.stored
  FROM (SELECT conversation_id, count(*)::integer AS stored
          FROM processed_webhook_messages
         WHERE kind = 'message' AND conversation_id IS NOT NULL
         GROUP BY conversation_id) n
 WHERE c.id = n.conversation_id;
