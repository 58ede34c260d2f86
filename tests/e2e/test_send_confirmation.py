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

import asyncpg
import httpx
import pytest

from services.state import turn_calls
from tests.conftest import StartSystem
from tests.e2e.test_agent_turns import send, status_doc, wait_for
from tests.e2e.test_dlq import wa
from tests.support.fakes import FakeGraph
from tests.support.metrics import metric
from tests.support.system import SECRET, System

pytestmark = pytest.mark.e2e

WA_ID = "15550001111"
WAITING = "a send was in flight when its turn died; waiting for its status webhook"
RECORDED = "recorded replies sent that their caller had not recorded"


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


def sent_ids(system: System, message_id: str) -> list[str]:
    """The replies the agent says it sent for the message's turns."""
    return [
        line["reply_id"]
        for line in system.log_lines("agent")
        if line["msg"] == "reply sent" and line.get("message_id") == message_id
    ]


async def recorded_reply(system: System, message_id: str) -> asyncpg.Record:
    """The message's recorded reply id and what confirmed it (none: its sender's record)."""
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_message_id, reply_confirmed_by FROM processed_webhook_messages "
        "WHERE message_id = $1",
        message_id,
    )
    assert row is not None
    return row


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
    row = await recorded_reply(system, message_id)
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
    row = await recorded_reply(system, message_id)
    pool = await system.db()
    statuses = await pool.fetch(
        "SELECT reply_message_id FROM processed_webhook_messages WHERE kind = 'status'"
    )
    assert [r["reply_message_id"] for r in statuses] == [row["reply_message_id"]]
    assert row["reply_message_id"].startswith("wamid.OUT")
    assert row["reply_confirmed_by"] == "status webhook: sent"


async def test_a_reply_sent_after_its_driver_died_is_recorded_by_the_agent_and_not_sent_again(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    """As above, but no status webhook ever comes (Meta's retries of the one refused while
    the state service was down may come late): the agent, whose Turns call ended before it
    could answer, records the sent id itself; or, when gRPC ended the call as if normally (the
    answer written into the dying connection), once it looks again after the call's end. The
    resumed turn finds it and sends nothing; it never waits for a confirmation. (It sent the
    reply again after WHATSAPP_SEND_CONFIRM_SECONDS: the sent id had been left to the dead
    state service; and, until the look after the call's end, in about 1 of 3 runs under
    load.)"""
    system = await start_system(STUCK_TIMEOUT_SECONDS="5", WHATSAPP_SEND_CONFIRM_SECONDS="1")
    graph.release.clear()  # the reply's send waits until the state service is dead
    message_id = await send(system, "hello", wa_id=WA_ID)
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1, 30)
    system.kill("state")
    graph.release.set()

    assert await asyncio.to_thread(graph.wait_for, lambda: bool(sent_ids(system, message_id)), 30)
    await system.wait_status([message_id], {"replied"}, timeout=90)
    await asyncio.sleep(1.5)  # a resumed turn's wait (1 s) and a second send would show
    assert len(graph.sends) == 1
    assert not waiting(system)
    row = await recorded_reply(system, message_id)
    assert sent_ids(system, message_id) == [row["reply_message_id"]]
    assert row["reply_confirmed_by"] is None


async def test_a_reply_answered_on_a_closed_call_to_a_driver_that_died_is_recorded_by_the_agent(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    """The agent wrote the turn's answer on a Turns call that the state service had
    half-closed (a call takes turns for `call_seconds`, then stops writing and waits for their
    answers): the call ended normally. The state service then died before its final
    transition, which was to record the reply's id, committed. The agent looks again at every
    call's sent replies shortly after the call ends and records those still unrecorded: one
    send, the message replied, no confirmation wait. (The id was left to the dead state
    service, and the resumed turn, finding no status webhook, sent the reply again.)"""
    system = await start_system(STUCK_TIMEOUT_SECONDS="5", WHATSAPP_SEND_CONFIRM_SECONDS="1")
    graph.hold_for = {WA_ID}
    graph.release.clear()  # this customer's reply waits
    message_id = await send(system, "hello", wa_id=WA_ID)
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1, 30)
    # A turn given to a call's place once the call is `call_seconds` old half-closes it; the
    # places take turns in rotation, so the WIDTH-th turn after the held one closes its call.
    await asyncio.sleep(turn_calls.CALL_SECONDS + 0.2)
    for n in range(turn_calls.WIDTH):
        other = await send(system, f"hello {n}", wa_id=f"1555000200{n}")
        await system.wait_status([other], {"replied"}, timeout=30)
    pool = await system.db()
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        # The turn's final statement takes its conversation's row first: it waits for this
        # lock, its answer read and its reply not yet recorded, when the state service dies.
        await conn.execute(
            "SELECT 1 FROM webhook_conversations c JOIN processed_webhook_messages m "
            "ON m.conversation_id = c.id WHERE m.message_id = $1 FOR UPDATE OF c",
            message_id,
        )
        graph.release.set()
        waiting_pids: list[int] = []

        async def finish_waits() -> bool:
            waiting_pids[:] = [
                r["pid"]
                for r in await pool.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'wa-state' "
                    "AND wait_event_type = 'Lock' AND query LIKE '%wa_finish_turn%'"
                )
            ]
            return bool(waiting_pids)

        await wait_for(finish_waits, 30, "the turn's final statement never waited")
        system.kill("state")
        # Its statement, which PostgreSQL would run to its commit once the lock is free,
        # dies with it (as when its host goes away).
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", waiting_pids
        )
        await tx.rollback()

    await system.wait_status([message_id], {"replied"}, timeout=90)
    await asyncio.sleep(1.5)  # a resumed turn's wait (1 s) and a second send would show
    assert len([s for s in graph.sends if s.body.get("to") == WA_ID]) == 1
    assert not waiting(system)
    assert any(
        line["msg"] == RECORDED and message_id in line["message_ids"]
        for line in system.log_lines("agent")
    )
    row = await recorded_reply(system, message_id)
    assert sent_ids(system, message_id) == [row["reply_message_id"]]
    assert row["reply_confirmed_by"] is None


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
    row = await recorded_reply(system, message_id)
    assert sent_ids(system, message_id) == [row["reply_message_id"]]
    assert row["reply_confirmed_by"] is None
