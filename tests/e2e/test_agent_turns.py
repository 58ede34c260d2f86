"""A turn always ends, once, within WhatsApp's limits: malformed model answers, a turn that runs
out of time, a reply too long for one message (and a crash between its parts), a delivery Meta
reports `failed`, and the agent type's own model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cli.simulate import status_entry
from tests.conftest import StartSystem
from tests.e2e.test_dlq import wa, wa_json
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel, Recorded, Reply
from tests.support.system import SECRET, System

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


async def send(system: System, text: str, wa_id: str = "15550001111", ts: int = 0) -> str:
    msg = payloads.message(
        "text", wa_id=wa_id, text={"body": text}, timestamp=str(ts or int(time.time()))
    )
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    return str(msg["id"])


async def transitions(system: System, message_id: str) -> list[str]:
    pool = await system.db()
    rows = await pool.fetch(
        "SELECT reason FROM conversation_state_transitions WHERE message_id = $1 ORDER BY id",
        message_id,
    )
    return [r["reason"] for r in rows]


async def takeovers(system: System) -> list[str]:
    """Leases broken and turns resumed: a second turn started while the first may still run."""
    pool = await system.db()
    rows = await pool.fetch(
        "SELECT reason FROM conversation_state_transitions WHERE reason LIKE 'taken over%' "
        "OR reason LIKE 'resumed%'"
    )
    return [r["reason"] for r in rows]


async def wait_for(predicate: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(what or "condition never held")


def completion(message: Any, usage: Any = None) -> Reply:
    body: dict[str, Any] = {"id": "chatcmpl-x", "object": "chat.completion"}
    body["choices"] = [{"index": 0, "finish_reason": "stop", "message": message}]
    body["usage"] = usage
    return 200, body, {}


class MalformedModel(FakeModel):
    """Answers each message by its text: the malformed answers real servers send."""

    ANSWERS: dict[str, Reply] = {
        "nul": completion({"role": "assistant", "content": "hello\x00 there\x00"}),
        "null-usage": completion(
            {"role": "assistant", "content": "usage was null"},
            {"prompt_tokens": None, "completion_tokens": None},
        ),
        "garbage-usage": completion(
            {"role": "assistant", "content": "usage was text"},
            {"prompt_tokens": "many", "completion_tokens": [1]},
        ),
        "content-list": completion(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "joined "},
                    {"type": "text", "text": "parts"},
                ],
            }
        ),
        "no-choices": (200, {"id": "x", "choices": [], "usage": {"prompt_tokens": 1}}, {}),
        "no-text": completion({"role": "assistant", "content": None}),
    }

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def answer(self, rec: Recorded) -> Reply:
        messages = rec.body.get("messages", [])
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        with self.lock:
            self.calls[last] = self.calls.get(last, 0) + 1
        if last in self.ANSWERS:
            return self.ANSWERS[last]
        return super().answer(rec)


async def test_malformed_model_answers_end_replied_or_dead_lettered_with_bounded_calls(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    model = MalformedModel().start()
    try:
        retries, dlq_attempts = 1, 1
        system = await start_system(
            **model.env(
                AGENT_MAX_RETRIES=str(retries),
                DLQ_MAX_ATTEMPTS=str(dlq_attempts),
                DLQ_RETRY_BASE_SECONDS="0.2",
                DLQ_POLL_SECONDS="0.2",
            )
        )
        base = int(time.time())
        texts = [*MalformedModel.ANSWERS, "the next message"]
        ids = {text: await send(system, text, ts=base + n) for n, text in enumerate(texts)}
        repaired = ["nul", "null-usage", "garbage-usage", "content-list", "the next message"]
        await system.wait_status([ids[t] for t in repaired], {"replied"}, timeout=60)
        unusable = ["no-choices", "no-text"]
        pool = await system.db()

        async def dead() -> bool:
            rows = await pool.fetch(
                "SELECT message_id FROM webhook_dlq WHERE status = 'dead' AND message_id = ANY($1)",
                [ids[t] for t in unusable],
            )
            return len(rows) == len(unusable)

        await wait_for(dead, 60, "the unusable answers never reached the DLQ")
        await system.wait_status([ids[t] for t in unusable], {"dead_lettered"})
        await asyncio.sleep(1.0)
        # Each unusable answer: (1 + AGENT_MAX_RETRIES) calls per turn, 1 + DLQ_MAX_ATTEMPTS
        # turns; each repaired one: one call.
        for text in unusable:
            assert model.calls[text] == (1 + retries) * (1 + dlq_attempts), text
        for text in repaired:
            assert model.calls[text] == 1, text
        sent = {r.body["context"]["message_id"]: r.body["text"]["body"] for r in graph.sends}
        assert sent[ids["nul"]] == "hello there"
        assert sent[ids["content-list"]] == "joined parts"
        assert sent[ids["the next message"]] == "echo: the next message"
        assert len(graph.sends) == len(repaired)
        classes = await pool.fetch(
            "SELECT message_id, error_class FROM webhook_dlq ORDER BY message_id"
        )
        assert {r["message_id"]: r["error_class"] for r in classes} == {
            ids["no-choices"]: "ModelBadResponse",
            ids["no-text"]: "EmptyReply",
        }
    finally:
        model.stop()


async def test_a_model_asking_to_wait_longer_than_the_turn_cannot_make_two_turns_of_it(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    # Short timeouts make a short turn deadline (10 s); the model asks for longer than that.
    model.script.append((429, {"error": {"message": "slow down"}}, {"Retry-After": "12"}))
    system = await start_system(
        **model.env(
            AGENT_TIMEOUT_SECONDS="1",
            AGENT_MAX_RETRIES="1",
            WHATSAPP_TIMEOUT_SECONDS="1",
            WHATSAPP_MAX_RETRIES="0",
            WHATSAPP_SEND_CONFIRM_SECONDS="1",
            DLQ_RETRY_BASE_SECONDS="0.5",
            DLQ_POLL_SECONDS="0.2",
        )
    )
    started = time.monotonic()
    message_id = await send(system, "hello")
    await system.wait_status([message_id], {"replied"}, timeout=40)
    reasons = await transitions(system, message_id)
    # The agent gave up by the deadline: the state never had to give up on a running turn.
    assert not [r for r in reasons if "DEADLINE_EXCEEDED" in r or "unavailable" in r], reasons
    assert any("ModelHTTP429" in r for r in reasons), reasons
    # Long enough for a turn that honoured the 12 s to wake up and answer a second time.
    await asyncio.sleep(max(0.0, 14 - (time.monotonic() - started)))
    assert await takeovers(system) == []
    assert len(model.requests) == 2  # the 429, then the answer of the redriven turn
    assert [r.body["context"]["message_id"] for r in graph.sends] == [message_id]


async def test_a_graph_api_slower_than_the_turn_gets_one_send_and_no_second_turn(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    graph.release.clear()  # every send is held until the test lets it go
    system = await start_system(
        STUCK_TIMEOUT_SECONDS="8",
        DLQ_RETRY_BASE_SECONDS="0.5",
        DLQ_POLL_SECONDS="0.2",
    )
    graph.webhook = (f"{system.url}/webhook", SECRET)
    message_id = await send(system, "hello")
    pool = await system.db()

    async def gave_up() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM webhook_dlq WHERE message_id = $1", message_id
        )
        return bool(n)

    # The turn ends by its deadline, its send cut off (maybe with Meta, maybe not)...
    with pytest.raises(TimeoutError):
        await wait_for(gave_up, 3.0)
    await wait_for(gave_up, 20, "the turn never gave up")
    # ... and Meta turns out to have had it: its status webhook confirms it to the next turn.
    graph.release.set()
    await system.wait_status([message_id], {"replied"}, timeout=40)
    await asyncio.sleep(2.0)
    assert await takeovers(system) == []
    assert len(graph.sends) == 1
    reply_id = await pool.fetchval(
        "SELECT reply_message_id FROM processed_webhook_messages WHERE message_id = $1", message_id
    )
    assert reply_id and reply_id.startswith("wamid.OUT")


def long_answer(paragraphs: int = 24) -> str:
    sentences = [
        f"Sentence {p}.{s} explains one more detail of the plan, with numbers {p * s} "
        "and a few words more so that it reads like a model's answer."
        for p in range(paragraphs)
        for s in range(4)
    ]
    text = "\n\n".join(" ".join(sentences[p * 4 : p * 4 + 4]) for p in range(paragraphs))
    assert len(text) > 10_000
    return text


async def test_a_10000_character_answer_reaches_the_customer_whole_in_order(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    text = long_answer()
    model.script.append(completion({"role": "assistant", "content": text}))
    system = await start_system(**model.env())
    message_id = await send(system, "tell me everything")
    await system.wait_status([message_id], {"replied"})
    await asyncio.sleep(0.5)
    assert graph.refused == []
    bodies = [r.body["text"]["body"] for r in graph.sends]
    n = len(bodies)
    assert n >= 3 and all(len(b) <= 4096 for b in bodies)
    assert "".join(" ".join(bodies).split()) == "".join(text.split())
    # Cut at paragraph boundaries: every part ends a paragraph, and is more than half full.
    assert all(b.endswith("model's answer.") and len(b) > 2048 for b in bodies[:-1])
    assert [r.body["biz_opaque_callback_data"] for r in graph.sends] == [
        f"{message_id}#{k}" for k in range(n)
    ]
    # Only the first part quotes the customer's message.
    quoted = [r.body.get("context", {}).get("message_id") for r in graph.sends]
    assert quoted == [message_id, *[None] * (n - 1)]
    pool = await system.db()
    parts = await pool.fetch(
        "SELECT part, sent_id FROM agent_reply_parts WHERE message_id = $1 ORDER BY part",
        message_id,
    )
    assert [p["part"] for p in parts] == list(range(n)) and all(p["sent_id"] for p in parts)
    # The handoff agent trims instead (config/agents.toml).
    model.script.append(completion({"role": "assistant", "content": text}))
    second = await send(system, "let me talk to a human", ts=int(time.time()) + 1)
    await system.wait_status([second], {"replied"})
    last = graph.sends[-1].body
    assert len(graph.sends) == n + 1 and last["context"]["message_id"] == second
    assert len(last["text"]["body"]) <= 4096 and last["text"]["body"].endswith("\u2026")


async def test_a_crash_between_two_parts_neither_repeats_nor_loses_a_part(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    text = long_answer()
    model.script.append(completion({"role": "assistant", "content": text}))
    system = await start_system(**model.env())
    graph.webhook = (f"{system.url}/webhook", SECRET)
    graph.hold_after = 1
    graph.release.clear()  # the first part goes through, the second is held
    message_id = await send(system, "tell me everything")
    assert graph.wait_for(lambda: len(graph.sends) == 2, 20)
    system.kill("agent")
    await asyncio.sleep(0.5)
    graph.release.set()  # Meta had the second part: its status webhook says so
    await system.wait_status([message_id], {"replied"}, timeout=60)
    await asyncio.sleep(1.0)
    assert graph.refused == []
    callbacks = [r.body["biz_opaque_callback_data"] for r in graph.sends]
    assert len(callbacks) >= 3
    assert callbacks == [f"{message_id}#{k}" for k in range(len(callbacks))]
    bodies = [r.body["text"]["body"] for r in graph.sends]
    assert "".join(" ".join(bodies).split()) == "".join(text.split())
    assert len(model.requests) == 1
    pool = await system.db()
    confirmed = await pool.fetchval(
        "SELECT confirmed_by FROM agent_reply_parts WHERE message_id = $1 AND part = 1",
        message_id,
    )
    assert confirmed == "status webhook: sent"


def status_doc(out_id: str, status: str, wa_id: str, callback: str = "", code: int = 0) -> Any:
    entry = status_entry(out_id, status, recipient_id=wa_id, callback_data=callback)
    if code:
        entry["errors"] = [{"code": code, "title": "Message undeliverable"}]
    return payloads.delivery(statuses=[entry])


async def test_a_failed_delivery_is_counted_shown_and_never_confirms_a_send(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    graph.release.clear()
    system = await start_system(WHATSAPP_SEND_CONFIRM_SECONDS="2")
    wa_id = "15550001111"
    message_id = await send(system, "hello", wa_id=wa_id)
    assert graph.wait_for(lambda: len(graph.sends) == 1, 20)
    system.kill("agent")  # the send is in flight: whether the customer has it is unknown
    # Meta reports it could not deliver a message with our callback data: no proof of a send.
    failed = status_doc("wamid.FAILED1", "failed", wa_id, callback=message_id, code=131026)
    assert (await system.post(failed)).status_code == 200
    graph.release.set()
    await system.wait_status([message_id], {"replied"}, timeout=60)
    assert len(graph.sends) == 2
    pool = await system.db()
    reply_id = await pool.fetchval(
        "SELECT reply_message_id FROM processed_webhook_messages WHERE message_id = $1", message_id
    )
    assert reply_id and reply_id.startswith("wamid.OUT")
    # Later Meta cannot deliver that reply either: counted, and shown by wa trace.
    assert (
        await system.post(status_doc(reply_id, "failed", wa_id, code=131026))
    ).status_code == 200

    async def shown() -> bool:
        row = await pool.fetchrow(
            "SELECT reply_status, reply_error_code FROM processed_webhook_messages "
            "WHERE message_id = $1",
            message_id,
        )
        return row is not None and row["reply_status"] == "failed"

    await wait_for(shown, 10)
    stats = await asyncio.to_thread(wa_json, system, "stats", "--hours", "1")
    assert stats["delivery_failed"] == 2  # the reply's and the one of the interrupted send
    traced = await asyncio.to_thread(wa_json, system, "trace", message_id)
    (mine,) = traced["messages"]
    assert (mine["reply_status"], mine["reply_error_code"]) == ("failed", "131026")
    shown_text = (await asyncio.to_thread(wa, system, "trace", message_id)).stdout
    assert "delivery        failed (error 131026)" in shown_text
    assert "not delivered  2" in (await asyncio.to_thread(wa, system, "stats")).stdout
    metrics = await system.http.get(f"http://127.0.0.1:{system.ports['m_state']}/metrics")
    assert "wa_reply_delivery_failed_total 2.0" in metrics.text


async def test_the_agent_types_own_model_wins_over_agent_model(
    start_system: StartSystem, model: FakeModel, tmp_path: Path
) -> None:
    shipped = (ROOT / "config" / "agents.toml").read_text()
    head, bookings = shipped.split("[agents.bookings]\n")
    # The shipped concierge names no model (AGENT_MODEL is its); bookings is given its own.
    config = tmp_path / "agents.toml"
    config.write_text(head + '[agents.bookings]\nmodel = "bookings-model"\n' + bookings)
    system = await start_system(**model.env(AGENT_CONFIG=str(config)))
    first = await send(system, "good evening")
    await system.wait_status([first], {"replied"})
    second = await send(system, "I would like to book a table", ts=int(time.time()) + 1)
    await system.wait_status([second], {"replied"})
    assert [r.body["model"] for r in model.requests] == ["fake-model", "bookings-model"]
