"""The seed's views and functions, on a fixture workload with known figures, and their plans on
a large table."""

from __future__ import annotations

import datetime as dt
import re

import asyncpg

from services.agent import turn as agent_turn
from services.state import store as state_store


async def _workload(pool: asyncpg.Pool) -> None:
    await pool.execute("""
        INSERT INTO webhook_conversations (id, phone_number_id, wa_id, status)
        VALUES (1, '100', '1555001', 'idle'), (2, '100', '1555002', 'active'),
               (3, '100', '1555003', 'idle');
        -- conversation 1: 10 replied in i*100 ms, 2 skipped
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, received_at, finished_at)
        SELECT 'r' || i, 'message', 1, '100', '1555001', 'text', now(), '{}', 'replied', 'c',
               now() - interval '10 minutes',
               now() - interval '10 minutes' + i * interval '100 milliseconds'
          FROM generate_series(1, 10) i;
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, status_reason, correlation_id, received_at)
        SELECT 's' || i, 'message', 1, '100', '1555001', 'image', now(), '{}', 'skipped',
               'not answered', 'c', now() - interval '5 minutes'
          FROM generate_series(1, 2) i;
        -- conversation 2: one stuck in processing for 10 minutes, one waiting behind it
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, received_at, started_at)
        VALUES ('p1', 'message', 2, '100', '1555002', 'text', now(), '{}', 'processing', 'c',
                now() - interval '11 minutes', now() - interval '10 minutes'),
               ('p2', 'message', 2, '100', '1555002', 'text', now(), '{}', 'received', 'c',
                now() - interval '9 minutes', NULL);
        -- conversation 3: one dead-lettered, and one message from yesterday
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, received_at, finished_at)
        VALUES ('d1', 'message', 3, '100', '1555003', 'text', now(), '{}', 'dead_lettered',
                'c', now() - interval '20 minutes', now() - interval '19 minutes'),
               ('old', 'message', 3, '100', '1555003', 'text', now(), '{}', 'replied', 'c',
                now() - interval '30 hours', now() - interval '30 hours');
        INSERT INTO webhook_dlq (message_id, conversation_id, error_class, status, attempts,
                                 created_at)
        VALUES ('d1', 3, 'ModelHTTP401', 'dead', 1, now() - interval '19 minutes'),
               ('x1', 3, 'ModelTimeout', 'pending', 2, now() - interval '2 hours'),
               ('x2', 3, 'ModelTimeout', 'resolved', 3, now() - interval '3 hours');
        INSERT INTO agent_sessions (conversation_id, agent_type, turns, tokens_in, tokens_out,
                                    total_latency_ms, errors)
        VALUES (1, 'concierge', 8, 800, 80, 800, 0), (1, 'bookings', 2, 300, 30, 600, 1),
               (3, 'concierge', 0, 0, 0, 0, 1);
    """)


async def test_performance_stats_counts_and_percentiles(pool: asyncpg.Pool) -> None:
    await _workload(pool)
    row = await pool.fetchrow("SELECT * FROM get_webhook_performance_stats(1)")
    assert row is not None
    assert (
        row["total"],
        row["replied"],
        row["skipped"],
        row["dead_lettered"],
        row["in_flight"],
    ) == (15, 10, 2, 1, 2)
    assert float(row["avg_ms"]) == 550.0
    assert 950 <= float(row["p95_ms"]) <= 1000 and 990 <= float(row["p99_ms"]) <= 1000
    day = await pool.fetchrow("SELECT * FROM get_webhook_performance_stats(48)")
    assert day is not None and day["total"] == 16


async def test_views(pool: asyncpg.Pool) -> None:
    await _workload(pool)
    stuck = await pool.fetch("SELECT * FROM stuck_webhook_conversations")
    assert [(r["conversation_id"], r["stuck_messages"], r["in_turn"]) for r in stuck] == [
        (2, 2, True)
    ]
    health = {
        r["conversation_id"]: r
        for r in await pool.fetch("SELECT * FROM webhook_conversation_health")
    }
    assert health[1]["health"] == "healthy" and health[1]["replied"] == 10
    assert health[3]["health"] == "degraded" and health[3]["dead_lettered"] == 1
    agents = {
        r["agent_type"]: r for r in await pool.fetch("SELECT * FROM webhook_agent_performance")
    }
    assert agents["concierge"]["turns"] == 8 and agents["concierge"]["errors"] == 1
    assert float(agents["bookings"]["avg_latency_ms"]) == 300.0
    hours = await pool.fetch("SELECT * FROM webhook_message_processing_metrics")
    assert sum(r["messages"] for r in hours) == 15
    dlq = {r["status"]: r for r in await pool.fetch("SELECT * FROM webhook_dlq_summary")}
    assert dlq["dead"]["items"] == 1 and dlq["pending"]["items"] == 1
    assert dlq["pending"]["oldest_age_seconds"] >= 7200


