"""Guarantees 2, 3 and 4 under duplicates, concurrency, crashes and switched-off processing,
measured where a customer would see them: at the fake Graph API and the fake model."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from tests.conftest import StartSystem
from tests.e2e.test_agent_turns import transitions, wait_for
from tests.support import conversations as cv
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.system import SECRET, System

pytestmark = pytest.mark.e2e


@pytest.fixture
def conv_model() -> Iterator[FakeModel]:
    server = cv.model_for_conversations().start()
    yield server
    server.stop()


async def test_twelve_deliveries_of_one_message_give_one_reply(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel
) -> None:
    system = await start_system(**conv_model.env())
    message_id, doc = cv.message_doc(1, 0)
    answers = await asyncio.gather(*(system.post(doc) for _ in range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    for _ in range(4):
        assert (await system.post(doc)).status_code == 200
    await system.wait_status([message_id], {"replied"})
    await asyncio.sleep(1.0)
    assert cv.replies_per_message(graph) == {message_id: 1}
    assert len(conv_model.requests) == 1
    pool = await system.db()
    assert await pool.fetchval("SELECT count(*) FROM processed_webhook_messages") == 1


async def test_forty_conversations_in_parallel_one_turn_at_a_time_in_order(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel
) -> None:
    conv_model.delay = 0.05
    system = await start_system(**conv_model.env())
    base = int(time.time())
    ids: list[str] = []

    async def converse(conv: int) -> None:
        for n in range(5):
            message_id, doc = cv.message_doc(conv, n, base)
            ids.append(message_id)
            assert (await system.post(doc)).status_code == 200

    await asyncio.gather(*(converse(c) for c in range(40)))
    await system.wait_status(ids, {"replied"}, timeout=120)
    replies = cv.replies_per_message(graph)
    assert len(ids) == 200 and set(replies) == set(ids) and set(replies.values()) == {1}
    per_customer: dict[str, int] = {}
    for r in graph.sends:
        per_customer[cv.recipient(r.body)] = per_customer.get(cv.recipient(r.body), 0) + 1
    assert sorted(per_customer.values()) == [5] * 40
    # Customers without a phone number are answered at their BSUID, the others at the number.
    assert sum(1 for k in per_customer if k.startswith("US.")) == len(range(1, 40, 3))
    order = cv.seen_by_model(conv_model)
    assert len(order) == 40 and all(seq == [0, 1, 2, 3, 4] for seq in order.values())
    assert conv_model.overlaps == []
    # Conversations ran side by side: the model answered several at once (measured where it
    # answers, not by the clock, which a loaded machine stretches).
    assert conv_model.most_at_once >= 4, conv_model.most_at_once


async def test_messages_of_one_delivery_are_processed_in_timestamp_order(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel
) -> None:
    system = await start_system(**conv_model.env())
    base = int(time.time())
    # Conversation 10: a customer known by BSUID only.
    msgs = [cv.message(10, n, base + n) for n in range(6)]
    random.Random(7).shuffle(msgs)
    assert [int(m["timestamp"]) for m in msgs] != sorted(int(m["timestamp"]) for m in msgs)
    assert (await system.post(payloads.delivery(messages=msgs))).status_code == 200
    await system.wait_status([m["id"] for m in msgs], {"replied"})
    assert cv.seen_by_model(conv_model) == {"c010": [0, 1, 2, 3, 4, 5]}
    by_time = sorted(msgs, key=lambda m: int(m["timestamp"]))
    assert [r.body["context"]["message_id"] for r in graph.sends] == [m["id"] for m in by_time]


async def _burst_with_a_kill(
    system: System, victim: str, conversations: int = 20, per_conversation: int = 3
) -> list[str]:
    base = int(time.time())
    ids: list[str] = []

    async def converse(conv: int) -> None:
        for n in range(per_conversation):
            message_id, doc = cv.message_doc(conv, n, base)
            ids.append(message_id)
            await system.deliver(doc)

    burst = asyncio.gather(*(converse(c) for c in range(conversations)))
    await asyncio.sleep(0.6)
    system.kill(victim)
    await burst
    return ids


@pytest.mark.parametrize("victim", ["state", "agent", "gateway"])
async def test_sigkill_mid_burst_every_acknowledged_message_is_replied_once(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel, victim: str
) -> None:
    conv_model.delay = 0.2
    system = await start_system(**conv_model.env(STUCK_TIMEOUT_SECONDS="10"))
    graph.webhook = (f"{system.url}/webhook", SECRET)  # statuses flow back, as from Meta
    ids = await _burst_with_a_kill(system, victim)
    await system.wait_status(ids, {"replied"}, timeout=120)
    await asyncio.sleep(1.0)
    replies = cv.replies_per_message(graph)
    assert {m: replies[m] for m in ids if replies[m] != 1} == {}
    assert f"{victim}" in system.tail_logs(200)
    order = cv.seen_by_model(conv_model)
    for seq in order.values():
        # A turn cut by the crash may be asked again, but never out of order.
        assert seq == sorted(seq)


async def test_a_state_service_told_to_stop_starts_no_turn_and_its_next_start_answers(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel
) -> None:
    """SIGTERM (scale-in, a deploy): the turn in flight finishes, the message waiting behind it
    is not started, though the server still takes calls for a moment (the gateway's open
    stream); with no other replica to take it, the next start answers it."""
    conv_model.delay = 0.6
    system = await start_system(**conv_model.env())
    base = int(time.time())
    first, doc = cv.message_doc(1, 0, base)
    second, doc_2 = cv.message_doc(1, 1, base)
    assert (await system.post(doc)).status_code == 200
    assert (await system.post(doc_2)).status_code == 200
    assert await asyncio.to_thread(conv_model.wait_for, lambda: len(conv_model.requests) == 1)
    # The first turn ends 0.6 s after it started: well before the server has stopped (it
    # waits for the gateway's calls, opened just now, to end).
    await system.sup.stop(system.replicas("state"), timeout=15)
    assert cv.seen_by_model(conv_model) == {"c001": [0]}
    assert (await system.statuses()) == {first: "replied", second: "received"}
    assert [e for e in system.events if "killing it" in e] == []
    assert any("no other state replica heard" in m["msg"] for m in system.log_lines("state"))

    await system.start(("state",))
    await system.wait_status([second], {"replied"})
    assert cv.seen_by_model(conv_model) == {"c001": [0, 1]}
    assert cv.replies_per_message(graph) == {first: 1, second: 1}


async def _at_least(listed: Callable[[], Awaitable[list[str]]], count: int) -> bool:
    return len(await listed()) >= count


async def _agent_stopped_mid_turn(
    start_system: StartSystem, conv_model: FakeModel, model_seconds: float, drain: str
) -> tuple[System, str]:
    """A system whose agent got SIGTERM while the model answered one message's turn; after
    the agent has stopped, on its own or not."""
    conv_model.delay = model_seconds
    system = await start_system(**conv_model.env(AGENT_DRAIN_SECONDS=drain))
    message, doc = cv.message_doc(1, 0, int(time.time()))
    assert (await system.post(doc)).status_code == 200
    assert await asyncio.to_thread(conv_model.wait_for, lambda: len(conv_model.requests) == 1)
    await system.sup.stop(system.replicas("agent"), timeout=30)
    return system, message


async def test_an_agent_told_to_stop_finishes_its_slow_turn_and_answers_it(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel
) -> None:
    """SIGTERM to an agent (scale-in, a deploy) while a model takes 6 s, longer than any
    service's default gRPC grace: the turn runs to its end within AGENT_DRAIN_SECONDS and its
    answer reaches the state service, so the model is asked once; nothing waits for a
    restart."""
    system, message = await _agent_stopped_mid_turn(start_system, conv_model, 6.0, "20")
    await system.wait_status([message], {"replied"}, timeout=10)
    assert [e for e in system.events if "killing it" in e] == []
    assert cv.replies_per_message(graph) == {message: 1}
    assert not any("cutting off" in m["msg"] for m in system.log_lines("agent"))

    await system.start(("agent",))
    await asyncio.sleep(1.0)  # a turn asked again would reach the model by now
    assert cv.seen_by_model(conv_model) == {"c001": [0]}


async def test_an_agent_whose_drain_ends_cuts_its_turn_off_and_it_is_asked_again(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel
) -> None:
    """A turn longer than the agent's drain is cut off when the drain ends, in the open (the
    agent says which messages' turns); the process stops on its own, and the turn is asked
    again and answered once. Meanwhile the state service finds no agent, and says so in the
    message's history in one line an operator can read (`wa trace`)."""
    system, message = await _agent_stopped_mid_turn(start_system, conv_model, 4.0, "1")
    assert [e for e in system.events if "killing it" in e] == []
    cut = [m for m in system.log_lines("agent") if m["msg"].startswith("cutting off")]
    assert [m["message_ids"] for m in cut] == [[message]]

    async def reasons() -> list[str]:
        return [r for r in await transitions(system, message) if r and r.startswith("agent ")]

    # The cut call's, then attempts on no agent at all.
    await wait_for(lambda: _at_least(reasons, 3), what="three attempts on no agent")
    conv_model.delay = 0.0
    await system.start(("agent",))
    await system.wait_status([message], {"replied"}, timeout=60)
    assert cv.seen_by_model(conv_model) == {"c001": [0, 0]}
    assert cv.replies_per_message(graph) == {message: 1}
    said = await reasons()
    assert all(r.startswith("agent unavailable: UNAVAILABLE: ") for r in said), said
    assert [r for r in said if "\n" in r or "debug_error_string" in r] == []


