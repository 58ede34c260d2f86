"""Customers with a WhatsApp username: no phone number in the webhook, only a business-scoped
user id (BSUID). Answered like everyone, at their BSUID, in one conversation over time."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.system import SECRET, System

pytestmark = pytest.mark.e2e


async def say(
    system: System,
    text: str,
    *,
    wa_id: str | None,
    user_id: str = "",
    username: str = "",
    wait: set[str] | None = None,
) -> str:
    msg = payloads.message("text", wa_id=wa_id, user_id=user_id, text={"body": text})
    usernames = {user_id: username} if username else None
    resp = await system.post(payloads.delivery(messages=[msg], usernames=usernames))
    assert resp.status_code == 200, resp.text
    await system.wait_status([msg["id"]], wait or {"replied"})
    return str(msg["id"])


async def test_a_customer_without_a_phone_number_is_answered_once_at_its_bsuid(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    user = payloads.bsuid("username-customer")
    message_id = await say(system, "hello, is my order ready?", wa_id=None, user_id=user,
                           username="@maria.lopez")  # fmt: skip
    (send,) = graph.sends
    assert send.body["recipient"] == user and "to" not in send.body
    assert send.body["recipient_type"] == "individual"
    assert send.body["context"] == {"message_id": message_id}
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT c.customer_id, c.wa_id, c.username, m.user_id FROM webhook_conversations c"
        " JOIN processed_webhook_messages m ON m.conversation_id = c.id WHERE m.message_id = $1",
        message_id,
    )
    assert row is not None and dict(row) == {
        "customer_id": user,
        "wa_id": None,
        "username": "maria.lopez",
        "user_id": user,
    }
    replied = [line for line in system.log_lines("state") if line["msg"] == "message replied"]
    assert replied and replied[-1]["username"] == "@maria.lopez"


async def test_a_customer_who_hides_its_number_keeps_its_conversation_and_context(
    start_system: StartSystem, graph: FakeGraph, model: FakeModel
) -> None:
    system = await start_system(**model.env())
    phone, user = "15550004444", payloads.bsuid("hides-number")
    await say(system, "first, by phone only", wa_id=phone)
    await say(system, "second, phone and bsuid", wa_id=phone, user_id=user)
    await say(system, "third, bsuid only", wa_id=None, user_id=user, username="ann")
    third = model.requests[-1].body["messages"]
    assert [m["content"] for m in third if m["role"] == "user"] == [
        "first, by phone only",
        "second, phone and bsuid",
        "third, bsuid only",
    ]
    # Meta keeps the phone number in webhooks for 30 days after we last wrote to it, and
    # prefers it as the recipient: the number known from before is used.
    assert [s.body.get("to") for s in graph.sends] == [phone] * 3
    pool = await system.db()
    assert await pool.fetchval("SELECT count(*) FROM webhook_conversations") == 1


async def test_a_status_that_names_only_the_bsuid_finds_its_reply(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    user = payloads.bsuid("status-only-bsuid")
    message_id = await say(system, "hi", wa_id=None, user_id=user)
    pool = await system.db()
    reply_id = await pool.fetchval(
        "SELECT reply_message_id FROM processed_webhook_messages WHERE message_id = $1",
        message_id,
    )
    assert reply_id
    read = payloads.status(reply_id, "read", recipient_user_id=user)
    del read["recipient_id"]
    doc = payloads.delivery(statuses=[read])
    doc["entry"][0]["changes"][0]["value"]["contacts"] = [
        {"profile": {"name": "Ann", "username": "@ann"}, "user_id": user}
    ]
    assert (await system.post(doc)).status_code == 200
    row = await pool.fetchrow(
        "SELECT reply_status FROM processed_webhook_messages WHERE message_id = $1", message_id
    )
    assert row is not None and row["reply_status"] == "read"
    status_row = await pool.fetchrow(
        "SELECT s.conversation_id = m.conversation_id AS same, s.user_id"
        "  FROM processed_webhook_messages s, processed_webhook_messages m"
        " WHERE s.kind = 'status' AND s.reply_status = 'read' AND m.message_id = $1",
        message_id,
    )
    assert status_row is not None and status_row["same"] and status_row["user_id"] == user


async def test_a_bsuid_refused_as_recipient_is_a_recorded_failure_never_retried(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    graph.fail_next(
        graph.error(
            400,
            131062,
            "Business-scoped User ID (BSUID) recipients are not supported for this message.",
        )
    )
    user = payloads.bsuid("refused")
    message_id = await say(
        system, "send me a code", wa_id=None, user_id=user, wait={"dead_lettered"}
    )
    assert len(graph.sends) == 1
    pool = await system.db()
    item = await pool.fetchrow(
        "SELECT status, retryable, error_class FROM webhook_dlq WHERE message_id = $1", message_id
    )
    assert item is not None
    assert dict(item) == {"status": "dead", "retryable": False, "error_class": "GraphError131062"}


async def test_operators_find_a_customer_by_bsuid_or_username(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    user = payloads.bsuid("findable")
    message_id = await say(system, "hello", wa_id=None, user_id=user, username="@find.me")
    for target in (user, "@find.me", "find.me", "FIND.ME"):
        out = await _wa(system, "trace", target, "--json")
        assert [m["message_id"] for m in out["messages"]] == [message_id], target


async def _wa(system: System, *args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        env={**system.env, "WHATSAPP_APP_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    return json.loads(stdout)


async def test_wa_simulate_sends_a_username_customers_delivery(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    gateway = f"{system.url}/webhook"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "simulate",
        "hello from a username",
        "--username",
        "@sim.user",
        "--url",
        gateway,
        env={**system.env, "WHATSAPP_APP_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stdout.decode() + stderr.decode()
    (send,) = graph.sends
    assert "to" not in send.body and send.body["recipient"].startswith("US.")
    pool = await system.db()
    assert await pool.fetchval("SELECT username FROM webhook_conversations") == "sim.user"


async def test_wa_dlq_lists_a_customers_items_by_username_and_shows_it(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    graph.fail_next(graph.error(400, 131062, "not supported"))
    user = payloads.bsuid("dlq-customer")
    message_id = await say(
        system, "code please", wa_id=None, user_id=user, username="@dlq.c", wait={"dead_lettered"}
    )
    await say(system, "someone else", wa_id="15550007777")
    for target in ("@dlq.c", user):
        rows = await _wa(system, "dlq", "list", "--customer", target, "--json")
        assert [(r["message_id"], r["username"], r["user_id"]) for r in rows] == [
            (message_id, "@dlq.c", user)
        ], target
    assert await _wa(system, "dlq", "list", "--customer", "15550007777", "--json") == []