async def test_system_health_checks(pool: asyncpg.Pool) -> None:
    ok = {
        r["check_name"]: r["status"]
        for r in await pool.fetch("SELECT * FROM check_webhook_system_health()")
    }
    assert set(ok.values()) == {"ok"}
    await _workload(pool)
    checks = {
        r["check_name"]: r for r in await pool.fetch("SELECT * FROM check_webhook_system_health()")
    }
    assert checks["stuck_conversations"]["status"] == "warning"
    assert checks["dlq_pending"]["status"] == "critical"  # older than an hour
    assert checks["dlq_dead"]["status"] == "warning"
    assert checks["error_rate_1h"]["status"] == "warning"  # 1 of 15


async def _nested_plan(pool: asyncpg.Pool, statement: str, query: str, *args: object) -> str:
    """The plan of the statement starting with `statement` that `query` runs inside a
    function, as auto_explain logs it (run, not only explained: a function's statements are
    planned when they run)."""
    return "\n".join(m for m in await _nested_plans(pool, query, *args) if _runs(m, statement))


def _runs(logged: str, statement: str) -> bool:
    return f"Query Text: {statement}" in logged


async def _nested_plans(pool: asyncpg.Pool, query: str, *args: object) -> list[str]:
    """What auto_explain logs while `query` runs: the plan of each statement it runs."""
    logged: list[str] = []

    def log(_conn: object, message: object) -> None:
        logged.append(str(getattr(message, "message", "")))

    async with pool.acquire() as conn:
        conn.add_log_listener(log)
        try:
            await conn.execute(
                "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                " SET auto_explain.log_nested_statements = on; SET client_min_messages = log"
            )
            await conn.fetch(query, *args)
        finally:
            await conn.execute("RESET ALL")
            conn.remove_log_listener(log)
    return logged


