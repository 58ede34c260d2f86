"""The state service's turns travel many to an `Agent.Turns` call (services/state/turn_calls.py):
against real gRPC servers on loopback playing the agent, over mutual TLS as in production."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from wa.v1 import agent_pb2, agent_pb2_grpc

from common import grpcserver, tls
from devtools.ports import free_port
from services.state import turn_calls
from services.state.clients import GrpcAgent
from services.state.ports import AgentUnavailable
from services.state.store import StaleFence, WorkItem
from services.state.turn_calls import TurnCalls, TurnError

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> tls.Credentials:
    where = tmp_path_factory.mktemp("tls")
    tls.create(where, identities=["state"])
    return tls.Credentials.load(where, "state")


class FakeAgent(agent_pb2_grpc.AgentServicer):
    """Answers each turn after the seconds its text names ("0.2"), or as its text says:
    "stale" is refused as a stale fencing token, "hang" never ends, "die" breaks the call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.turns: Counter[str] = Counter()
        self.started = asyncio.Event()

    async def Turns(
        self,
        requests: AsyncIterator[agent_pb2.TurnsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.TurnsResponse]:
        self.calls += 1
        answers: asyncio.Queue[agent_pb2.TurnsResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: agent_pb2.TurnsRequest) -> None:
            text = request.turn.text
            self.turns[request.turn.message_id] += 1
            self.started.set()
            if text == "stale":
                answers.put_nowait(
                    agent_pb2.TurnsResponse(
                        id=request.id,
                        code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                        details="held with token 9",
                    )
                )
                return
            if text == "die":
                with contextlib.suppress(Exception):  # the abort raises here too
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "replica went away")
                return
            await asyncio.sleep(3600 if text == "hang" else float(text or 0))
            answers.put_nowait(
                agent_pb2.TurnsResponse(
                    id=request.id,
                    result=agent_pb2.ReplyResponse(
                        outcome=agent_pb2.TURN_OUTCOME_REPLIED,
                        reply_text=f"{self.name}:{request.turn.message_id}",
                        agent_type=request.traceparent,
                    ),
                )
            )

        async def read() -> None:
            async for request in requests:
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in running:
                task.cancel()


@contextlib.asynccontextmanager
async def serving(agent: FakeAgent, port: int, creds: tls.Credentials) -> AsyncIterator[None]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    agent_pb2_grpc.add_AgentServicer_to_server(agent, server)
    grpcserver.bind(server, "127.0.0.1", port, creds)
    await server.start()
    try:
        yield
    finally:
        await server.stop(None)


def turn(message_id: str, text: str) -> agent_pb2.ReplyRequest:
    return agent_pb2.ReplyRequest(message_id=message_id, text=text)


async def test_many_turns_share_a_few_calls_and_each_gets_its_own_answer_when_it_ends(
    creds: tls.Credentials,
) -> None:
    agent, port = FakeAgent("a"), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        calls = TurnCalls(ch, width=2, call_seconds=60)
        # The slowest turns are sent first: answers come back as turns end, not in order.
        delays = [0.3 - i * 0.01 for i in range(30)]
        ended: list[str] = []

        async def one(i: int) -> agent_pb2.ReplyResponse:
            answer = await calls.turn(turn(f"m{i}", str(delays[i])), 5.0, f"tp{i}")
            ended.append(f"m{i}")
            return answer

        answers = await asyncio.gather(*(one(i) for i in range(30)))
        assert [a.reply_text for a in answers] == [f"a:m{i}" for i in range(30)]
        # Each turn's own traceparent reached the agent with it.
        assert [a.agent_type for a in answers] == [f"tp{i}" for i in range(30)]
        assert agent.calls == 2, "thirty turns, two calls"
        assert ended[0] == "m29" and ended[-1] in ("m0", "m1")
        assert set(agent.turns.values()) == {1}