async def test_processing_switched_off_acknowledges_only_and_resumes_in_order(
    start_system: StartSystem, graph: FakeGraph, conv_model: FakeModel
) -> None:
    system = await start_system(**conv_model.env(WA_ENHANCED_PROCESSING="false"))
    base = int(time.time())
    docs = [cv.message_doc(c, n, base) for c in range(3) for n in range(3)]
    for _, doc in docs:
        assert (await system.post(doc)).status_code == 200
    await asyncio.sleep(1.5)
    assert set((await system.statuses()).values()) == {"received"}
    assert graph.sends == [] and conv_model.requests == []

    await system.restart("state", WA_ENHANCED_PROCESSING="true")
    await system.wait_status([m for m, _ in docs], {"replied"})
    assert cv.seen_by_model(conv_model) == {f"c{c:03d}": [0, 1, 2] for c in range(3)}
    assert set(cv.replies_per_message(graph).values()) == {1}


async def test_a_redrive_of_a_message_that_did_not_fail_is_refused_over_grpc(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    """A redrive never causes a turn for a message that is not failed or dead-lettered, and an
    unknown message is NOT_FOUND. (Refused transitions are audited: test_state_store.)"""
    import grpc
    from wa.v1 import common_pb2, state_pb2, state_pb2_grpc

    from common import grpcserver

    system = await start_system()
    doc = payloads.delivery(messages=[payloads.message("reaction")])
    message_id = doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    assert (await system.post(doc)).status_code == 200
    target = f"127.0.0.1:{system.ports['state']}"
    # Redrive is the dlq service's call; the timeline the operator's.
    async with (
        grpcserver.channel(target, transport=system.transport("dlq")) as ch,
        grpcserver.channel(target, transport=system.transport("operator")) as operator,
    ):
        stub = state_pb2_grpc.StateStub(ch)
        refused = await stub.Redrive(
            state_pb2.RedriveRequest(message_id=message_id, reason="operator mistake"), timeout=5
        )
        assert not refused.accepted
        assert refused.status == common_pb2.MESSAGE_STATUS_SKIPPED
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Redrive(state_pb2.RedriveRequest(message_id="wamid.NOPE"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        timeline = await state_pb2_grpc.StateStub(operator).GetTimeline(
            state_pb2.GetTimelineRequest(message_id=message_id), timeout=5
        )
    assert [m.status for m in timeline.messages] == [common_pb2.MESSAGE_STATUS_SKIPPED]
    moves = [(t.from_state, t.to_state) for t in timeline.transitions if t.message_id == message_id]
    assert moves == [("", "skipped")]
