"""Replicas of every service share the work (`WA_SCALE=agent=3,state=2,dlq=2,gateway=2`, each
replica its own process): a burst of 240 messages over 60 conversations is answered exactly
once each, in order, one turn at a time per conversation, while replicas are killed or scaled
in. Measured from outside: the fake Graph API and model, each replica's /metrics, the
supervisor's view and the logs.

One system serves the three tests (nine service processes take a while to start on a busy
machine); each sends its own conversations, and starts with every replica serving (starting
again those an earlier test scaled in).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import grpcserver
from tests.support import conversations as cv
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.metrics import metric
from tests.support.servers import Postgres, Redis
from tests.support.system import SECRET, System

# One worker runs the whole module under pytest-xdist: its scaled system is started once.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("scale")]

SCALE = "agent=3,state=2,dlq=2,gateway=2"
CONVERSATIONS = 60
PER_CONVERSATION = 4
MESSAGES = CONVERSATIONS * PER_CONVERSATION


@dataclass
class Scaled:
    system: System
    graph: FakeGraph
    model: FakeModel


@pytest.fixture(scope="module")
async def scaled(
    pg: Postgres, template: str, redis_server: Redis, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Scaled]:
    graph = FakeGraph().start()
    model = cv.model_for_conversations().start()
    model.delay = 0.02  # long enough for two turns of one conversation to be seen overlapping
    # The sweeper runs every STUCK_TIMEOUT_SECONDS / 4 = 5 s, for what only it can recover (a
    # killed replica's leases); nothing else may need it.
    # A replica scaled in lets its turns finish for up to DRAIN_SECONDS: more than a turn
    # takes here on two busy cores.
    env = model.env(
        WA_SCALE=SCALE,
        STUCK_TIMEOUT_SECONDS="20",
        DRAIN_SECONDS="10",
        WHATSAPP_API_BASE_URL=graph.url,
    )
    root: Path = tmp_path_factory.mktemp("scaled")
    system = System(
        root, await pg.create_database(template), redis_server.url, f"wa:t:{uuid.uuid4().hex}:", env
    )
    try:
        # Nine Python processes: on two busy cores they can take a while to start.
        await system.start(wait=False)
        await system.wait_ready(timeout=120)
        yield Scaled(system, graph, model)
    finally:
        await system.stop()
        graph.release.set()
        graph.stop()
        model.stop()


async def burst(
    system: System, first: int, midway: Callable[[], Awaitable[None]] | None = None
) -> list[str]:
    """Conversations `first`... each send their messages one after the other, all at once, as
    Meta does (retrying what is not acknowledged); `midway` runs once a third is
    acknowledged."""
    base = int(time.time())
    ids: list[str] = []
    acked = 0
    third = asyncio.Event()

    async def converse(conv: int) -> None:
        nonlocal acked
        for n in range(PER_CONVERSATION):
            message_id, doc = cv.message_doc(conv, n, base)
            ids.append(message_id)
            await system.deliver(doc, timeout=60)
            acked += 1
            if acked >= MESSAGES // 3:
                third.set()

    async def at_a_third() -> None:
        await third.wait()
        if midway is not None:
            await midway()

    convs = range(first, first + CONVERSATIONS)
    await asyncio.gather(at_a_third(), *(converse(c) for c in convs))
    return ids


def assert_answered_once_in_order(
    s: Scaled, first: int, ids: list[str], *, cut_turns: bool = False
) -> None:
    replies = cv.replies_per_message(s.graph)
    assert {m: replies[m] for m in ids if replies[m] != 1} == {}
    ours = {f"c{c:03d}" for c in range(first, first + CONVERSATIONS)}
    order = {k: seq for k, seq in cv.seen_by_model(s.model).items() if k in ours}
    assert len(order) == CONVERSATIONS
    for seq in order.values():
        if cut_turns:
            # A turn cut by a killed replica may be asked again, never out of order.
            assert seq == sorted(seq) and set(seq) == set(range(PER_CONVERSATION))
        else:
            assert seq == list(range(PER_CONVERSATION))
    if not cut_turns:
        assert [k for k in s.model.overlaps if k in ours] == []


async def per_replica(
    system: System, service: str, name: str, labels: dict[str, str] | None = None
) -> dict[str, float]:
    return {
        r.name: await metric(r.metrics_port, name, labels) for r in system.scale.replicas[service]
    }


def minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


async def every_replica_serving(system: System, timeout: float = 120.0) -> None:
    """Each replica is up (started again if it was scaled in): gRPC ones answer their health
    check, gateways have started since their process did (they share one port, so they are
    told apart by their logs)."""
    for r in system.scale.all():
        child = system.sup.children.get(r.name)
        if child is not None and not child.spec.restart:
            await system.start((r.name,), wait=False)
    deadline = time.monotonic() + timeout
    for r in system.scale.all():
        while True:
            assert time.monotonic() < deadline, f"{r.name} is not serving\n{system.tail_logs()}"
            if r.grpc_port is not None:
                target = f"127.0.0.1:{r.grpc_port}"
                if (await grpcserver.check_health(target, 2.0, system.transport()))[0]:
                    break
            elif _gateway_started(system, r.name):
                break
            await asyncio.sleep(0.2)


def _gateway_started(system: System, name: str) -> bool:
    pid = system.sup.pid(name)
    started = None
    for line in system.log_lines(name):
        if line["msg"].startswith("Started server process"):
            started = line["msg"]
        elif line["msg"] == "Application startup complete.":
            if started == f"Started server process [{pid}]":
                return True
    return False


async def test_replicas_share_a_burst_and_answer_each_message_once_in_order(
    scaled: Scaled,
) -> None:
    system = scaled.system
    await every_replica_serving(system)
    assert len(system.replicas("agent")) == 3 and len(system.replicas("gateway")) == 2
    turns_before = await per_replica(system, "state", "wa_messages_total", {"outcome": "replied"})
    calls_before = await per_replica(system, "agent", "wa_model_call_seconds_count")
    swept_before = await per_replica(system, "state", "wa_sweeper_recovered_total")

    ids = await burst(system, first=0)
    # Whichever state replica ingested a message, the one driving its conversation takes it:
    # no message waits for a sweeper (first run at start, then every 5 s).
    await system.wait_status(ids, {"replied"}, timeout=20)
    assert_answered_once_in_order(scaled, 0, ids)

    # Every replica did a real share, as its own /metrics counts it.
    turns = minus(
        await per_replica(system, "state", "wa_messages_total", {"outcome": "replied"}),
        turns_before,
    )
    assert sum(turns.values()) == MESSAGES
    assert min(turns.values()) >= MESSAGES / 6, turns  # a third of a fair half, at least
    calls = minus(await per_replica(system, "agent", "wa_model_call_seconds_count"), calls_before)
    assert sum(calls.values()) == MESSAGES
    assert min(calls.values()) >= MESSAGES / 9, calls  # a third of a fair third
    swept = minus(await per_replica(system, "state", "wa_sweeper_recovered_total"), swept_before)
    assert swept == {"state-1": 0, "state-2": 0}


async def test_one_replica_of_each_service_killed_mid_burst_loses_nothing(
    scaled: Scaled,
) -> None:
    system = scaled.system
    await every_replica_serving(system)
    victims = ["state-1", "agent-2", "dlq-1", "gateway-2"]
    killed: list[int] = []
    # Statuses flow back, as from Meta: a send cut by a killed agent is confirmed by its
    # status, not sent again. (Only here: they double the deliveries, on two busy cores.)
    scaled.graph.webhook = (f"{system.url}/webhook", SECRET)

    async def kill() -> None:
        killed.extend(system.kill(name) for name in victims)

    try:
        ids = await burst(system, first=100, midway=kill)
        # A killed state replica's leases are broken by the other's sweeper once its
        # heartbeat has expired (5 s).
        await system.wait_status(ids, {"replied"}, timeout=90)
        await asyncio.sleep(1.0)  # a late second reply would show
    finally:
        scaled.graph.webhook = None
    assert_answered_once_in_order(scaled, 100, ids, cut_turns=True)
    assert len(killed) == len(victims)
    for name in victims:  # each restarted on its own
        assert any(f" {name}: exited with -9; restarting" in e for e in system.events), name


async def test_one_replica_of_each_service_scaled_in_mid_burst_hands_back_its_work(
    scaled: Scaled,
) -> None:
    system = scaled.system
    await every_replica_serving(system)
    leaving = ["state-2", "agent-3", "dlq-2", "gateway-1"]
    swept_before = await metric(
        system.scale.replicas["state"][0].metrics_port, "wa_sweeper_recovered_total"
    )
    taken_before = await metric(
        system.scale.replicas["state"][0].metrics_port, "wa_handback_total", {"direction": "taken"}
    )
    stopping: list[asyncio.Task[None]] = []
    # Turns slower than acknowledgements: when it is told to stop, state-2 is running turns
    # with messages waiting behind them.
    scaled.model.delay = 1.0

    async def scale_in() -> None:
        # SIGTERM and no restart, as an orchestrator scales in.
        stopping.append(asyncio.create_task(system.sup.stop(leaving, timeout=15)))

    try:
        ids = await burst(system, first=200, midway=scale_in)
        await asyncio.gather(*stopping)
        await system.wait_status(ids, {"replied"}, timeout=20)
    finally:
        scaled.model.delay = 0.02
    assert_answered_once_in_order(scaled, 200, ids)
    # Each left by itself within its grace period: none had to be killed.
    assert [e for e in system.events if "killing it" in e] == []
    assert any(line["msg"] == "stopped" for line in system.log_lines("state-2"))
    # What state-2 left was handed to state-1 and driven at once: state-1's sweeper (every
    # 5 s) recovered nothing.
    state_1 = system.scale.replicas["state"][0].metrics_port
    assert await metric(state_1, "wa_sweeper_recovered_total") == swept_before
    handed = sum(
        line.get("conversations", 0)
        for line in system.log_lines("state-2")
        if line["msg"] == "handed conversations back"
    )
    taken = await metric(state_1, "wa_handback_total", {"direction": "taken"}) - taken_before
    assert handed > 0 and taken == handed