async def test_a_call_takes_turns_for_a_while_then_the_next_one_does(
    creds: tls.Credentials,
) -> None:
    agent, port = FakeAgent("a"), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        calls = TurnCalls(ch, width=1, call_seconds=0.2, call_turns=3)
        for i in range(7):  # three turns per call at most
            await calls.turn(turn(f"n{i}", "0"), 5.0, "")
        assert agent.calls == 3
        await asyncio.sleep(0.3)  # too old for new turns
        await calls.turn(turn("late", "0"), 5.0, "")
        assert agent.calls == 4


async def test_calls_spread_over_every_replica_of_the_agent(creds: tls.Credentials) -> None:
    first, second = FakeAgent("a"), FakeAgent("b")
    ports = free_port(), free_port()
    target = f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    async with (
        serving(first, ports[0], creds),
        serving(second, ports[1], creds),
        grpcserver.channel(target, transport=creds) as ch,
    ):
        await ch.channel_ready()
        calls = TurnCalls(ch, width=4, call_seconds=60)
        answers = await asyncio.gather(
            *(calls.turn(turn(f"m{i}", "0.05"), 5.0, "") for i in range(40))
        )
        by = Counter(a.reply_text.split(":")[0] for a in answers)
        assert by["a"] >= 10 and by["b"] >= 10, by


async def test_a_refused_turn_fails_alone_and_its_call_goes_on(creds: tls.Credentials) -> None:
    agent, port = FakeAgent("a"), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        port_ = GrpcAgent(ch, timeout=5.0)
        port_.calls = TurnCalls(ch, width=1, call_seconds=60)
        ok = asyncio.create_task(port_.calls.turn(turn("ok", "0.2"), 5.0, ""))
        await agent.started.wait()
        with pytest.raises(TurnError) as refused:
            await port_.calls.turn(turn("s", "stale"), 5.0, "")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (await ok).reply_text == "a:ok"
        assert agent.calls == 1


async def test_a_call_that_breaks_fails_the_turns_it_owes_as_unavailable_and_the_next_turn_opens_another(  # noqa: E501
    creds: tls.Credentials,
) -> None:
    agent, port = FakeAgent("a"), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        calls = TurnCalls(ch, width=1, call_seconds=60)
        owed = asyncio.create_task(calls.turn(turn("slow", "hang"), 5.0, ""))
        await agent.started.wait()
        with pytest.raises(TurnError) as broken:
            await calls.turn(turn("d", "die"), 5.0, "")
        assert broken.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TurnError) as also:
            await owed
        assert also.value.code == grpc.StatusCode.UNAVAILABLE
        assert (await calls.turn(turn("after", "0"), 5.0, "")).reply_text == "a:after"
        assert agent.calls == 2


async def test_the_state_service_maps_each_turns_status_as_it_did_for_a_unary_call(
    creds: tls.Credentials,
) -> None:
    """A stale token: StaleFence; a broken call: AgentUnavailable (the driver asks again); no
    answer within the deadline: a failed, retryable turn."""
    agent, port = FakeAgent("a"), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        gate = GrpcAgent(ch, timeout=0.2)
        item = _item("stale")
        with pytest.raises(StaleFence):
            await gate.reply(item, 1)
        with pytest.raises(AgentUnavailable):
            await gate.reply(_item("die"), 1)
        grace, turn_calls.ANSWER_GRACE = turn_calls.ANSWER_GRACE, 0.1
        try:
            result = await gate.reply(_item("hang"), 1)
        finally:
            turn_calls.ANSWER_GRACE = grace
        assert result.outcome == "failed" and result.error_class == "TurnTimeout"
        assert result.retryable
        result = await gate.reply(_item("0"), 1)
        assert result.outcome == "replied"


def _item(text: str) -> WorkItem:
    return WorkItem(
        id=1,
        message_id=f"wamid.{text}",
        conversation_id=1,
        phone_number_id="p",
        wa_id="1555",
        type="text",
        text=text,
        timestamp=0,
        correlation_id="c",
        traceparent="",
        attempts=1,
        contact_name="",
        resumed=False,
        turn_resumes=0,
        fence_token=1,
    )
