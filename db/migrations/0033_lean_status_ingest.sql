-- The ingest of delivery statuses in simple statements, the rare ones only when needed (issue
-- 16: PostgreSQL's CPU per message).
--
-- A business receives two or three status webhooks for every reply, one at a time at a
-- customer's pace, and 0032's wa_ingest_statuses was one statement of seven CTEs whatever the
-- batch held: PostgreSQL set up and tore down its whole plan (two dozen nodes, four tables
-- written) at every call (perf of the backend: a quarter of its time starting the executor, a
-- sixth finishing the CTEs, a sixth committing). Here the same work
-- is up to five statements, each set up only when it has something to do:
--   * the statuses are stored, as before (each (outbound id, status) once, not for a reply
--     erased by `wa forget`, in message id order);
--   * the replies' messages are found once (by outbound id, and by callback data for a send
--     its turn never recorded), and only when the batch is about more than one are they
--     locked first, in the order a batch of turns' final statements takes them (wa_finish_turns:
--     by conversation, each conversation's row before its messages'): locked in the updates'
--     own order, a status for a reply whose turn is still finishing could hold one message of
--     that batch while waiting for another, and PostgreSQL would break the cycle after
--     deadlock_timeout by failing one of the two. One message needs no order;
--   * a send never recorded is confirmed (never by `failed`: that is no proof the customer has
--     it, and the send is made again) only when one was found;
--   * each reply's furthest delivery state is kept; it only moves forward;
--   * the parts of a long reply are updated only when some callback data names a part (last,
--     in wa_prune's order: a message before its parts).
-- (Each statement sees what the ones before it wrote: a send confirmed by a status then gets
-- the furthest state of the call's statuses, where 0032's single statement kept the one the
-- confirmation took.)
-- Measured in one backend, on a history of 40,000 answered messages, this version and 0032's
-- called in turn, round after round (`python -m bench.status_ingest --rounds 16 --version
-- db/migrations/0032_generic_turn_plans.sql`, with and without `--no-sync`): a status alone
-- 495-502 µs of the backend's CPU against 590, each of ten in one call 92-95 against 106-114
-- (this machine's speed drifts from run to run; the ratio held: 0.84-0.85 alone). Each
-- statement reads by a key, so the generic plan is still the plan
-- (tests/integration/test_monitoring_sql.py checks each on a million messages).
CREATE OR REPLACE FUNCTION wa_ingest_statuses(
    text[], text[], text[], text[], timestamptz[], text[], text[], text[], text[], text[],
    text[]
) RETURNS SETOF text
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_rows bigint[];
    v_unrecorded boolean;
BEGIN
    RETURN QUERY
    WITH stored AS (
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, user_id, message_type,
             wa_timestamp, body, payload, status, status_reason, reply_message_id, reply_status,
             reply_error_code, correlation_id, traceparent)
        SELECT 'status:' || i.outbound_id || ':' || i.status, 'status',
               -- The conversation of the reply it is about; else the recipient's, named by BSUID
               -- (a reply to a customer with a username has no recipient_id) or phone number.
               -- (The kind is checked on the rows read, not in the condition: see below.)
               COALESCE(
                   (SELECT min(CASE WHEN m.kind = 'message' THEN m.conversation_id END)
                      FROM processed_webhook_messages m
                     WHERE m.reply_message_id = i.outbound_id),
                   (SELECT c.id FROM webhook_conversations c
                     WHERE c.phone_number_id = i.phone_number_id
                       AND c.customer_id = NULLIF(i.recipient_user_id, '')),
                   (SELECT c.id FROM webhook_conversations c
                     WHERE c.phone_number_id = i.phone_number_id
                       AND c.wa_id = NULLIF(i.recipient_id, '')
                     ORDER BY c.last_activity_at DESC
                     LIMIT 1)),
               i.phone_number_id, i.recipient_id, NULLIF(i.recipient_user_id, ''), 'status', i.ts,
               i.status, i.payload::jsonb,
               'skipped', 'status update: ' || i.status, i.outbound_id, i.status,
               NULLIF(i.error_code, ''), i.correlation_id, i.traceparent
          FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                      $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
               AS i(outbound_id, phone_number_id, recipient_id, status, ts, payload, error_code,
                    correlation_id, traceparent, callback_data, recipient_user_id)
         -- Not about a reply erased by `wa forget` (its recipient's number is in it).
         WHERE NOT EXISTS (SELECT 1 FROM wa_message_tombstones z
                            WHERE z.id_hash = sha256(convert_to(i.outbound_id, 'UTF8')))
         ORDER BY 1
        ON CONFLICT (message_id) DO NOTHING
        RETURNING processed_webhook_messages.message_id
    )
    SELECT stored.message_id FROM stored;

    -- The messages the statuses are about: a reply by its outbound id; a reply whose send was
    -- never recorded (its turn died mid-send) by our callback data, the inbound message's id.
    -- The kind is checked on the rows found, not in the condition: with `kind = 'message'`
    -- there, a generic plan made while the table is small may read the whole partial index on
    -- kind instead (the same estimated cost), and keep doing so (as in 0026). Hence also no
    -- kind in the updates below: every row of v_rows is a message.
    SELECT array_agg(DISTINCT t.id) FILTER (WHERE t.kind = 'message'),
           bool_or(t.kind = 'message' AND t.unrecorded)
      INTO v_rows, v_unrecorded
      FROM (SELECT m.id, m.kind, false AS unrecorded
              FROM unnest($1::text[]) o(outbound_id)
              JOIN processed_webhook_messages m ON m.reply_message_id = o.outbound_id
            UNION ALL
            SELECT m.id, m.kind, m.reply_message_id IS NULL
              FROM unnest($10::text[], $4::text[]) cb(callback_data, status)
              JOIN processed_webhook_messages m ON m.message_id = cb.callback_data
             WHERE cb.callback_data <> '' AND cb.status <> 'failed') t;
    IF cardinality(v_rows) > 1 THEN
        -- In wa_finish_turns' order (above), before either update takes one.
        PERFORM 1 FROM processed_webhook_messages m
           LEFT JOIN webhook_conversations c ON c.id = m.conversation_id
          WHERE m.id = ANY (v_rows)
          ORDER BY c.phone_number_id, c.customer_id, m.conversation_id, m.id
            FOR NO KEY UPDATE OF m;
    END IF;
    IF v_unrecorded THEN
        -- Confirmed by the status webhook that carries our callback data.
        UPDATE processed_webhook_messages m SET reply_message_id = i.outbound_id,
               reply_status = i.status,
               reply_confirmed_by = 'status webhook: ' || i.status, send_started_at = NULL,
               updated_at = now()
          FROM unnest($1::text[], $4::text[], $10::text[]) i(outbound_id, status, callback_data)
         WHERE m.id = ANY (v_rows) AND m.message_id = i.callback_data AND i.callback_data <> ''
           AND m.reply_message_id IS NULL AND i.status <> 'failed';
    END IF;
    IF v_rows IS NOT NULL THEN
        -- The furthest delivery state of each reply (a batch can hold several of one).
        UPDATE processed_webhook_messages m SET reply_status = b.status,
               reply_error_code = COALESCE(NULLIF(b.error_code, ''), m.reply_error_code),
               updated_at = now()
          FROM (SELECT DISTINCT ON (i.outbound_id) i.outbound_id, i.status, i.error_code
                  FROM unnest($1::text[], $4::text[], $7::text[])
                       AS i(outbound_id, status, error_code)
                 ORDER BY i.outbound_id, wa_delivery_rank(i.status) DESC) b
         WHERE m.id = ANY (v_rows) AND m.reply_message_id = b.outbound_id
           AND wa_delivery_rank(m.reply_status) < wa_delivery_rank(b.status);
    END IF;

    -- A part of a long reply (callback data '<message id>#<part>'): its furthest delivery state,
    -- and the confirmation of a send its turn never recorded (never by `failed`). (The array's
    -- text holds a '#' whenever an element does: a test without a statement.) After the
    -- messages, as wa_prune takes a message and then its parts: the other way round, a late
    -- status of a part and a prune pass could each hold what the other waits for.
    IF $10::text LIKE '%#%' THEN
        UPDATE agent_reply_parts p
           SET sent_id = COALESCE(p.sent_id, CASE WHEN s.status <> 'failed' THEN s.outbound_id END),
               send_started_at = CASE WHEN p.sent_id IS NULL AND s.status <> 'failed' THEN NULL
                                      ELSE p.send_started_at END,
               confirmed_by = CASE WHEN p.sent_id IS NULL AND s.status <> 'failed'
                                   THEN 'status webhook: ' || s.status ELSE p.confirmed_by END,
               reply_status = CASE WHEN wa_delivery_rank(s.status) > wa_delivery_rank(p.reply_status)
                                   THEN s.status ELSE p.reply_status END,
               reply_error_code = COALESCE(NULLIF(s.error_code, ''), p.reply_error_code)
          FROM (SELECT DISTINCT ON (i.callback_data)
                       split_part(i.callback_data, '#', 1) AS message_id,
                       split_part(i.callback_data, '#', 2)::integer AS part,
                       i.outbound_id, i.status, i.error_code
                  FROM unnest($1::text[], $4::text[], $7::text[], $10::text[])
                       AS i(outbound_id, status, error_code, callback_data)
                 WHERE i.callback_data ~ '^[^#]+#[0-9]{1,6}$'
                 ORDER BY i.callback_data, i.status = 'failed', wa_delivery_rank(i.status) DESC) s
         WHERE p.message_id = s.message_id AND p.part = s.part;
    END IF;
END
$$;