async def test_one_hour_window_does_not_scan_every_message(pool: asyncpg.Pool) -> None:
    # A million messages over 90 days.
    await pool.execute(
        """
        INSERT INTO webhook_conversations (id, phone_number_id, wa_id) VALUES (1, '1', '1');
        INSERT INTO processed_webhook_messages
            (message_id, kind, conversation_id, phone_number_id, wa_id, message_type,
             wa_timestamp, payload, status, correlation_id, received_at, finished_at)
        SELECT 'm' || i, 'message', 1, '1', '1', 'text', now(), '{}', 'replied', 'c',
               now() - i * interval '8 seconds', now() - i * interval '8 seconds'
          FROM generate_series(1, 1000000) i;
        ANALYZE processed_webhook_messages;
    """,
        timeout=300,
    )
    for query in (
        "SELECT * FROM get_webhook_performance_stats(1)",
        "SELECT * FROM webhook_message_processing_metrics",
        "SELECT * FROM stuck_webhook_conversations",
        "SELECT * FROM check_webhook_system_health()",
    ):
        plan = "\n".join(r[0] for r in await pool.fetch(f"EXPLAIN {query}"))
        assert "Seq Scan on processed_webhook_messages" not in plan, (query, plan)
    # The per-message and per-sweep queries too.
    for query in (
        "SELECT id FROM processed_webhook_messages WHERE conversation_id = 1 "
        "AND status IN ('received', 'processing') ORDER BY wa_timestamp, id LIMIT 1",
        state_store.Q["failed_not_dead_lettered"].replace("$1", "30").replace("$2", "100"),
        state_store.Q["sweep_candidates"]
        .replace("$1", "30")
        .replace("$2", "120")
        .replace("$3", "100"),
    ):
        plan = "\n".join(r[0] for r in await pool.fetch(f"EXPLAIN {query}"))
        assert "Index" in plan and "Seq Scan" not in plan, (query, plan)
    # A batch of delivery statuses: the replies it is about, by their ids (each array three
    # statuses: $5 the timestamps, $10 our callback data, the inbound message's id, whose
    # replies were never recorded, and a part of a long reply). Its statements run inside
    # wa_ingest_statuses with generic plans (db/migrations/0032, 0033): the plans checked are
    # those, made on this table: the statuses stored, their messages found, locked (two of
    # them), confirmed and updated, and the part updated.
    now = dt.datetime.now(dt.UTC)
    statuses: list[list[object]] = [["wamid.x", "wamid.y", "wamid.z"]] * 11
    statuses[3], statuses[4], statuses[5] = ["sent"] * 3, [now] * 3, ["{}"] * 3
    statuses[9] = ["m500000", "m500001", "m500002#1"]
    plans = await _nested_plans(pool, state_store.Q["ingest_statuses"], *statuses)
    for statement in (
        "WITH stored AS",
        "SELECT array_agg(DISTINCT t.id)",
        "SELECT 1 FROM processed_webhook_messages m",
        "UPDATE processed_webhook_messages m SET reply_message_id",
        "UPDATE processed_webhook_messages m SET reply_status",
    ):
        plan = "\n".join(p for p in plans if _runs(p, statement))
        assert "Index Scan" in plan, (statement, plan)
        assert "Seq Scan on processed_webhook_messages" not in plan, (statement, plan)
    parts = "\n".join(p for p in plans if _runs(p, "UPDATE agent_reply_parts p"))
    assert "agent_reply_parts_pkey" in parts, parts
    # A delivery of a message, inside wa_ingest_messages, generic too.
    message: list[list[object]] = [["1"]] * 16
    message[0], message[5], message[8], message[9] = [["m-new"], [now], ["{}"], ["received"]]
    message[15] = [""]  # no referral
    plan = await _nested_plan(pool, "WITH given AS", state_store.Q["ingest_messages"], *message)
    assert "Index Scan" in plan, plan
    assert "Seq Scan on processed_webhook_messages" not in plan, plan
    # A sent reply recorded with the furthest status seen for it (wa_reply_status_seen,
    # db/migrations/0029): the function inlined, its lookup (alias s), by an index, is in the
    # statement's own plan.
    for q, args in (
        (agent_turn.Q["record_sent"], "'m500000', 'wamid.x', 1, 0"),
        (agent_turn.Q["record_unanswered_sends"], "ARRAY['m500000'], ARRAY['wamid.x']"),
        (state_store.Q["record_stale_send"], "'m500000', 'wamid.x'"),
    ):
        async with pool.acquire() as conn:
            await conn.execute(f"PREPARE record AS {q}")
            rows = await conn.fetch(f"EXPLAIN EXECUTE record({args})")
            await conn.execute("DEALLOCATE record")
        plan = "\n".join(r[0] for r in rows)
        # (EXPLAIN names it s_1 where the statement has an s of its own.)
        assert re.search(r"Index Scan using \S+ on processed_webhook_messages s(_1)? ", plan), (
            q,
            plan,
        )
        assert "Seq Scan on processed_webhook_messages" not in plan, (q, plan)
    # Every turn's state, with the customer's last message time in a conversation of a million
    # (the 24-hour window): from the conversation's row, not the conversation's history.
    turn_state = agent_turn.Q["turn_state"].replace("$1", "'m500000'")
    plan = "\n".join(r[0] for r in await pool.fetch(f"EXPLAIN {turn_state}"))
    assert "webhook_conversations_pkey" in plan and "Seq Scan" not in plan, plan
    assert "processed_messages_customer_last_idx" not in plan, plan


