"""The dead-letter queue from outside: automatic redrive with growing delays, `dead`, operator
redrive and purge through the installed `wa` executable, replicas that never double-redrive."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from wa.v1 import dlq_pb2, dlq_pb2_grpc

from common import grpcserver
from devtools import supervisor
from devtools.ports import free_port
from tests.conftest import StartSystem
from tests.support import conversations as cv
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel, model_error
from tests.support.system import System

pytestmark = pytest.mark.e2e
WA = str(Path(sys.executable).parent / "wa")


def wa(system: System, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **system.env}
    env.pop("DATABASE_URL", None)  # the CLI talks to the services, not the database
    return subprocess.run(
        [WA, *args], env=env, capture_output=True, text=True, timeout=60, input=stdin
    )


def wa_json(system: System, *args: str) -> Any:
    done = wa(system, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("condition not met")


async def test_model_down_retried_with_growing_delays_then_dead_then_operator_redrive(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.down = True
    system = await start_system(
        **model.env(
            DLQ_RETRY_BASE_SECONDS="1",
            DLQ_MAX_ATTEMPTS="3",
            AGENT_MAX_RETRIES="1",
            DLQ_POLL_SECONDS="0.2",
            # The breaker never opens: every redrive calls the model and uses an attempt
            # (an open breaker defers them instead: see the outage tests below).
            AGENT_BREAKER_THRESHOLD="100",
        )
    )
    msg = payloads.message("text", text={"body": "are you there?"})
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200

    async def listed() -> list[dict[str, Any]]:
        return await asyncio.to_thread(wa_json, system, "dlq", "list")  # type: ignore[no-any-return]

    pool = await system.db()

    def status_is(status: str) -> Callable[[], Awaitable[bool]]:
        # Waited for in the database: each `wa` call is a Python process started; the CLI
        # is asked once the item got there.
        async def check() -> bool:
            return bool(await pool.fetchval("SELECT status FROM webhook_dlq") == status)

        return check

    await wait_for(status_is("dead"), timeout=60)
    (item,) = await listed()
    assert item["status"] == "dead"
    assert item["message_id"] == msg["id"] and item["attempts"] == 4
    assert item["error_class"] and item["error_message"]
    shown = await asyncio.to_thread(wa_json, system, "dlq", "show", str(item["id"]))
    times = [dt.datetime.fromisoformat(h["at"]) for h in shown["history"]]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3 and gaps[0] < gaps[1] < gaps[2], gaps
    assert gaps[0] >= 0.5 and gaps[2] >= 2.0
    assert shown["payload"]["id"] == msg["id"]
    assert any(t["to"] == "dead_lettered" for t in shown["timeline"])
    assert graph.sends == []
    dead_lines = [
        line
        for line in system.log_lines("dlq")
        if line["level"] == "WARNING" and "dead" in line["msg"]
    ]
    assert dead_lines and dead_lines[-1]["message_id"] == msg["id"]
    metrics_url = f"http://127.0.0.1:{system.ports['m_dlq']}/metrics"

    async def gauges_show_the_dead_item() -> bool:
        # The worker refreshes its gauges every poll: the first poll after the item died.
        text = (await system.http.get(metrics_url)).text
        return 'wa_dlq_items{status="dead"} 1.0' in text

    await wait_for(gauges_show_the_dead_item, timeout=10)
    metrics = await system.http.get(metrics_url)
    assert "wa_dlq_oldest_pending_seconds" in metrics.text
    human = await asyncio.to_thread(wa, system, "dlq", "show", str(item["id"]))
    assert "error history" in human.stdout and msg["id"] in human.stdout

    model.down = False
    done = await asyncio.to_thread(wa, system, "dlq", "retry", "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    await system.wait_status([msg["id"]], {"replied"})

    await wait_for(status_is("resolved"))
    assert [i["status"] for i in await listed()] == ["resolved"]
    await asyncio.sleep(1.5)
    assert [r.body["context"]["message_id"] for r in graph.sends] == [msg["id"]]
    # 1 + 3 automatic turns of 2 calls each, then the operator's redrive.
    assert len(model.requests) == 9


async def test_purge_needs_confirmation_and_purged_items_are_never_redriven(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.script.extend([model_error(401), model_error(401)])
    system = await start_system(**model.env())
    a, b = (payloads.message("text", wa_id=w, text={"body": "hi"}) for w in ("1555001", "1555002"))
    for m in (a, b):
        assert (await system.post(payloads.delivery(messages=[m]))).status_code == 200
    await system.wait_status([a["id"], b["id"]], {"dead_lettered"})
    items = {i["message_id"]: i for i in wa_json(system, "dlq", "list")}
    table = wa(system, "dlq", "list")
    assert "STATUS" in table.stdout and a["id"] in table.stdout

    refused = wa(system, "dlq", "purge", str(items[a["id"]]["id"]), stdin="")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    purged = wa(system, "dlq", "purge", str(items[a["id"]]["id"]), "--yes")
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    remaining = [i["message_id"] for i in wa_json(system, "dlq", "list")]
    assert remaining == [b["id"]]
    assert [i["message_id"] for i in wa_json(system, "dlq", "list", "--status", "purged")] == [
        a["id"]
    ]

    again = wa(system, "dlq", "retry", str(items[a["id"]]["id"]))
    assert again.returncode == 1 and "purged" in again.stdout
    done = wa(system, "dlq", "retry", "--all")
    assert done.returncode == 0
    await system.wait_status([b["id"]], {"replied"})
    await asyncio.sleep(1)
    assert (await system.statuses())[a["id"]] == "dead_lettered"
    assert [r.body["context"]["message_id"] for r in graph.sends] == [b["id"]]


async def test_two_dlq_replicas_never_redrive_the_same_item_twice(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system(DLQ_POLL_SECONDS="0.1", WA_ENHANCED_PROCESSING="false")
    msgs = [payloads.message("text", wa_id=f"1555{i:05d}") for i in range(60)]
    assert (await system.post(payloads.delivery(messages=msgs))).status_code == 200
    pool = await system.db()
    # 60 messages failed and are due for an automatic redrive right now.
    await pool.execute("UPDATE processed_webhook_messages SET status = 'dead_lettered'")
    await pool.execute(
        "INSERT INTO webhook_dlq (message_id, conversation_id, error_class, status, "
        "next_attempt_at) SELECT message_id, conversation_id, 'Test', 'pending', now() "
        "FROM processed_webhook_messages"
    )
    port = free_port()
    env = system.env_for("dlq")
    env["DLQ_GRPC_PORT"] = str(port)
    env["METRICS_PORT"] = str(free_port())
    await system.sup.start(
        supervisor.Spec(
            "dlq2",
            [sys.executable, "-m", "services.dlq"],
            env=env,
            log_file=str(system.root / "dlq2.log"),
        )
    )

    async def all_redriven() -> bool:
        n = await pool.fetchval("SELECT count(*) FROM webhook_dlq WHERE status = 'retrying'")
        return bool(n == 60)

    await wait_for(all_redriven)
    await asyncio.sleep(1)
    counts = await pool.fetch(
        "SELECT message_id, count(*) AS n FROM conversation_state_transitions "
        "WHERE to_state = 'received' AND from_state = 'dead_lettered' GROUP BY message_id"
    )
    assert len(counts) == 60 and {r["n"] for r in counts} == {1}


async def test_a_redrive_does_not_break_the_order_of_waiting_messages(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    model = cv.model_for_conversations().start()
    try:
        model.script.append(model_error(401))
        system = await start_system(**model.env())
        base = int(time.time())
        first, doc = cv.message_doc(5, 0, base)
        assert (await system.post(doc)).status_code == 200
        await system.wait_status([first], {"dead_lettered"})
        model.delay = 0.3
        later = []
        for n in (1, 2, 3):
            message_id, doc = cv.message_doc(5, n, base)
            later.append(message_id)
            assert (await system.post(doc)).status_code == 200
            if n == 1:
                done = await asyncio.to_thread(wa, system, "dlq", "retry", "--all")
                assert done.returncode == 0
        await system.wait_status([first, *later], {"replied"})
        seen = cv.seen_by_model(model)["c005"]
        waiting = [n for n in seen if n in (1, 2, 3)]
        assert waiting == [1, 2, 3]
        assert seen.count(0) == 2  # the failed call and the redriven one
        replies = cv.replies_per_message(graph)
        assert {m: replies[m] for m in [first, *later]} == {m: 1 for m in [first, *later]}
    finally:
        model.stop()


def outage_env(model: FakeModel, **extra: str) -> dict[str, str]:
    """The model's breaker opens at the first failed call and lets a probe through every
    second; a failed turn would use one of two attempts every half second or so."""
    return model.env(
        AGENT_MAX_RETRIES="0",
        AGENT_BREAKER_THRESHOLD="1",
        AGENT_BREAKER_RESET_SECONDS="1",
        DLQ_RETRY_BASE_SECONDS="0.5",
        DLQ_MAX_ATTEMPTS="2",
        DLQ_POLL_SECONDS="0.2",
        **extra,
    )


@pytest.mark.parametrize("n", [1, 3])
async def test_a_model_outage_is_waited_out_without_an_operator_and_without_using_attempts(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph, n: int
) -> None:
    # n = 1: the one item is the breaker's probe every time, and each probe fails.
    model.down = True
    system = await start_system(**outage_env(model))
    msgs = [payloads.message("text", wa_id=f"155500{i:03d}") for i in range(n)]
    for m in msgs:
        assert (await system.post(payloads.delivery(messages=[m]))).status_code == 200
    await system.wait_status([m["id"] for m in msgs], {"dead_lettered"})
    await asyncio.sleep(8)  # over a dozen probes and deferrals: two attempts would be gone
    pool = await system.db()
    during = await pool.fetch("SELECT status, attempts, deferrals FROM webhook_dlq")
    assert len(during) == n and {r["status"] for r in during} <= {"pending", "retrying"}
    assert all(r["attempts"] <= 1 and r["deferrals"] >= 2 for r in during), during

    model.down = False
    await system.wait_status([m["id"] for m in msgs], {"replied"}, timeout=30)
    rows = await pool.fetch("SELECT status, attempts, history FROM webhook_dlq")

    async def resolved() -> bool:
        statuses = await pool.fetch("SELECT status FROM webhook_dlq")
        return {r["status"] for r in statuses} == {"resolved"}

    await wait_for(resolved)
    rows = await pool.fetch("SELECT attempts, history FROM webhook_dlq")
    for r in rows:
        history = json.loads(r["history"])
        assert r["attempts"] <= 1 and any(h.get("deferred") for h in history), history
    replied_to = [s.body["context"]["message_id"] for s in graph.sends]
    assert sorted(replied_to) == sorted(m["id"] for m in msgs)
    item = (await asyncio.to_thread(wa_json, system, "dlq", "list", "--status", "resolved"))[0]
    shown = await asyncio.to_thread(wa, system, "dlq", "show", str(item["id"]))
    assert "deferred, no attempt used" in shown.stdout


async def test_a_model_that_stays_down_still_ends_dead_in_bounded_time(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.down = True
    system = await start_system(**outage_env(model, DLQ_MAX_DEFER_SECONDS="4"))
    msg = payloads.message("text", text={"body": "anyone?"})
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    pool = await system.db()

    async def dead() -> bool:
        return bool(await pool.fetchval("SELECT status = 'dead' FROM webhook_dlq"))

    await wait_for(dead, timeout=30)
    item = await pool.fetchrow("SELECT * FROM webhook_dlq")
    assert item is not None and "stayed unavailable for over 4" in item["error_message"]
    assert item["attempts"] <= 2
    await asyncio.sleep(2)
    assert (await system.statuses())[msg["id"]] == "dead_lettered"
    assert graph.sends == []


async def test_items_stranded_in_retrying_are_recovered_counted_and_redriven(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.script.append(model_error(401))
    system = await start_system(**model.env(DLQ_POLL_SECONDS="0.2"))
    dead, replied = (payloads.message("text", wa_id=w) for w in ("1555111", "1555222"))
    assert (await system.post(payloads.delivery(messages=[dead]))).status_code == 200
    await system.wait_status([dead["id"]], {"dead_lettered"})
    assert (await system.post(payloads.delivery(messages=[replied]))).status_code == 200
    await system.wait_status([replied["id"]], {"replied"})
    # A dlq process claimed the dead one and died before handing it over; the other one's
    # Resolve was lost after its reply. Both sit in `retrying` since an hour ago.
    await system.sup.stop(["dlq"])
    pool = await system.db()
    await pool.execute(
        "UPDATE webhook_dlq SET status = 'retrying', updated_at = now() - interval '1 hour'"
    )
    await pool.execute(
        "INSERT INTO webhook_dlq (message_id, conversation_id, error_class, status, updated_at)"
        " SELECT message_id, conversation_id, 'ModelTimeout', 'retrying',"
        " now() - interval '1 hour' FROM processed_webhook_messages WHERE message_id = $1",
        replied["id"],
    )
    health = await asyncio.to_thread(wa, system, "health", "--json")
    checks = {c["name"]: c for c in json.loads(health.stdout)["checks"]}
    assert checks["dlq_retrying_stranded"]["value"] == 2
    assert checks["dlq_retrying_stranded"]["status"] == "warning"

    await system.start(("dlq",), wait=False)
    await system.wait_status([dead["id"]], {"replied"})

    async def all_resolved() -> bool:
        statuses = await pool.fetch("SELECT status FROM webhook_dlq")
        return [r["status"] for r in statuses] == ["resolved", "resolved"]

    await wait_for(all_resolved)
    item = await pool.fetchrow("SELECT * FROM webhook_dlq WHERE message_id = $1", dead["id"])
    assert item is not None and item["attempts"] == 1  # no attempt used by the recovery
    assert any(h["error_class"] == "RedriveStranded" for h in json.loads(item["history"]))
    assert sorted(s.body["context"]["message_id"] for s in graph.sends) == sorted(
        [dead["id"], replied["id"]]
    )
    metrics = await system.http.get(f"http://127.0.0.1:{system.ports['m_dlq']}/metrics")
    assert 'wa_dlq_recovered_total{result="pending"} 1.0' in metrics.text
    assert 'wa_dlq_recovered_total{result="resolved"} 1.0' in metrics.text
    assert "wa_dlq_stranded_items 0.0" in metrics.text
    recovered = [m for m in system.log_lines("dlq") if "stranded in retrying" in m["msg"]]
    assert {m["message_id"] for m in recovered} == {dead["id"], replied["id"]}
    health = await asyncio.to_thread(wa, system, "health", "--json")
    checks = {c["name"]: c for c in json.loads(health.stdout)["checks"]}
    assert checks["dlq_retrying_stranded"]["status"] == "ok"


async def test_an_operator_retry_past_its_deadline_strands_nothing(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system(WA_ENHANCED_PROCESSING="false")
    msgs = [payloads.message("text", wa_id=f"1557{i:05d}") for i in range(300)]
    assert (await system.post(payloads.delivery(messages=msgs))).status_code == 200
    pool = await system.db()
    await pool.execute("UPDATE processed_webhook_messages SET status = 'dead_lettered'")
    await pool.execute(
        "INSERT INTO webhook_dlq (message_id, conversation_id, error_class, status) "
        "SELECT message_id, conversation_id, 'Test', 'dead' FROM processed_webhook_messages"
    )

    async def stranded() -> int:
        return int(
            await pool.fetchval(
                "SELECT count(*) FROM webhook_dlq d JOIN processed_webhook_messages m "
                "USING (message_id) WHERE d.status = 'retrying' AND m.status = 'dead_lettered'"
            )
        )

    async with grpcserver.channel(
        f"127.0.0.1:{system.ports['dlq']}", transport=system.transport()
    ) as ch:
        stub = dlq_pb2_grpc.DlqStub(ch)
        for deadline in (0.3, 2.0):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Retry(dlq_pb2.RetryRequest(all=True), timeout=deadline)
            await asyncio.sleep(deadline + 1)
            assert await stranded() == 0
    # Without a deadline in the way, `wa dlq retry --all` goes on until every item is handed.
    done = await asyncio.to_thread(wa, system, "dlq", "retry", "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set((await system.statuses()).values()) == {"received"}
    assert await stranded() == 0


async def test_an_item_whose_message_is_gone_is_dead_not_retried_for_ever(
    start_system: StartSystem,
) -> None:
    """The state service answers NOT_FOUND for a message that no longer exists: the item can
    never be redriven. It goes dead with why, for an operator to purge; retried, it would come
    back every few seconds for ever. The other items of the same `wa dlq retry` are tried."""
    system = await start_system(DLQ_POLL_SECONDS="0.2")
    pool = await system.db()
    gone = await pool.fetchval(
        "INSERT INTO webhook_dlq (message_id, error_class, status, next_attempt_at)"
        " VALUES ('wamid.GONE', 'ModelHTTP500', 'dead', NULL) RETURNING id"
    )
    done = await asyncio.to_thread(wa, system, "dlq", "retry", str(gone), "999999")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{gone}: refused: NOT_FOUND" in done.stdout and "999999: unknown" in done.stdout
    row = await pool.fetchrow("SELECT status, next_attempt_at, history FROM webhook_dlq")
    assert row is not None
    assert row["status"] == "dead" and row["next_attempt_at"] is None
    assert json.loads(row["history"])[-1]["error_class"] == "RedriveRefused"
