"""The dead-letter queue's SQL: which failures use an attempt, how long an outage is waited
out, and which stranded `retrying` items are recovered."""

from __future__ import annotations

from typing import Any

import asyncpg

from services.dlq import store


async def _messages(pool: asyncpg.Pool, statuses: dict[str, str]) -> None:
    await pool.execute(
        "INSERT INTO webhook_conversations (id, phone_number_id, wa_id) VALUES (1, '100', '1')"
    )
    for message_id, status in statuses.items():
        await pool.execute(
            "INSERT INTO processed_webhook_messages (message_id, kind, conversation_id, "
            "phone_number_id, wa_id, message_type, wa_timestamp, payload, status, "
            "correlation_id) VALUES ($1, 'message', 1, '100', '1', 'text', now(), '{}', $2, 'c')",
            message_id,
            status,
        )


async def _fail(
    pool: asyncpg.Pool, message_id: str, error_class: str, *, max_defer: float = 600
) -> Any:
    return await store.enqueue(
        pool,
        message_id=message_id,
        conversation_id=1,
        error_class=error_class,
        error_message="x",
        retryable=True,
        correlation_id="c",
        max_attempts=2,
        base_seconds=10,
        max_defer_seconds=max_defer,
    )


async def test_breaker_open_and_a_failed_probe_use_no_attempt(pool: asyncpg.Pool) -> None:
    await _messages(pool, {"m1": "dead_lettered"})
    first = await _fail(pool, "m1", "BreakerOpen")
    assert (first["attempts"], first["deferrals"], first["status"]) == (0, 1, "pending")
    second = await _fail(pool, "m1", "ModelHTTP503")
    assert (second["attempts"], second["status"]) == (1, "pending")
    # The worker lets it through a half-open breaker as the probe, and the probe fails.
    await pool.execute("UPDATE webhook_dlq SET next_attempt_at = now()")
    probe = await store.claim_probe(pool, 60)
    assert probe is not None and probe.id == first["id"]
    assert await store.claim_probe(pool, 60) is None  # one probe at a time
    after = await _fail(pool, "m1", "ModelHTTP503")
    assert (after["attempts"], after["deferrals"], after["status"]) == (1, 2, "pending")
    assert after["next_attempt_at"] is not None and not after["probe"]
    # Not a probe any more: a model failure counts again, and the second one is the last.
    last = await _fail(pool, "m1", "ModelHTTP503")
    assert (last["attempts"], last["status"]) == (2, "pending")
    assert (await _fail(pool, "m1", "ModelHTTP503"))["status"] == "dead"


async def test_an_outage_longer_than_the_bound_ends_dead(pool: asyncpg.Pool) -> None:
    await _messages(pool, {"m1": "dead_lettered", "m2": "dead_lettered"})
    await _fail(pool, "m1", "BreakerOpen", max_defer=60)
    await pool.execute("UPDATE webhook_dlq SET deferred_since = now() - interval '2 minutes'")
    dead = await _fail(pool, "m1", "BreakerOpen", max_defer=60)
    assert dead["status"] == "dead" and "stayed unavailable" in dead["error_message"]
    # The worker's own deferral (breaker open when an item is due) has the same bound.
    await _fail(pool, "m2", "ModelTimeout")
    await pool.execute("UPDATE webhook_dlq SET next_attempt_at = now() WHERE message_id = 'm2'")
    (deferred,) = await store.defer_due(pool, 10, 10, 60)
    assert (deferred["status"], deferred["deferrals"]) == ("pending", 1)
    await pool.execute(
        "UPDATE webhook_dlq SET next_attempt_at = now(), "
        "deferred_since = now() - interval '2 minutes' WHERE message_id = 'm2'"
    )
    (ended,) = await store.defer_due(pool, 10, 10, 60)
    assert ended["status"] == "dead"


async def test_only_stranded_retrying_items_are_recovered(pool: asyncpg.Pool) -> None:
    statuses = {"dead": "dead_lettered", "done": "replied", "busy": "processing"}
    await _messages(pool, {**statuses, "fresh": "dead_lettered"})
    for message_id in ("dead", "done", "busy", "fresh"):
        await _fail(pool, message_id, "ModelTimeout")
    await pool.execute(
        "UPDATE webhook_dlq SET status = 'retrying', updated_at = CASE WHEN message_id = 'fresh' "
        "THEN now() ELSE now() - interval '10 minutes' END"
    )
    gauges = {r["status"]: r["n"] for r in await store.gauges(pool, 120)}
    assert gauges["stranded"] == 2 and gauges["retrying"] == 4
    recovered = {r["message_id"]: r["status"] for r in await store.recover_retrying(pool, 120, 10)}
    assert recovered == {"dead": "pending", "done": "resolved"}
    rows = {
        r["message_id"]: r
        for r in await pool.fetch("SELECT message_id, status, attempts FROM webhook_dlq")
    }
    assert rows["busy"]["status"] == rows["fresh"]["status"] == "retrying"
    assert rows["dead"]["attempts"] == 1
    assert await store.claim_due(pool) is not None  # due now
    assert await store.recover_retrying(pool, 120, 10) == []
