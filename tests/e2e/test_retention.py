"""Retention and erasure on a running system: the state service's background loop prunes old
finished work, `wa prune [--dry-run]` and `wa forget PHONE|BSUID` through the installed
executable, a forgotten message delivered again stays a duplicate, and the agent's stored
context stays bounded however long the conversation."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import asyncpg

from devtools.system import System
from tests.conftest import StartSystem
from tests.e2e.test_dlq import wa, wait_for
from tests.integration.test_retention import TABLES, age
from tests.support import payloads
from tests.support.fakes import FakeGraph

ALL_TABLES = (*TABLES, "wa_erasure_audit", "wa_message_tombstones")


async def say(system: System, text: str, *, wa_id: str | None, user_id: str = "") -> dict[str, Any]:
    msg = payloads.message("text", wa_id=wa_id, user_id=user_id, text={"body": text})
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    await system.wait_status([msg["id"]], {"replied"})
    return msg


async def conversation_of(pool: asyncpg.Pool, message_id: str) -> int:
    conv = await pool.fetchval(
        "SELECT conversation_id FROM processed_webhook_messages WHERE message_id = $1",
        message_id,
    )
    assert conv is not None
    return int(conv)


async def tables_naming(pool: asyncpg.Pool, value: str) -> list[str]:
    """The tables with a row whose text holds `value` anywhere."""
    return [
        t
        for t in ALL_TABLES
        if await pool.fetchval(
            f"SELECT count(*) FROM {t} x WHERE x::text LIKE '%' || $1 || '%'", value
        )
    ]


async def test_the_background_loop_prunes_old_finished_work(
    start_system: StartSystem,
) -> None:
    system = await start_system(RETENTION_INTERVAL_SECONDS="1", RETENTION_BATCH_SIZE="2")
    old = await say(system, "old news", wa_id="15557000001")
    new = await say(system, "fresh news", wa_id="15557000002")
    pool = await system.db()
    old_conv = await conversation_of(pool, old["id"])
    new_conv = await conversation_of(pool, new["id"])
    await age(pool, old_conv, 100)

    def passes() -> list[dict[str, Any]]:
        return [r for r in system.log_lines("state") if r.get("msg") == "prune pass"]

    async def pruned() -> bool:
        # The conversation goes in one of the pass's batches; its audit row, metrics and log
        # line come once the whole pass is done (the log line last).
        return not await pool.fetchval(
            "SELECT count(*) FROM webhook_conversations WHERE id = $1", old_conv
        ) and any(r["deleted"] > 0 for r in passes())

    await wait_for(pruned, timeout=30)
    assert await tables_naming(pool, "15557000001") == []
    assert await tables_naming(pool, "old news") == []
    assert "processed_webhook_messages" in await tables_naming(pool, "fresh news")
    assert await pool.fetchval(
        "SELECT count(*) FROM agent_contexts WHERE conversation_id = $1", new_conv
    )
    audit = await pool.fetchrow(
        "SELECT requested_by, counts FROM wa_erasure_audit WHERE kind = 'prune' ORDER BY id"
    )
    assert audit is not None
    assert audit["requested_by"] == "state"
    assert json.loads(audit["counts"])["processed_webhook_messages"] == 1
    metrics = (await system.http.get(f"http://127.0.0.1:{system.ports['m_state']}/metrics")).text
    assert 'wa_retention_pruned_rows_total{table="processed_webhook_messages"} 1.0' in metrics


async def test_a_pass_reports_names_cleared_apart_from_rows_deleted(
    start_system: StartSystem,
) -> None:
    """An old conversation whose customer stopped marketing messages stays, its name goes: the
    pass's log line and metrics count that name as cleared, not as a row deleted."""
    system = await start_system(RETENTION_INTERVAL_SECONDS="1")
    stopped = await say(system, "no more offers", wa_id="15557000003")
    pool = await system.db()
    conv = await conversation_of(pool, stopped["id"])
    await pool.execute(
        "UPDATE webhook_conversations SET marketing_preference = 'stop' WHERE id = $1", conv
    )
    await age(pool, conv, 100)

    def passes() -> list[dict[str, Any]]:
        return [r for r in system.log_lines("state") if r.get("msg") == "prune pass"]

    async def cleared() -> bool:
        return any(r["cleared"] for r in passes())

    await wait_for(cleared, timeout=30)
    [done] = [r for r in passes() if r["cleared"]]
    assert done["cleared"] == 1
    assert done["counts"]["webhook_conversations.contact_name"] == 1
    assert done["deleted"] == sum(done["counts"].values()) - 1
    # Over every pass: the message went (and its transitions); the conversation and its
    # opt-out stayed.
    deleted: dict[str, int] = {}
    for r in passes():
        for table, n in r["counts"].items():
            deleted[table] = deleted.get(table, 0) + n
    assert deleted["processed_webhook_messages"] >= 1
    assert "webhook_conversations" not in deleted
    assert await pool.fetchval(
        "SELECT contact_name IS NULL FROM webhook_conversations WHERE id = $1", conv
    )
    metrics = (await system.http.get(f"http://127.0.0.1:{system.ports['m_state']}/metrics")).text
    cleared_line = (
        'wa_retention_cleared_values_total{column="webhook_conversations.contact_name"} 1.0'
    )
    assert cleared_line in metrics
    assert 'wa_retention_pruned_rows_total{table="webhook_conversations.contact_name"}' not in (
        metrics
    )


