"""Whatever a customer types and whatever Meta puts in a delivery, over the whole system:
answered 200, every message stored, and every stored message in exactly one terminal state.
Hypothesis draws the input; each test runs its examples against one running system."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import StartSystem
from tests.support import hostile, payloads
from tests.support.fakes import FakeGraph
from tests.support.system import System

pytestmark = pytest.mark.e2e

TERMINAL = ("replied", "skipped", "dead_lettered")
# A turn that fails is redriven soon and dead-lettered after one redrive: a terminal state
# within the test's time whatever happens.
QUICK_DLQ = {"DLQ_RETRY_BASE_SECONDS": "0.2", "DLQ_MAX_ATTEMPTS": "1", "DLQ_POLL_SECONDS": "0.2"}


async def drive(
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], Coroutine[Any, Any, None]],
    examples: int,
    explicit: tuple[Any, ...] = (),
) -> None:
    """Runs `check` on `examples` drawn examples (and `explicit` ones first), in this event
    loop, deterministically; hypothesis itself runs in a thread."""
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def example(value: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(value), loop).result(timeout=60)

    for value in explicit:
        await check(value)
    await asyncio.to_thread(example)


async def post_json(system: System, doc: Any) -> Any:
    """Posts `doc` as a sender may encode it (lone surrogates and NUL as escapes, NaN as NaN)
    and returns the answer, which must be 200."""
    resp = await system.post(json.dumps(doc).encode())
    assert resp.status_code == 200, resp.text
    return resp.json()


async def terminal_once(system: System, message_ids: set[str], timeout: float = 60.0) -> None:
    """Every message reaches a terminal state, and enters one exactly once."""
    await system.wait_status(sorted(message_ids), set(TERMINAL), timeout=timeout)
    pool = await system.db()
    rows = await pool.fetch(
        "SELECT message_id, count(*) AS n FROM conversation_state_transitions"
        " WHERE entity = 'message' AND to_state = ANY($1::text[]) AND message_id = ANY($2)"
        " GROUP BY message_id",
        list(TERMINAL),
        list(message_ids),
    )
    assert {r["message_id"]: r["n"] for r in rows} == dict.fromkeys(message_ids, 1)


async def test_any_text_a_customer_types_is_stored_and_answered_as_text_caption_and_choice(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system(**QUICK_DLQ)
    numbers = itertools.count()
    sent: list[tuple[str, str, list[str]]] = []  # (wa_id, what was typed, message ids)

    async def deliver(typed: str) -> None:
        wa_id = f"1555{next(numbers):07d}"
        messages = [
            payloads.message("text", wa_id=wa_id, text={"body": typed}),
            payloads.message("image", wa_id=wa_id, image={"caption": typed, "id": "m"}),
            payloads.message(
                "interactive",
                wa_id=wa_id,
                interactive={"type": "button_reply", "button_reply": {"id": "b", "title": typed}},
            ),
        ]
        answer = await post_json(system, payloads.delivery(messages=messages, name=typed))
        # A text with nothing in it (WhatsApp sends none) is stored, skipped with its reason.
        text = "received" if hostile.expected_text(typed).strip() else "skipped"
        assert [m["status"] for m in answer["messages"]] == [text, "received", "received"]
        sent.append((wa_id, typed, [m["id"] for m in messages]))

    # A backslash and "u0000" typed (a developer pasting a log line), NUL, a lone surrogate.
    explicit = ("see \\u0000 in the log", "\x00", "half an emoji \ud83d", "\ud83d\ude00")
    await drive(st.text(max_size=200) | st.sampled_from(hostile.NASTY), deliver, 30, explicit)
    blank = {ids[0] for _, typed, ids in sent if not hostile.expected_text(typed).strip()}
    answered = [i for _, _, ids in sent for i in ids if i not in blank]
    await system.wait_status(answered, {"replied"}, timeout=90)
    await system.wait_status(list(blank), {"skipped"}, timeout=10)
    pool = await system.db()
    for wa_id, typed, ids in sent:
        kept = hostile.expected_text(typed)
        rows = await pool.fetch(
            "SELECT message_id, body, payload FROM processed_webhook_messages"
            " WHERE message_id = ANY($1)",
            ids,
        )
        by_id = {r["message_id"]: r for r in rows}
        assert [by_id[i]["body"] for i in ids] == [kept or None] * 3, typed
        text, image, button = (json.loads(by_id[i]["payload"]) for i in ids)
        assert text["text"]["body"] == image["image"]["caption"] == kept, typed
        assert button["interactive"]["button_reply"]["title"] == kept, typed
        name = await pool.fetchval(
            "SELECT contact_name FROM webhook_conversations WHERE wa_id = $1", wa_id
        )
        assert name == (kept or None), typed
    assert {r.body["to"] for r in graph.sends} == {wa_id for wa_id, _, _ in sent}
    # A caption, a button's title: each answered once, whatever was typed.
    assert sorted(r.body["context"]["message_id"] for r in graph.sends) == sorted(answered)


async def test_any_value_in_a_delivery_is_answered_200_and_every_message_ends_once(
    start_system: StartSystem,
) -> None:
    system = await start_system(**QUICK_DLQ)
    stored: set[str] = set()

    async def deliver(doc: dict[str, Any]) -> None:
        answer = await post_json(system, doc)
        messages = doc["entry"][0]["changes"][0]["value"]["messages"]
        results = answer.get("messages", [])  # absent when there is nothing to store
        assert len(results) == len(messages)  # none vanished
        stored.update(m["id"] for m in results)

    await drive(hostile.hostile_deliveries(answerable=True), deliver, 60)
    await terminal_once(system, stored)
    pool = await system.db()
    replied = await pool.fetchval(
        "SELECT count(*) FROM processed_webhook_messages WHERE status = 'replied'"
    )
    assert replied > 0, "the examples included messages that could be answered"


async def test_unusable_messages_are_stored_as_skipped_with_the_reason(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    no_id = payloads.message("text", wa_id="15550004444")
    del no_id["id"]
    no_sender = payloads.message("text")
    del no_sender["from"]
    far_future = payloads.message("text", timestamp="99999999999999999999")
    before_1970 = payloads.message("text", timestamp="-1")
    ok = payloads.message("text", wa_id="15550005555")
    doc = payloads.delivery(messages=[no_id, ok, far_future, before_1970])
    doc["entry"][0]["changes"][0]["value"]["messages"].append(no_sender)
    answer = await post_json(system, doc)
    ids = [m["id"] for m in answer["messages"]]
    assert ids[1:4] == [ok["id"], far_future["id"], before_1970["id"]]
    no_number = payloads.delivery(messages=[payloads.message("text")])
    del no_number["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"]
    ids += [m["id"] for m in (await post_json(system, no_number))["messages"]]
    await system.wait_status([ok["id"]], {"replied"})
    pool = await system.db()
    skipped = await pool.fetch(
        "SELECT message_id, status_reason FROM processed_webhook_messages WHERE status = 'skipped'"
    )
    reasons = {r["message_id"]: r["status_reason"] for r in skipped}
    expected = [
        "message without an id",
        "timestamp is not a time",
        "timestamp is not a time",
        "message without a sender",
        "delivery without metadata.phone_number_id",
    ]
    assert [reasons[i][: len(e)] for i, e in zip(ids[:1] + ids[2:], expected, strict=True)] == (
        expected
    )
    await terminal_once(system, set(ids))
    # Meta's retries: the same messages, recognised as duplicates.
    again = await post_json(system, doc)
    assert [m["id"] for m in again["messages"]] == ids[:5]
    assert all(m["status"] == "duplicate" for m in again["messages"])
    assert await pool.fetchval("SELECT count(*) FROM processed_webhook_messages") == 6
    assert [r.body["to"] for r in graph.sends] == ["15550005555"]


async def test_a_phone_number_id_that_is_not_digits_never_reaches_a_graph_url(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    hostile_doc = payloads.text_delivery("hello", phone_number_id="100/../../v1/me?x=")
    (stored,) = (await post_json(system, hostile_doc))["messages"]
    assert stored["status"] == "skipped"
    control = payloads.text_delivery("hello", wa_id="15550006666")
    (answered,) = (await post_json(system, control))["messages"]
    await system.wait_status([answered["id"]], {"replied"})
    pool = await system.db()
    reason = await pool.fetchval(
        "SELECT status_reason FROM processed_webhook_messages WHERE message_id = $1",
        stored["id"],
    )
    assert reason == "phone_number_id is not a Cloud API id (digits only)"
    assert [r.path for r in graph.requests if "v1/me" in r.path or ".." in r.path] == []
    assert [r.body["to"] for r in graph.sends] == ["15550006666"]


def big_text(size: int) -> str:
    """About `size` bytes of UTF-8 a customer could write."""
    unit = "Ünïcödé 😀 text, "
    return unit * (size // len(unit.encode()))


async def test_deliveries_of_metas_maximum_size_are_stored(start_system: StartSystem) -> None:
    # Ingest only: the point is the acknowledgement, not the turns.
    system = await start_system(WA_ENHANCED_PROCESSING="false")
    text = big_text(3 * 1000 * 1000)
    message = payloads.message("text", text={"body": text})
    resp = await system.post(payloads.delivery(messages=[message]))
    assert resp.status_code == 200, resp.text
    assert len(resp.request.content) > 3_000_000
    pool = await system.db()
    body = await pool.fetchval(
        "SELECT body FROM processed_webhook_messages WHERE message_id = $1", message["id"]
    )
    assert body == text

    # Several at once: group-committed together they would be far over the state service's
    # gRPC message limit.
    captions = big_text(900 * 1000)
    docs = [
        payloads.delivery(
            messages=[
                payloads.message("image", wa_id=f"1555000{n:04d}", image={"caption": captions})
                for _ in range(3)
            ]
        )
        for n in range(8)
    ]
    answers = await asyncio.gather(*(system.post(doc) for doc in docs))
    assert [a.status_code for a in answers] == [200] * 8
    assert await pool.fetchval("SELECT count(*) FROM processed_webhook_messages") == 25
    over = await system.post(b'{"x": "' + b"a" * (4 * 1024 * 1024) + b'"}')
    assert over.status_code == 413
