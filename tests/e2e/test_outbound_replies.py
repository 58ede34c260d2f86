"""What the agent sends, from outside: reply buttons and lists within WhatsApp's limits (from
the agent configuration with the `rules` backend, from a tool call with `openai`), sent once
even when the turn is run again; the 24-hour customer service window (a template or the
dead-letter queue, never the model); read receipts that never fail a turn."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartSystem
from tests.e2e.test_dlq import wa, wa_json
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel, FlakyReadsGraph, model_error, tool_call
from tests.support.system import System

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


async def say(system: System, text: str, wait: set[str] | None = None) -> str:
    msg = payloads.message("text", text={"body": text}, timestamp=str(int(time.time())))
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    await system.wait_status([msg["id"]], wait or {"replied"})
    return str(msg["id"])


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("condition not met")


async def redrive(system: System, message_id: str) -> None:
    pool = await system.db()
    item = await pool.fetchval("SELECT id FROM webhook_dlq WHERE message_id = $1", message_id)
    done = await asyncio.to_thread(wa, system, "dlq", "retry", str(item))
    assert done.returncode == 0, done.stdout + done.stderr


def interactive(graph: FakeGraph) -> list[dict[str, Any]]:
    return [r.body["interactive"] for r in graph.messages if r.body["type"] == "interactive"]


async def test_a_bookings_turn_answers_with_the_configured_list_within_the_limits(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()  # the rules backend, config/agents.toml
    message_id = await say(system, "I would like to book a table for two")
    await asyncio.sleep(0.3)
    (sent,) = graph.messages
    assert sent.body["type"] == "interactive" and graph.refused == []
    inter = sent.body["interactive"]
    assert inter["type"] == "list" and "book" in inter["body"]["text"]
    assert inter["action"]["button"] == "See times"
    rows = [r for s in inter["action"]["sections"] for r in s["rows"]]
    assert [r["id"] for r in rows][:2] == ["slot-today-1900", "slot-today-2100"]
    assert sent.body["context"] == {"message_id": message_id}
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_text, reply_payload, reply_message_id FROM processed_webhook_messages "
        "WHERE message_id = $1",
        message_id,
    )
    assert row is not None and row["reply_message_id"].startswith("wamid.OUT")
    assert json.loads(row["reply_payload"])["kind"] == "list"
    assert "- Tomorrow 13:00" in row["reply_text"]  # what the context remembers was offered
    # An agent type without choices still answers with text.
    await say(system, "and I need a refund for my last invoice")
    assert [m.body["type"] for m in graph.messages] == ["interactive", "text"]


async def test_titles_too_long_for_whatsapp_are_trimmed_before_sending(
    start_system: StartSystem, graph: FakeGraph, tmp_path: Path
) -> None:
    shipped = (ROOT / "config" / "agents.toml").read_text()
    head, rest = shipped.split("[agents.bookings.choices]")
    rest = rest[rest.index("[agents.payments]") :]
    description = "A table by the window, for up to six people, with a view of the old harbour"
    long_choices = f"""[agents.bookings.choices]
kind = "list"
button = "Choose one of our available times"

[[agents.bookings.choices.sections]]
title = "All the times we still have free this week"
rows = [
    {{ id = "a", title = "Thursday evening at seven o'clock", description = "{description}" }},
    {{ id = "b", title = "Friday 20:00" }},
]