async def test_wa_prune_dry_run_then_prune(start_system: StartSystem) -> None:
    # No background pass within the first minute: what the commands do is theirs alone.
    system = await start_system(RETENTION_INTERVAL_SECONDS="86400")
    old = await say(system, "old news", wa_id="15557000011")
    # A customer who stopped marketing messages: the conversation stays, their name goes.
    stopped = await say(system, "no more offers", wa_id="15557000012")
    pool = await system.db()
    await age(pool, await conversation_of(pool, old["id"]), 100)
    stopped_conv = await conversation_of(pool, stopped["id"])
    await pool.execute(
        "UPDATE webhook_conversations SET marketing_preference = 'stop' WHERE id = $1",
        stopped_conv,
    )
    await age(pool, stopped_conv, 100)
    before = {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in ALL_TABLES}

    dry = await asyncio.to_thread(wa, system, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would be deleted" in dry.stdout
    assert "processed_webhook_messages" in dry.stdout
    assert re.search(r"webhook_conversations\.contact_name +1 would be cleared", dry.stdout)
    assert {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in ALL_TABLES} == before

    done = await asyncio.to_thread(wa, system, "prune", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["counts"]["processed_webhook_messages"] == 2
    assert data["counts"]["webhook_conversations"] == 1
    assert data["counts"]["webhook_conversations.contact_name"] == 1
    # Rows deleted: a name cleared is not one.
    assert data["total"] == sum(
        n for table, n in data["counts"].items() if table != "webhook_conversations.contact_name"
    )
    assert await tables_naming(pool, "15557000011") == []
    assert await tables_naming(pool, "Test Customer") == []
    assert (
        await pool.fetchval("SELECT wa_id FROM webhook_conversations WHERE id = $1", stopped_conv)
        == "15557000012"
    )

    await system.sup.stop(["state"])
    for args in (("prune",), ("forget", "15557000011", "--yes")):
        down = await asyncio.to_thread(wa, system, *args)
        assert down.returncode == 2
        assert len(down.stderr.strip().splitlines()) == 1 and "state" in down.stderr
        assert "Traceback" not in down.stderr


async def test_wa_forget_by_phone_and_by_bsuid_erases_that_customer_only(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    phone, bsuid, other = "15557000021", payloads.bsuid("forget-me"), "15557000023"
    first = await say(system, "my secret address is 1 Main St", wa_id=phone)
    await say(system, "and my card ends 4242", wa_id=phone)
    await say(system, "a customer with a username", wa_id=None, user_id=bsuid)
    kept = await say(system, "someone else entirely", wa_id=other)
    pool = await system.db()
    assert await tables_naming(pool, phone)
    assert await tables_naming(pool, "card ends 4242")

    refused = await asyncio.to_thread(wa, system, "forget", phone)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert await tables_naming(pool, phone)

    done = await asyncio.to_thread(wa, system, "forget", "+1 555-700-0021", "--yes")
    assert done.returncode == 0, done.stderr
    assert f"of {phone}" in done.stdout and "processed_webhook_messages" in done.stdout
    # "card ends 4242", not "4242" alone: the digits turn up by chance in the tombstones'
    # SHA-256 digests (hex) and in timestamps.
    for value in (phone, "1 Main St", "card ends 4242"):
        assert await tables_naming(pool, value) == [], value

    by_bsuid = await asyncio.to_thread(wa, system, "forget", bsuid, "--yes")
    assert by_bsuid.returncode == 0, by_bsuid.stderr
    assert await tables_naming(pool, bsuid) == []
    assert await tables_naming(pool, "a customer with a username") == []
    # Nothing of the other customer went.
    assert (
        await pool.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = $1", kept["id"]
        )
        == "replied"
    )
    assert "agent_context_entries" in await tables_naming(pool, "someone else entirely")

    audits = await pool.fetch("SELECT a::text AS line, a.* FROM wa_erasure_audit a ORDER BY id")
    assert [a["kind"] for a in audits] == ["forget", "forget"]
    # The caller's certificate identity; plaintext gRPC (GRPC_INSECURE) has none.
    assert {a["requested_by"] for a in audits} <= {"operator", "unauthenticated"}
    for a in audits:
        for value in (phone, bsuid, "Main St", "Test Customer", first["id"]):
            assert value not in a["line"]
    assert json.loads(audits[0]["counts"])["processed_webhook_messages"] == 2

    # Meta delivers the forgotten message again: acknowledged, a duplicate, nothing stored
    # again and no second reply.
    sends = len(graph.sends)
    assert (await system.post(payloads.delivery(messages=[first]))).status_code == 200
    assert await tables_naming(pool, phone) == []
    again = await say(system, "someone else again", wa_id=other)
    assert again and len(graph.sends) == sends + 1


async def test_the_stored_context_keeps_only_the_newest_messages(
    start_system: StartSystem,
) -> None:
    system = await start_system(AGENT_CONTEXT_MAX_MESSAGES="4")
    # Questions long enough that each turn fills an entry of its own (db/migrations/0030): the
    # context drops whole entries, and these end at the bound.
    words = " about my order and its delivery" * 12
    for n in range(5):
        last = await say(system, f"question number {n}{words}", wa_id="15557000031")
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT (SELECT c FROM wa_context(a.conversation_id) c) AS messages, a.token_count"
        "  FROM agent_contexts a WHERE a.conversation_id = $1",
        await conversation_of(pool, last["id"]),
    )
    assert row is not None
    messages = json.loads(row["messages"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        f"question number 3{words}",
        f"question number 4{words}",
    ]
    assert row["token_count"] == sum(m["tokens"] for m in messages)
