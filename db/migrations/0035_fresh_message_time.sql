-- A conversation's last message time moves only with messages stored now (the 24-hour
-- window's start since 0034).
--
-- The ingest's upsert and adoption set webhook_conversations.last_message_at to the GREATEST
-- of the batch's message times, copies of messages already stored included. Two cases moved it
-- wrongly: a message whose timestamp no clock holds is stored with the ingest's time
-- (services/state/store.py), and each redelivery of it carried a new one, so every Meta retry
-- of such a message moved the window's start to the retry's time and reopened a window that
-- had closed; and a copy delivered again after its customer's key changed (a BSUID Meta now
-- sends with the phone number) reached the BSUID's conversation, which never held that
-- message. The time now comes from `fresh`, the batch's messages this statement stores: a
-- conversation row touched by copies only keeps its time.
--
-- tests/integration/test_state_store.py::test_copies_of_stored_messages_do_not_move_the_window
-- fails without this.
--
-- The function as 0032 defined it, with `fresh.newest` and its three uses.
CREATE OR REPLACE FUNCTION wa_ingest_messages(
    text[], text[], text[], text[], text[], timestamptz[], text[], text[], text[], text[],
    text[], text[], text[], text[], text[], text[]
) RETURNS SETOF record
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
    WITH given AS (
        SELECT *
          FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                      $6::timestamptz[], $7::text[], $8::text[], $9::text[], $10::text[],
                      $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                      $16::text[])
               WITH ORDINALITY AS t(message_id, phone_number_id, wa_id, contact_name,
                                    correlation_id, wa_timestamp, message_type, body, payload,
                                    status, reason, traceparent, user_id, parent_user_id,
                                    username, referral, ord)
    ), raw AS (
        SELECT * FROM given g
         WHERE NOT EXISTS (SELECT 1 FROM wa_message_tombstones z
                            WHERE z.id_hash = sha256(convert_to(g.message_id, 'UTF8')))
    ), pairs AS (
        -- What this batch proves: this phone number and this BSUID are one customer.
        SELECT DISTINCT ON (phone_number_id, wa_id) phone_number_id, wa_id, user_id
          FROM raw
         WHERE user_id <> '' AND wa_id <> ''
         ORDER BY phone_number_id, wa_id, wa_timestamp DESC
    ), input AS (
        -- Each message's customer: its BSUID; else the BSUID its phone number goes with, in this
        -- batch or in a conversation that knows both; else the phone number. (COALESCE stops at
        -- the first value: the lookup runs only for a phone number without a BSUID.)
        SELECT r.*,
               COALESCE(NULLIF(r.user_id, ''), p.user_id,
                        (SELECT c.customer_id FROM webhook_conversations c
                          WHERE c.phone_number_id = r.phone_number_id AND c.wa_id = r.wa_id
                            AND c.user_id IS NOT NULL AND r.wa_id <> ''
                          ORDER BY c.last_activity_at DESC
                          LIMIT 1),
                        r.wa_id) AS customer_id
          FROM raw r
          LEFT JOIN pairs p
                 ON r.user_id = '' AND p.phone_number_id = r.phone_number_id AND p.wa_id = r.wa_id
    ), keys AS (
        SELECT DISTINCT ON (phone_number_id, customer_id) *
          FROM input
         ORDER BY phone_number_id, customer_id, wa_timestamp DESC
    ), fresh AS (
        -- Each conversation's messages in this batch that are not stored yet, as this statement
        -- sees the table: counted into message_count by the one update of the conversation row.
        SELECT i.phone_number_id, i.customer_id, count(DISTINCT i.message_id)::integer AS added,
               array_agg(DISTINCT i.message_id) AS ids, max(i.wa_timestamp) AS newest
          FROM input i
         WHERE NOT EXISTS (SELECT 1 FROM processed_webhook_messages m
                            WHERE m.message_id = i.message_id)
         GROUP BY i.phone_number_id, i.customer_id
    ), adoptable AS MATERIALIZED (
        -- Each BSUID of this batch with its phone number: the conversation keyed by that number,
        -- if any, becomes the BSUID's. One relation holds the whole key of both lookups below, so
        -- each probes the unique (phone_number_id, customer_id) index with both columns: joined
        -- to `pairs` and `keys` apart, a plan can take phone_number_id from one of them alone
        -- and read the business number's every conversation per message, as it did while the
        -- table's statistics were an empty table's (db/migrations/0027).
        SELECT k.*, p.wa_id AS phone_customer_id
          FROM pairs p
          JOIN keys k ON k.phone_number_id = p.phone_number_id AND k.customer_id = p.user_id
    ), adopt AS (
        UPDATE webhook_conversations c
           SET customer_id = a.customer_id, user_id = a.customer_id,
               wa_id = COALESCE(NULLIF(a.wa_id, ''), a.phone_customer_id),
               parent_user_id = COALESCE(NULLIF(a.parent_user_id, ''), c.parent_user_id),
               username = COALESCE(NULLIF(a.username, ''), c.username),
               contact_name = COALESCE(NULLIF(a.contact_name, ''), c.contact_name),
               -- (GREATEST skips the NULL of a batch of copies only)
               last_message_at = GREATEST(c.last_message_at,
                   (SELECT f.newest FROM fresh f
                     WHERE f.phone_number_id = a.phone_number_id AND f.customer_id = a.customer_id)),
               last_activity_at = now(), updated_at = now(),
               -- (rare: counted with a fresh snapshot, whoever changed the row since this began)
               message_count = c.message_count + wa_unstored_messages(
                   (SELECT f.ids FROM fresh f
                     WHERE f.phone_number_id = a.phone_number_id AND f.customer_id = a.customer_id))
          FROM adoptable a
         WHERE c.phone_number_id = a.phone_number_id AND c.customer_id = a.phone_customer_id
           AND NOT EXISTS (SELECT 1 FROM webhook_conversations d
                            WHERE d.phone_number_id = a.phone_number_id
                              AND d.customer_id = a.customer_id)
        RETURNING c.id, c.phone_number_id, c.customer_id
    ), created AS (
        INSERT INTO webhook_conversations AS c
            (phone_number_id, customer_id, wa_id, user_id, parent_user_id, username, contact_name,
             correlation_id, last_message_at, message_count)
        SELECT k.phone_number_id, k.customer_id, NULLIF(k.wa_id, ''), NULLIF(k.user_id, ''),
               NULLIF(k.parent_user_id, ''), NULLIF(k.username, ''), NULLIF(k.contact_name, ''),
               k.correlation_id, f.newest, COALESCE(f.added, 0)
          FROM keys k
          LEFT JOIN fresh f ON f.phone_number_id = k.phone_number_id
                           AND f.customer_id = k.customer_id
         WHERE NOT EXISTS (SELECT 1 FROM adopt a
                            WHERE a.phone_number_id = k.phone_number_id
                              AND a.customer_id = k.customer_id)
         ORDER BY k.phone_number_id, k.customer_id
        ON CONFLICT (phone_number_id, customer_id) DO UPDATE
            SET contact_name = COALESCE(EXCLUDED.contact_name, c.contact_name),
                wa_id = COALESCE(EXCLUDED.wa_id, c.wa_id),
                user_id = COALESCE(EXCLUDED.user_id, c.user_id),
                parent_user_id = COALESCE(EXCLUDED.parent_user_id, c.parent_user_id),
                username = COALESCE(EXCLUDED.username, c.username),
                -- (NULL for copies only, which GREATEST skips)
                last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
                last_activity_at = now(),
                -- The count this statement's snapshot saw is still the row's: no message was
                -- added to it since, `fresh` holds. Else (a concurrent delivery of the same
                -- messages, committed while this one waited for the row) count with a fresh
                -- snapshot.
                message_count = c.message_count
                    + CASE WHEN c.message_count = (SELECT s.message_count
                                                     FROM webhook_conversations s
                                                    WHERE s.id = c.id)
                           THEN EXCLUDED.message_count
                           ELSE wa_unstored_messages(
                                    (SELECT f.ids FROM fresh f
                                      WHERE f.phone_number_id = EXCLUDED.phone_number_id
                                        AND f.customer_id = EXCLUDED.customer_id))
                      END
        RETURNING id, phone_number_id, customer_id
    ), conv AS (
        SELECT * FROM adopt
        UNION ALL
        SELECT * FROM created
    ), msg AS (
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, user_id, message_type,
             wa_timestamp, body, payload, status, status_reason, correlation_id, traceparent,
             referral)
        SELECT i.message_id, 'message', conv.id, i.phone_number_id, i.wa_id, NULLIF(i.user_id, ''),
               i.message_type, i.wa_timestamp, NULLIF(i.body, ''), i.payload::jsonb, i.status,
               NULLIF(i.reason, ''), i.correlation_id, i.traceparent,
               NULLIF(i.referral, '')::jsonb
          FROM input i JOIN conv USING (phone_number_id, customer_id)
         ORDER BY i.message_id
        ON CONFLICT (message_id) DO NOTHING
        RETURNING message_id, conversation_id, status, status_reason, correlation_id
    ), audit AS (
        INSERT INTO conversation_state_transitions
            (conversation_id, message_id, entity, from_state, to_state, reason, correlation_id)
        SELECT conversation_id, message_id, 'message', NULL, status,
               COALESCE(status_reason, 'ingested'), correlation_id
          FROM msg
    )
    SELECT g.ord, g.message_id, COALESCE(conv.id, 0) AS conversation_id, msg.status
      FROM given g
      LEFT JOIN input i ON i.ord = g.ord
      LEFT JOIN conv ON conv.phone_number_id = i.phone_number_id
                    AND conv.customer_id = i.customer_id
      LEFT JOIN msg ON msg.message_id = i.message_id
     ORDER BY g.ord;
END
$$;

