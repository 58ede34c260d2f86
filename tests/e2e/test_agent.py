"""The agent service from outside: context that survives restarts, the token window, retries,
the circuit breaker, routing, the Graph API's errors and the session figures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.agent import window
from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel, model_error
from tests.support.system import System, readiness

pytestmark = pytest.mark.e2e


async def say(
    system: System,
    text: str,
    wa_id: str = "15550001111",
    ts: int | None = None,
    wait: set[str] | None = None,
) -> str:
    msg = payloads.message(
        "text", wa_id=wa_id, text={"body": text}, timestamp=str(ts or int(time.time()))
    )
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    await system.wait_status([msg["id"]], wait or {"replied"})
    return str(msg["id"])


async def dlq_rows(system: System) -> list[dict[str, Any]]:
    pool = await system.db()
    return [dict(r) for r in await pool.fetch("SELECT * FROM webhook_dlq ORDER BY id")]


async def test_six_turns_send_the_whole_conversation_also_across_a_restart(
    start_system: StartSystem, model: FakeModel
) -> None:
    system = await start_system(**model.env())
    base = int(time.time())
    for n in range(1, 7):
        if n == 4:
            await system.restart("agent")
            await system.wait_ready()
        await say(system, f"turn number {n}", ts=base + n)
    sixth = model.requests[5].body["messages"]
    roles = [m["role"] for m in sixth]
    assert roles == ["system"] + ["user", "assistant"] * 5 + ["user"]
    assert [m["content"] for m in sixth if m["role"] == "user"] == [
        f"turn number {n}" for n in range(1, 7)
    ]
    assert [m["content"] for m in sixth if m["role"] == "assistant"] == [
        f"echo: turn number {n}" for n in range(1, 6)
    ]


async def test_the_token_window_keeps_the_system_prompt_and_the_newest_messages(
    start_system: StartSystem, model: FakeModel
) -> None:
    system = await start_system(**model.env(AGENT_TOKEN_LIMIT="600"))
    base = int(time.time())
    words = "the quick brown fox jumps over a lazy dog near the river bank today".split()
    for n in range(25):
        text = f"message {n}: " + " ".join(words[i % len(words)] for i in range(60))
        await say(system, text, ts=base + n)
    for request in model.requests:
        messages = request.body["messages"]
        used = sum(window.message_tokens(m) for m in messages) + window.REPLY_PRIMING
        assert used <= 600
        assert messages[0]["role"] == "system"
    last = model.requests[-1].body["messages"]
    assert last[-1]["content"].startswith("message 24:")
    kept_users = [int(m["content"].split(":")[0].split()[1]) for m in last if m["role"] == "user"]
    assert kept_users == list(range(25 - len(kept_users), 25)) and 1 < len(kept_users) < 25
    # Dropped history stays in the database.
    pool = await system.db()
    stored = await pool.fetchval("SELECT c FROM agent_contexts, wa_context(conversation_id) c")
    assert len(json.loads(stored)) == 50


async def test_agent_token_limit_widens_the_window_of_the_shipped_agent_types(
    start_system: StartSystem, model: FakeModel
) -> None:
    # The shipped agent types name no token limit of their own: AGENT_TOKEN_LIMIT above the
    # default 4,000 lets a long conversation's whole history reach the model.
    system = await start_system(**model.env(AGENT_TOKEN_LIMIT="20000"))
    base = int(time.time())
    words = "the quick brown fox jumps over a lazy dog near the river bank today".split()
    for n in range(6):
        text = f"message {n}: " + " ".join(words[i % len(words)] for i in range(400))
        await say(system, text, ts=base + n)
    last = model.requests[-1].body["messages"]
    used = sum(window.message_tokens(m) for m in last) + window.REPLY_PRIMING
    assert used > 4000
    kept_users = [int(m["content"].split(":")[0].split()[1]) for m in last if m["role"] == "user"]
    assert kept_users == list(range(6))


async def test_model_500_twice_then_one_reply(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.script.extend([model_error(500), model_error(503)])
    system = await start_system(**model.env())
    message_id = await say(system, "hello there")
    assert len(model.requests) == 3
    assert [r.body["context"]["message_id"] for r in graph.sends] == [message_id]


async def test_model_401_is_not_retried_and_goes_to_the_dlq(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.script.append(model_error(401, "invalid api key"))
    system = await start_system(**model.env())
    message_id = await say(system, "hello there", wait={"dead_lettered"})
    await asyncio.sleep(0.5)
    assert len(model.requests) == 1
    assert graph.sends == []
    (item,) = await dlq_rows(system)
    assert item["message_id"] == message_id
    assert item["error_class"] == "ModelHTTP401" and "invalid api key" in item["error_message"]
    assert item["status"] == "dead" and not item["retryable"]


async def test_the_breaker_opens_fails_fast_and_closes_when_the_model_is_back(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.down = True
    model.delay = 0.6
    system = await start_system(
        **model.env(
            AGENT_MAX_RETRIES="1",
            AGENT_BREAKER_THRESHOLD="4",
            AGENT_BREAKER_RESET_SECONDS="3",
        )
    )
    started = time.monotonic()
    await say(system, "first", wa_id="15550000001", wait={"dead_lettered"})
    await say(system, "second", wa_id="15550000002", wait={"dead_lettered"})
    slow = (time.monotonic() - started) / 2
    calls = len(model.requests)
    assert calls == 4  # two messages, two attempts each: the breaker is open now
    _, ready = await readiness(system, breaker_is("open"))
    agent = next(c for c in ready["components"] if c["name"] == "agent")
    assert agent["breaker"] == "open" and agent["healthy"]

    started = time.monotonic()
    await say(system, "third", wa_id="15550000003", wait={"dead_lettered"})
    fast = time.monotonic() - started
    assert len(model.requests) == calls, "an open breaker does not call the model"
    assert fast < slow / 2, (fast, slow)
    assert (await dlq_rows(system))[-1]["error_class"] == "BreakerOpen"

    model.down = False
    model.delay = 0
    await asyncio.sleep(3.2)
    await say(system, "fourth", wa_id="15550000004")
    _, ready = await readiness(system, breaker_is("closed"))
    agent = next(c for c in ready["components"] if c["name"] == "agent")
    assert agent["breaker"] == "closed"
    assert len(graph.sends) == 1


def breaker_is(state: str) -> Callable[[int, dict[str, Any]], bool]:
    return lambda _, body: any(c.get("breaker") == state for c in body["components"])


async def test_routing_switches_the_agent_type_and_records_it(
    start_system: StartSystem, model: FakeModel
) -> None:
    system = await start_system(**model.env())
    await say(system, "good evening")
    message_id = await say(system, "I would like to book a table for two")
    assert "bookings" in model.requests[-1].body["messages"][0]["content"]
    assert "concierge" in model.requests[0].body["messages"][0]["content"].lower()
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT from_state, to_state, message_id FROM conversation_state_transitions "
        "WHERE entity = 'agent'"
    )
    assert row is not None
    assert dict(row) == {
        "from_state": "concierge",
        "to_state": "bookings",
        "message_id": message_id,
    }
    assert await pool.fetchval("SELECT agent_type FROM agent_contexts") == "bookings"


async def test_graph_500_twice_then_exactly_one_delivered_reply(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    graph.fail_next(graph.error(500, 1, "temporarily down"), graph.error(500, 2, "again"))
    system = await start_system()
    message_id = await say(system, "hello")
    await asyncio.sleep(0.5)
    assert len(graph.sends) == 3
    pool = await system.db()
    reply_id = await pool.fetchval(
        "SELECT reply_message_id FROM processed_webhook_messages WHERE message_id = $1", message_id
    )
    assert reply_id and reply_id.startswith("wamid.OUT")


async def test_graph_131047_is_final_recorded_and_dead_lettered(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    graph.fail_next(graph.error(400, 131047, "Re-engagement message"))
    system = await start_system()
    message_id = await say(system, "hello", wait={"dead_lettered"})
    await asyncio.sleep(0.5)
    assert len(graph.sends) == 1
    pool = await system.db()
    code = await pool.fetchval(
        "SELECT reply_error_code FROM processed_webhook_messages WHERE message_id = $1", message_id
    )
    assert code == "131047"
    (item,) = await dlq_rows(system)
    # The customer service window had closed: without WHATSAPP_WINDOW_TEMPLATE, dead at once.
    assert item["error_class"] == "OutsideCustomerWindow" and item["status"] == "dead"
    assert "outside the 24-hour window" in item["error_message"]


async def test_sessions_add_up_to_what_the_model_served(
    start_system: StartSystem, model: FakeModel
) -> None:
    system = await start_system(**model.env())
    base = int(time.time())
    for n in range(4):
        await say(system, f"question {n}", ts=base + n)
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT sum(turns) AS turns, sum(tokens_in) AS tin, "
        "sum(tokens_out) AS tout, sum(errors) AS errors FROM agent_sessions"
    )
    assert row is not None
    assert row["turns"] == 4 and row["errors"] == 0
    assert row["tin"] == sum(u["prompt_tokens"] for u in model.served)
    assert row["tout"] == sum(u["completion_tokens"] for u in model.served)
