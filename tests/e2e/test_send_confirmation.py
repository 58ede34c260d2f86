"""The crash-mid-send confirmation path on its own: a turn resumed after its driver died
between recording that a send started and recording the sent id waits for the reply's status
webhook (our callback data: the message id) and takes it as the send, or, when none comes
within WHATSAPP_SEND_CONFIRM_SECONDS, sends the stored reply again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import httpx
import pytest

from tests.conftest import StartSystem
from tests.e2e.test_agent_turns import send, status_doc, wait_for
from tests.e2e.test_dlq import wa
from tests.e2e.test_scale import metric
from tests.support.fakes import FakeGraph
from tests.support.system import SECRET, System

pytestmark = pytest.mark.e2e

WA_ID = "15550001111"
WAITING = "a send was in flight when its turn died; waiting for its status webhook"


async def interrupted_send(system: System, graph: FakeGraph) -> tuple[str, str]:
    """A message whose reply is stored and whose send is in flight with no sent id recorded,
    as a driver that died mid-send leaves it; dead-lettered, so that an operator's redrive
    resumes it. Returns (message id, stored reply)."""
    graph.fail_next(graph.error(400, 131026, "Message undeliverable"))
    message_id = await send(system, "hello", wa_id=WA_ID)
    await system.wait_status([message_id], {"dead_lettered"})
    pool = await system.db()
    reply = await pool.fetchval(
        "UPDATE processed_webhook_messages SET send_started_at = now(), reply_error_code = NULL "
        "WHERE message_id = $1 AND reply_message_id IS NULL RETURNING reply_text",
        message_id,
    )
    assert reply
    return message_id, str(reply)


async def redrive(system: System, message_id: str) -> None:
    pool = await system.db()
    item = await pool.fetchval("SELECT id FROM webhook_dlq WHERE message_id = $1", message_id)
    done = await asyncio.to_thread(wa, system, "dlq", "retry", str(item))
    assert done.returncode == 0, done.stderr


def waiting(system: System) -> bool:
    return any(line.get("msg") == WAITING for line in system.log_lines("agent"))


async def test_a_resumed_send_confirmed_by_its_status_webhook_is_not_sent_again(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system(WHATSAPP_SEND_CONFIRM_SECONDS="20")
    message_id, reply = await interrupted_send(system, graph)
    assert len(graph.sends) == 1
    task = asyncio.create_task(redrive(system, message_id))

    async def turn_waits() -> bool:
        return waiting(system)

    await wait_for(turn_waits, 30, "the resumed turn never waited for a status webhook")
    # Meta had the send: its status webhook carries our callback data.
    doc = status_doc("wamid.OUTCONFIRMED", "sent", WA_ID, callback=message_id)
    assert (await system.post(doc)).status_code == 200
    await system.wait_status([message_id], {"replied"}, timeout=30)
    await task
    await asyncio.sleep(0.5)
    assert len(graph.sends) == 1  # the refused first send only: nothing sent again
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_message_id, reply_confirmed_by, send_started_at, reply_text "
        "FROM processed_webhook_messages WHERE message_id = $1",
        message_id,
    )
    assert row is not None
    assert row["reply_message_id"] == "wamid.OUTCONFIRMED"
    assert row["reply_confirmed_by"] == "status webhook: sent"
    assert row["send_started_at"] is None and row["reply_text"] == reply
    reasons = await pool.fetch(
        "SELECT reason FROM conversation_state_transitions WHERE message_id = $1 "
        "AND to_state = 'replied'",
        message_id,
    )
    assert any("confirmed by its status webhook" in r["reason"] for r in reasons), reasons


async def test_a_resumed_send_without_a_status_webhook_is_sent_again_once(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system(WHATSAPP_SEND_CONFIRM_SECONDS="1")
    message_id, reply = await interrupted_send(system, graph)
    started = time.monotonic()
    await redrive(system, message_id)
    await system.wait_status([message_id], {"replied"}, timeout=30)
    assert time.monotonic() - started >= 1.0  # it waited for the confirmation first
    assert waiting(system)
    await asyncio.sleep(0.5)
    sends = graph.sends
    assert len(sends) == 2  # the refused first send, and the one sent again
    again = sends[1].body
    assert again["text"]["body"] == reply
    assert again["biz_opaque_callback_data"] == message_id
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_message_id, reply_confirmed_by FROM processed_webhook_messages "
        "WHERE message_id = $1",
        message_id,
    )
    assert row is not None
    assert row["reply_message_id"].startswith("wamid.OUT") and row["reply_confirmed_by"] is None


async def test_a_reply_sent_after_its_driver_died_is_recorded_once_from_its_status_webhook(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    """The state service and the agent died while the reply's send was in flight, before the
    turn's final transition recorded the reply's id with the replied state (db/migrations/0020)
    and before the agent could record it itself: nothing recorded the send, which Meta had.
    The resumed turn takes the reply's status webhook as the send: exactly one reply reaches
    the Graph API and the message ends replied with that reply's id.

    The resumed turn waits for the status webhook for at most half of what remains of its
    deadline, which STUCK_TIMEOUT_SECONDS bounds: with 5 (a 3 s turn), that was 1.5 s, and on
    a loaded machine the status webhook, refused while the state service was down, came
    later than that (the gateway's channel reconnecting to the restarted state service, the
    webhook's next retry), so the reply was sent again. 40 gives it 16 s."""
    system = await start_system(STUCK_TIMEOUT_SECONDS="40", WHATSAPP_SEND_CONFIRM_SECONDS="30")
    graph.webhook = (f"{system.url}/webhook", SECRET)  # statuses flow back, as from Meta
    graph.release.clear()  # the reply's send waits until both are dead
    message_id = await send(system, "hello", wa_id=WA_ID)
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1, 30)
    system.kill("state")
    system.kill("agent")
    graph.release.set()
    await system.wait_status([message_id], {"replied"}, timeout=90)
    await asyncio.sleep(1.0)
    assert len(graph.sends) == 1
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_message_id, reply_confirmed_by FROM processed_webhook_messages "
        "WHERE message_id = $1",
        message_id,
    )
    assert row is not None
    sent_ids = await pool.fetch(
        "SELECT reply_message_id FROM processed_webhook_messages WHERE kind = 'status'"
    )
    assert [r["reply_message_id"] for r in sent_ids] == [row["reply_message_id"]]
    assert row["reply_message_id"].startswith("wamid.OUT")
    assert row["reply_confirmed_by"] == "status webhook: sent"