"""
    config = tmp_path / "agents.toml"
    config.write_text(head + long_choices + rest)
    system = await start_system(AGENT_CONFIG=str(config))
    await say(system, "book a table please")
    await asyncio.sleep(0.3)
    # Meta would refuse every one of these lengths: not one request was refused.
    assert graph.refused == [] and len(graph.messages) == 1
    (inter,) = interactive(graph)
    (section,) = inter["action"]["sections"]
    first = section["rows"][0]
    assert len(inter["action"]["button"]) <= 20 and inter["action"]["button"].endswith("\u2026")
    assert len(section["title"]) <= 24 and len(first["title"]) <= 24
    assert first["title"].startswith("Thursday") and first["title"].endswith("\u2026")
    assert len(first["description"]) <= 72 and section["rows"][1]["title"] == "Friday 20:00"


async def test_the_openai_tool_call_becomes_buttons_sent_once_and_resent_without_the_model(
    start_system: StartSystem, graph: FakeGraph, model: FakeModel
) -> None:
    model.script.append(
        tool_call(
            "reply_with_buttons",
            {
                "body": "Which time suits you best?",
                "buttons": [
                    {"id": "slot-1900", "title": "19:00"},
                    {"id": "slot-2100", "title": "21:00"},
                    {"id": "slot-other", "title": "Another time, I will tell you"},
                ],
            },
        )
    )
    # The first send is refused for good (undeliverable): the stored buttons are what an
    # operator's redrive sends, without asking the model again.
    graph.fail_next(graph.error(400, 131026, "Message undeliverable"))
    system = await start_system(**model.env())
    message_id = await say(system, "I want to book a table", wait={"dead_lettered"})
    (asked,) = model.requests
    names = [t["function"]["name"] for t in asked.body["tools"]]
    assert names == ["reply_with_buttons", "reply_with_list"]
    assert "slot-today-1900" in asked.body["tools"][1]["function"]["description"]
    await redrive(system, message_id)
    await system.wait_status([message_id], {"replied"})
    await asyncio.sleep(0.3)
    assert len(model.requests) == 1
    first, again = interactive(graph)
    assert first == again and graph.refused == []
    assert first["type"] == "button" and first["body"]["text"] == "Which time suits you best?"
    titles = [b["reply"]["title"] for b in first["action"]["buttons"]]
    assert titles[:2] == ["19:00", "21:00"]
    assert len(titles[2]) <= 20 and titles[2].endswith("\u2026")
    # Read receipt and typing indicator: once, by the run that called the model.
    assert len(graph.reads) == 1
    assert graph.reads[0].body["typing_indicator"] == {"type": "text"}


async def test_an_unusable_tool_call_is_answered_as_text_or_fails_clearly(
    start_system: StartSystem, graph: FakeGraph, model: FakeModel
) -> None:
    model.script.extend(
        [
            tool_call("reply_with_buttons", "{not json", content="We have 19:00 or 21:00."),
            tool_call("reply_with_list", {"body": "", "sections": "none"}),
        ]
    )
    system = await start_system(**model.env(AGENT_MAX_RETRIES="0"))
    await say(system, "book a table")
    (sent,) = graph.messages
    assert sent.body["type"] == "text" and sent.body["text"]["body"] == "We have 19:00 or 21:00."
    failed = await say(system, "book for tomorrow", wait={"dead_lettered"})
    pool = await system.db()
    error = await pool.fetchval("SELECT error_class FROM webhook_dlq WHERE message_id = $1", failed)
    assert error == "ModelBadToolCall"


@pytest.mark.parametrize("window_template", ["", "reengage_customer"])
async def test_a_message_redriven_after_24_hours_never_calls_the_model(
    start_system: StartSystem, graph: FakeGraph, model: FakeModel, window_template: str
) -> None:
    model.script.append(model_error(401, "bad key"))  # not retried: dead at once
    env = model.env()
    if window_template:
        env["WHATSAPP_WINDOW_TEMPLATE"] = window_template
    system = await start_system(**env)
    message_id = await say(system, "hello, are you open?", wait={"dead_lettered"})
    pool = await system.db()
    # A day and an hour pass before an operator redrives it (the message's time and its
    # conversation's last message time with it).
    await pool.execute(
        "UPDATE processed_webhook_messages SET wa_timestamp = wa_timestamp - interval '25 hours';"
        " UPDATE webhook_conversations"
        " SET last_message_at = last_message_at - interval '25 hours'"
    )
    await redrive(system, message_id)
    if window_template:
        await system.wait_status([message_id], {"replied"})
        await asyncio.sleep(0.3)
        (sent,) = graph.messages
        assert sent.body["type"] == "template" and "context" not in sent.body
        assert sent.body["template"] == {"name": window_template, "language": {"code": "en_US"}}
        assert sent.body["biz_opaque_callback_data"] == message_id
        stored = await pool.fetchval(
            "SELECT reply_payload FROM processed_webhook_messages WHERE message_id = $1",
            message_id,
        )
        assert json.loads(stored)["kind"] == "template"
    else:

        async def dead_again() -> bool:
            row = await pool.fetchrow(
                "SELECT status, attempts, error_class FROM webhook_dlq WHERE message_id = $1",
                message_id,
            )
            return bool(row and row["error_class"] == "OutsideCustomerWindow")

        await wait_for(dead_again)
        await system.wait_status([message_id], {"dead_lettered"})
        assert graph.messages == []
        trace = await asyncio.to_thread(wa_json, system, "trace", message_id)
        assert "outside the 24-hour window" in json.dumps(trace)
        assert (await pool.fetchval("SELECT status FROM webhook_dlq")) == "dead"
    assert len(model.requests) == 1  # only the first turn's, before the window closed
    # The read receipt went with the first turn, which called the model; not with the redrive.
    assert graph.wait_for(lambda: len(graph.reads) == 1) and len(graph.reads) == 1


async def test_graph_131047_sends_the_window_template_instead(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    graph.fail_next(graph.error(400, 131047, "Re-engagement message"))
    system = await start_system(
        WHATSAPP_WINDOW_TEMPLATE="hello_again", WHATSAPP_WINDOW_TEMPLATE_LANGUAGE="de"
    )
    await say(system, "hello")
    await asyncio.sleep(0.3)
    first, second = graph.messages
    assert first.body["type"] == "text"
    assert second.body["template"] == {"name": "hello_again", "language": {"code": "de"}}


async def test_a_failing_read_receipt_never_fails_the_turn(
    start_system: StartSystem,
) -> None:
    flaky = FlakyReadsGraph().start()
    try:
        system = await start_system(WHATSAPP_API_BASE_URL=flaky.url)
        await say(system, "hello")
        assert flaky.wait_for(lambda: len(flaky.reads) == 1)
        assert len(flaky.sends) == 1 and len(flaky.reads) == 1
    finally:
        flaky.stop()
