"""Quick bursts become one turn (config/agents.toml `debounce_seconds`): messages a customer
sends in a row are answered by one model call and one reply, each still accounted for
(replied with the first, audited, shown by `wa trace`), in order, once, across a crash."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StartSystem
from tests.e2e.test_dlq import wa, wa_json
from tests.support import conversations as cv
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.system import SECRET, System

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# Long enough for three sequential posts to land inside it on a loaded machine.
WINDOW = 3.0


def agents_config(tmp_path: Path, seconds: float) -> str:
    """The shipped agent types, each with `debounce_seconds` (a message may route to any)."""
    shipped = (ROOT / "config" / "agents.toml").read_text()
    config = tmp_path / "agents.toml"
    config.write_text(
        re.sub(r"^(\[agents\.\w+\])$", rf"\1\ndebounce_seconds = {seconds}", shipped, flags=re.M)
    )
    return str(config)


async def send_burst(system: System, texts: list[str], wa_id: str = "15550002222") -> list[str]:
    """Each text its own delivery, as a customer typing them one after another."""
    base = int(time.time())
    ids = []
    for n, text in enumerate(texts):
        msg = payloads.message("text", wa_id=wa_id, text={"body": text}, timestamp=str(base + n))
        assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
        ids.append(str(msg["id"]))
    return ids


async def replied_moves(system: System, message_id: str) -> list[tuple[str, str, str]]:
    pool = await system.db()
    rows = await pool.fetch(
        "SELECT from_state, to_state, reason FROM conversation_state_transitions"
        " WHERE message_id = $1 AND entity = 'message' ORDER BY id",
        message_id,
    )
    return [(r["from_state"] or "", r["to_state"], r["reason"]) for r in rows]


def user_text(body: dict[str, object]) -> str:
    messages = body["messages"]
    assert isinstance(messages, list)
    return str([m for m in messages if m["role"] == "user"][-1]["content"])


async def test_three_messages_within_the_debounce_get_one_model_call_and_one_reply(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph, tmp_path: Path
) -> None:
    system = await start_system(**model.env(AGENT_CONFIG=agents_config(tmp_path, WINDOW)))
    first, second, third = await send_burst(system, ["hi", "I have a question", "about hours"])
    await system.wait_status([first, second, third], {"replied"})
    assert len(model.requests) == 1
    assert user_text(model.requests[0].body) == "hi\nI have a question\nabout hours"
    (reply,) = graph.sends
    # It quotes the newest message; its status webhook names the turn's.
    assert reply.body["context"]["message_id"] == third
    assert reply.body["biz_opaque_callback_data"] == first
    assert graph.wait_for(lambda: [r.body["message_id"] for r in graph.reads] == [third], 10)
    # Each message is accounted for: the first replied by its turn, the others with it.
    first_moves = await replied_moves(system, first)
    assert first_moves[-1][:2] == ("processing", "replied")
    assert "debounced burst of 3 messages" in first_moves[-1][2]
    for absorbed in (second, third):
        assert await replied_moves(system, absorbed) == [
            ("", "received", "ingested"),
            ("received", "replied", f"replied together with {first} (debounced burst)"),
        ]
    traced = await asyncio.to_thread(wa_json, system, "trace", third)
    (mine,) = traced["messages"]
    assert mine["status"] == "replied"
    moves = [
        (t["from"], t["to"], t["reason"]) for t in traced["transitions"] if t["message_id"] == third
    ]
    assert moves[-1] == (
        "received",
        "replied",
        f"replied together with {first} (debounced burst)",
    )
    shown = (await asyncio.to_thread(wa, system, "trace", second)).stdout
    assert f"replied together with {first} (debounced burst)" in shown
    # The context remembers one user message and one answer.
    pool = await system.db()
    context = await pool.fetchval("SELECT c FROM agent_contexts, wa_context(conversation_id) c")
    assert [m["role"] for m in json.loads(context)] == ["user", "assistant"]


async def test_without_a_debounce_three_messages_get_three_replies(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph, tmp_path: Path
) -> None:
    system = await start_system(**model.env(AGENT_CONFIG=agents_config(tmp_path, 0)))
    ids = await send_burst(system, ["hi", "I have a question", "about hours"])
    await system.wait_status(ids, {"replied"})
    assert [user_text(r.body) for r in model.requests] == ["hi", "I have a question", "about hours"]
    assert [r.body["context"]["message_id"] for r in graph.sends] == ids
    for message_id in ids:
        assert (await replied_moves(system, message_id))[-1][:2] == ("processing", "replied")


async def test_a_burst_ends_at_a_message_of_another_kind_and_order_holds(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph, tmp_path: Path
) -> None:
    system = await start_system(**model.env(AGENT_CONFIG=agents_config(tmp_path, WINDOW)))
    wa_id, base = "15550003333", int(time.time())
    msgs = [
        payloads.message("text", wa_id=wa_id, text={"body": "hi"}, timestamp=str(base)),
        payloads.message("text", wa_id=wa_id, text={"body": "look"}, timestamp=str(base + 1)),
        payloads.message("image", wa_id=wa_id, timestamp=str(base + 2)),
        payloads.message("text", wa_id=wa_id, text={"body": "thanks"}, timestamp=str(base + 3)),
    ]
    for msg in msgs:
        assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    ids = [str(m["id"]) for m in msgs]
    await system.wait_status(ids, {"replied"})
    # The image (read from its caption by inbound.py) is its own turn, between the others.
    assert len(model.requests) == 3
    assert user_text(model.requests[0].body) == "hi\nlook"
    assert "a photo" in user_text(model.requests[1].body)
    assert user_text(model.requests[2].body) == "thanks"
    assert [r.body["context"]["message_id"] for r in graph.sends] == ids[1:]
    assert (await replied_moves(system, ids[1]))[-1] == (
        "received",
        "replied",
        f"replied together with {ids[0]} (debounced burst)",
    )


@pytest.fixture
def conv_model() -> Iterator[FakeModel]:
    server = cv.model_for_conversations().start()
    yield server
    server.stop()


async def test_bursts_in_many_conversations_each_message_once_in_order_no_overlap(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel, tmp_path: Path
) -> None:
    conv_model.delay = 0.05
    system = await start_system(**conv_model.env(AGENT_CONFIG=agents_config(tmp_path, 0.5)))
    graph.webhook = (f"{system.url}/webhook", SECRET)
    base = int(time.time())
    conversations, per_conversation = 16, 5
    ids: dict[int, list[str]] = {c: [] for c in range(conversations)}

    async def converse(conv: int) -> None:
        for n in range(per_conversation):
            message_id, doc = cv.message_doc(conv, n, base)
            ids[conv].append(message_id)
            await system.deliver(doc)
            if n == 2:
                # A pause longer than the window: a burst may end here, or not.
                await asyncio.sleep(0.6)

    await asyncio.gather(*(converse(c) for c in range(conversations)))
    every = [m for c in ids.values() for m in c]
    await system.wait_status(every, {"replied"}, timeout=120)
    await asyncio.sleep(1.0)
    pool = await system.db()
    rows = await pool.fetch(
        "SELECT message_id, count(*) FILTER (WHERE to_state = 'replied') AS replied,"
        " bool_or(to_state = 'processing') AS had_turn"
        " FROM conversation_state_transitions WHERE entity = 'message' GROUP BY message_id"
    )
    # Each message left for replied exactly once.
    assert {r["message_id"]: r["replied"] for r in rows} == dict.fromkeys(every, 1)
    turns = {r["message_id"] for r in rows if r["had_turn"]}
    # One reply per turn, none for an absorbed message, sent in order.
    callbacks = [r.body["biz_opaque_callback_data"] for r in graph.sends]
    assert sorted(callbacks) == sorted(turns)
    for conv, mine in ids.items():
        answered = [c for c in callbacks if c in mine]
        assert answered == sorted(answered, key=mine.index), conv
        assert answered[0] == mine[0]
    # The model read every message once, in order, and never two turns of one conversation
    # at the same time.
    read: dict[str, list[int]] = {}
    for r in conv_model.requests:
        for conv, n in cv.TAG.findall(user_text(r.body)):
            read.setdefault(f"c{conv}", []).append(int(n))
    assert read == {f"c{c:03d}": list(range(per_conversation)) for c in range(conversations)}
    assert conv_model.overlaps == []
    assert len(conv_model.requests) == len(turns) < len(every)


async def test_a_crash_after_the_model_answered_a_burst_sends_one_reply(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph, tmp_path: Path
) -> None:
    system = await start_system(**model.env(AGENT_CONFIG=agents_config(tmp_path, WINDOW)))
    graph.webhook = (f"{system.url}/webhook", SECRET)  # statuses flow back, as from Meta
    graph.release.clear()  # the reply's send is held: the model has answered, the turn is saved
    first, second, third = await send_burst(system, ["hi", "are you open", "on sunday?"])
    assert graph.wait_for(lambda: len(graph.sends) == 1, 30)
    system.kill("agent")
    await asyncio.sleep(0.5)
    graph.release.set()  # Meta had the reply: its status webhook says so
    await system.wait_status([first, second, third], {"replied"}, timeout=60)
    await asyncio.sleep(1.0)
    assert len(model.requests) == 1
    assert len(graph.sends) == 1
    assert graph.sends[0].body["context"]["message_id"] == third
    # The turn ran again after the crash (once the agent was back), and answered the same
    # burst from what it had saved.
    assert [m[1] for m in await replied_moves(system, first)].count("processing") >= 2
    for absorbed in (second, third):
        moves = await replied_moves(system, absorbed)
        assert moves[-1] == (
            "received",
            "replied",
            f"replied together with {first} (debounced burst)",
        )
        assert [m[1] for m in moves].count("replied") == 1


async def test_a_burst_that_asks_for_a_person_is_answered_once_then_held(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph, tmp_path: Path
) -> None:
    system = await start_system(**model.env(AGENT_CONFIG=agents_config(tmp_path, WINDOW)))
    ids = await send_burst(system, ["hi", "can I talk to a human", "please"])
    await system.wait_status(ids, {"replied"})
    # The handoff agent answered the three at once; none of them is held for the person.
    assert len(model.requests) == 1 and len(graph.sends) == 1
    pool = await system.db()
    assert await pool.fetchval("SELECT handoff_at IS NOT NULL FROM webhook_conversations")
    (later,) = await send_burst(system, ["hello?"])
    await system.wait_status([later], {"skipped"})
    assert len(model.requests) == 1