@pytest.mark.xfail(
    strict=False,
    reason="known window, not closed: grpc may end the agent's Turns call as if normally after "
    "the state service was killed, and then the agent does not record the sent id (seen in 1 of "
    "~20 runs under load and 1 of 3 fresh-clone CI runs on 2026-12-04; README, issue 16 note)",
)
async def test_a_reply_sent_after_its_driver_died_is_recorded_by_the_agent_and_not_sent_again(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    """As above, but no status webhook ever comes (Meta's retries of the one refused while
    the state service was down may come late): the agent, whose Turns call ended before it
    could answer, records the sent id itself. The resumed turn finds it and sends nothing; it
    never waits for a confirmation. (It sent the reply again after
    WHATSAPP_SEND_CONFIRM_SECONDS: the sent id had been left to the dead state service.)"""
    system = await start_system(STUCK_TIMEOUT_SECONDS="5", WHATSAPP_SEND_CONFIRM_SECONDS="1")
    graph.release.clear()  # the reply's send waits until the state service is dead
    message_id = await send(system, "hello", wa_id=WA_ID)
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1, 30)
    system.kill("state")
    graph.release.set()

    def sent_ids() -> list[str]:
        return [
            line["reply_id"] for line in system.log_lines("agent") if line["msg"] == "reply sent"
        ]

    assert await asyncio.to_thread(graph.wait_for, lambda: bool(sent_ids()), 30)
    await system.wait_status([message_id], {"replied"}, timeout=90)
    await asyncio.sleep(1.5)  # a resumed turn's wait (1 s) and a second send would show
    assert len(graph.sends) == 1
    assert not waiting(system)
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_message_id, reply_confirmed_by FROM processed_webhook_messages "
        "WHERE message_id = $1",
        message_id,
    )
    assert row is not None
    assert sent_ids() == [row["reply_message_id"]] and row["reply_confirmed_by"] is None


async def driving_replica(system: System) -> str:
    """The one state replica driving a conversation, by its own /metrics (a replica may still
    be starting: the system is ready once one answers)."""
    deadline = time.monotonic() + 30
    while True:
        active: dict[str, float] = {}
        for r in system.scale.replicas["state"]:
            with contextlib.suppress(httpx.HTTPError):
                active[r.name] = await metric(r.metrics_port, "wa_active_conversations")
        driving = [name for name, n in active.items() if n == 1]
        if len(active) == len(system.scale.replicas["state"]) and len(driving) == 1:
            return driving[0]
        assert time.monotonic() < deadline, active
        await asyncio.sleep(0.2)


async def test_a_reply_sent_for_a_stalled_state_replica_is_recorded_when_it_wakes(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    """The state replica driving a turn stalls (SIGSTOP: as a long pause or a starved CPU
    would) while the reply's send is in flight; the other replica breaks its lease once its
    heartbeat expires and runs the turn again, which finds the send in flight and waits for a
    confirmation. No status webhook comes. The stalled replica wakes and gets the turn's
    answer; its final transition is refused (a later holder has the conversation), and it
    records the reply's id all the same: the waiting turn takes it as the send, and one reply
    reaches the Graph API. (The id went with the refused transition, and the reply was sent
    again once the wait was over.)"""
    system = await start_system(
        WA_SCALE="state=2", STUCK_TIMEOUT_SECONDS="40", WHATSAPP_SEND_CONFIRM_SECONDS="30"
    )
    graph.release.clear()  # the reply's send waits until its driver is stopped
    message_id = await send(system, "hello", wa_id=WA_ID)
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1, 30)
    holder = await driving_replica(system)
    pid = system.sup.pid(holder)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        graph.release.set()  # sent; the answer waits for the stopped replica to read it

        async def turn_waits() -> bool:
            return waiting(system)

        # The other replica's sweeper (every 10 s) breaks the lease 5 s after the heartbeat.
        await wait_for(turn_waits, 40, "no other replica ran the turn again")
    finally:
        os.kill(pid, signal.SIGCONT)
    await system.wait_status([message_id], {"replied"}, timeout=60)
    await asyncio.sleep(1.0)
    assert len(graph.sends) == 1
    assert any(
        line["msg"] == "recorded the reply of a turn that lost its conversation meanwhile"
        for line in system.log_lines(holder)
    )
    sent = [line["reply_id"] for line in system.log_lines("agent") if line["msg"] == "reply sent"]
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_message_id, reply_confirmed_by FROM processed_webhook_messages "
        "WHERE message_id = $1",
        message_id,
    )
    assert row is not None
    assert sent == [row["reply_message_id"]] and row["reply_confirmed_by"] is None