async def test_a_sends_furthest_status_is_read_inline_not_by_a_function_call(
    pool: asyncpg.Pool,
) -> None:
    # wa_reply_status_seen (db/migrations/0029) is written into each statement that calls it:
    # a call of a SQL function that reads a table is planned again at every statement before
    # PostgreSQL 18. track_functions counts the calls that remain calls.
    await _workload(pool)  # r1..r10 replied, p1 and p2 in flight
    await pool.execute(
        "INSERT INTO processed_webhook_messages (message_id, kind, phone_number_id, wa_id,"
        " message_type, wa_timestamp, payload, status, reply_message_id, reply_status,"
        " correlation_id) SELECT 'status:' || r, 'status', '100', '1555001', 'status', now(),"
        " '{}', 'skipped', r, 'delivered', 'c' FROM unnest(ARRAY['wamid.o1', 'wamid.o4']) r"
    )
    statements = [
        (agent_turn.Q["record_sent"], ("p1", "wamid.o1", 2, 0)),
        (agent_turn.Q["record_unanswered_sends"], (["p2"], ["wamid.o2"])),
        (state_store.Q["record_stale_send"], ("r1", "wamid.o3")),
        (
            "SELECT * FROM wa_transition_message($1, 'replied', ARRAY['replied'], 'x', NULL,"
            " 'c', $2)",
            ("r2", "wamid.o4"),
        ),
    ]
    async with pool.acquire() as conn:
        for sql, args in statements:
            async with conn.transaction():
                await conn.execute("SET LOCAL track_functions = 'all'")
                await conn.fetch(sql, *args)
                calls = await conn.fetch("SELECT funcname FROM pg_stat_xact_user_functions")
            called = {r["funcname"] for r in calls}
            assert "wa_reply_status_seen" not in called, (sql, called)
    # The final transition's own call is counted: what is not counted was not called.
    assert called == {"wa_transition_message"}
    rows = await pool.fetch(
        "SELECT message_id, reply_status FROM processed_webhook_messages"
        " WHERE kind = 'message' AND reply_message_id LIKE 'wamid.o%' ORDER BY message_id"
    )
    assert [tuple(r) for r in rows] == [
        ("p1", "delivered"),
        ("p2", "sent"),
        ("r1", "sent"),
        ("r2", "delivered"),
    ]


async def test_stuck_views_and_checks_follow_stuck_timeout_seconds(pool: asyncpg.Pool) -> None:
    await _workload(pool)  # conversation 2 has work in flight since 10 minutes ago

    async def stuck() -> list[int]:
        rows = await pool.fetch("SELECT conversation_id FROM stuck_webhook_conversations")
        return [r["conversation_id"] for r in rows]

    async def health(conversation_id: int) -> str:
        return str(
            await pool.fetchval(
                "SELECT health FROM webhook_conversation_health WHERE conversation_id = $1",
                conversation_id,
            )
        )

    assert await stuck() == [2]  # the default: 120 s
    await state_store.record_stuck_timeout(pool, 3600)  # what the state service does at start
    assert await stuck() == [] and await health(2) == "healthy"
    checks = {
        r["check_name"]: r for r in await pool.fetch("SELECT * FROM check_webhook_system_health()")
    }
    assert checks["stuck_conversations"]["status"] == "ok"
    assert "over 3600 s" in checks["stuck_conversations"]["detail"]
    # An explicit timeout wins over the recorded one.
    given = {
        r["check_name"]: r
        for r in await pool.fetch("SELECT * FROM check_webhook_system_health(300)")
    }
    assert given["stuck_conversations"]["value"] == 1
    await state_store.record_stuck_timeout(pool, 30)
    assert await stuck() == [2]


async def test_stranded_retrying_items_are_counted_by_the_health_check(
    pool: asyncpg.Pool,
) -> None:
    await _workload(pool)
    await pool.execute("""
        -- stranded: retrying for an hour, its message dead-lettered (never handed over)
        UPDATE webhook_dlq SET status = 'retrying', updated_at = now() - interval '1 hour'
         WHERE message_id = 'd1';
        -- not stranded: handed over, its message in a turn right now
        INSERT INTO webhook_dlq (message_id, conversation_id, error_class, status, updated_at)
        VALUES ('p1', 2, 'ModelTimeout', 'retrying', now() - interval '1 hour'),
        -- not stranded: claimed a moment ago
               ('r1', 1, 'ModelTimeout', 'retrying', now());
    """)
    checks = {
        r["check_name"]: r for r in await pool.fetch("SELECT * FROM check_webhook_system_health()")
    }
    assert checks["dlq_retrying_stranded"]["status"] == "warning"
    assert checks["dlq_retrying_stranded"]["value"] == 1


async def test_a_message_that_fails_counts_in_its_conversations_error_count(
    pool: asyncpg.Pool,
) -> None:
    await _workload(pool)
    await state_store.transition(pool, "p1", "failed", "ModelTimeout: slow")
    await state_store.transition(pool, "p1", "dead_lettered", "in the dead-letter queue")
    counts = {
        r["id"]: r["error_count"]
        for r in await pool.fetch("SELECT id, error_count FROM webhook_conversations")
    }
    assert counts == {1: 0, 2: 1, 3: 0}
