"""The state service's turns travel many to an `Agent.Turns` call (services/state/turn_calls.py):
against real gRPC servers on loopback playing the agent, over mutual TLS as in production."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import cast

import grpc
import pytest
from wa.v1 import agent_pb2, agent_pb2_grpc

from common import grpcserver, tls, wire
from common.domain import TurnRequest, TurnResult
from devtools.ports import free_port
from services.agent import server as agent_server
from services.agent.deadline import Deadline
from services.agent.operator import OperatorReplies
from services.agent.server import AgentServicer
from services.agent.turn import Agent
from services.agent.turn import StaleFence as StaleTurn
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
    "stale" is refused as a stale fencing token, "hang" never ends, "die" breaks the call;
    "sent:0.2" answers after 0.2 s that its reply was sent and is the caller's to record.

    As an agent of an earlier release, one turn per message each way; `more`: as today's,
    it announces it reads several turns per message and answers together those that end
    together, to a caller that asked."""

    def __init__(self, name: str, *, more: bool = False) -> None:
        self.name = name
        self.more = more
        self.calls = 0
        self.turns: Counter[str] = Counter()
        self.started = asyncio.Event()
        # Stream messages read and written, and turns each carried.
        self.requests: list[int] = []
        self.responses: list[int] = []
        self.asked_more: list[bool] = []

    async def Turns(
        self,
        requests: AsyncIterator[agent_pb2.TurnsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.TurnsResponse]:
        self.calls += 1
        answers: asyncio.Queue[agent_pb2.TurnsResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        asked = wire.TURNS_MORE in (context.invocation_metadata() or ())
        self.asked_more.append(asked)
        more = self.more and asked
        if more:
            await context.send_initial_metadata((wire.TURNS_MORE,))

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
            sent = text.startswith("sent:")  # sent its reply, left to the caller to record
            text = text.removeprefix("sent:")
            await asyncio.sleep(3600 if text == "hang" else float(text or 0))
            answers.put_nowait(
                agent_pb2.TurnsResponse(
                    id=request.id,
                    result=agent_pb2.ReplyResponse(
                        outcome=agent_pb2.TURN_OUTCOME_REPLIED,
                        reply_text=f"{self.name}:{request.turn.message_id}",
                        agent_type=request.traceparent,
                        reply_message_id=f"wamid.OUT.{request.turn.message_id}" if sent else "",
                        sent_unrecorded=sent,
                    ),
                )
            )

        async def read() -> None:
            async for request in requests:
                self.requests.append(1 + len(request.more))
                for each in (request, *request.more):
                    task = asyncio.create_task(one(each))
                    running.add(task)
                    task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                while more and not answers.empty():
                    if (also := answers.get_nowait()) is None:
                        answers.put_nowait(None)  # the end, after this answer
                        break
                    answer.more.append(also)
                self.responses.append(1 + len(answer.more))
                yield answer
        finally:
            reader.cancel()
            for task in running:
                task.cancel()


@contextlib.asynccontextmanager
async def serving(
    agent: agent_pb2_grpc.AgentServicer, port: int, creds: tls.Credentials
) -> AsyncIterator[None]:
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
        # `channel_ready` means one replica is connected, not both: until the second is, every
        # call opened goes to the first. Calls of one turn each until both have served one.
        probe = TurnCalls(ch, width=1, call_seconds=60, call_turns=1)
        async with asyncio.timeout(10):
            while not (first.calls and second.calls):
                await probe.turn(turn("probe", "0"), 5.0, "")
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


@pytest.mark.parametrize("more", [False, True], ids=["earlier-agent", "agent-reads-several"])
async def test_a_call_that_breaks_fails_the_turns_it_owes_as_unavailable_and_the_next_turn_opens_another(  # noqa: E501
    creds: tls.Credentials, more: bool
) -> None:
    agent, port = FakeAgent("a", more=more), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        calls = TurnCalls(ch, width=1, call_seconds=60)
        owed = asyncio.create_task(calls.turn(turn("slow", "hang"), 5.0, ""))
        await agent.started.wait()
        # Queued together: one message to an agent that reads several.
        together = await asyncio.gather(
            *(calls.turn(turn(f"d{i}", "hang" if i else "die"), 5.0, "") for i in range(3)),
            return_exceptions=True,
        )
        assert [type(e) for e in together] == [TurnError] * 3
        assert {e.code for e in together if isinstance(e, TurnError)} == {
            grpc.StatusCode.UNAVAILABLE
        }
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


async def test_turns_queued_together_go_in_one_message_and_answers_that_end_together_in_one(
    creds: tls.Credentials,
) -> None:
    """To an agent that said, when the call opened, that it reads several turns per message:
    each still gets its own answer, traceparent and status."""
    agent, port = FakeAgent("a", more=True), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        calls = TurnCalls(ch, width=2, call_seconds=60)
        await calls.turn(turn("first", "0"), 5.0, "")  # its call learns what the agent reads
        texts = ["0.2"] * 29 + ["stale"]
        answers = await asyncio.gather(
            *(calls.turn(turn(f"m{i}", texts[i]), 5.0, f"tp{i}") for i in range(30)),
            return_exceptions=True,
        )
        replied = [a for a in answers if isinstance(a, agent_pb2.ReplyResponse)]
        assert [a.reply_text for a in replied] == [f"a:m{i}" for i in range(29)]
        assert [a.agent_type for a in replied] == [f"tp{i}" for i in range(29)]
        refused = answers[29]
        assert isinstance(refused, TurnError)
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
        assert sum(agent.requests) == sum(agent.responses) == 31
        assert set(agent.turns.values()) == {1}
        # The first turn alone, then one message on the call that knows, beside one on the
        # next call, which does not know yet.
        assert sorted(agent.requests) == [1, 1, 29], agent.requests
        assert len(agent.responses) < 10, agent.responses


async def test_an_agent_of_an_earlier_release_gets_one_turn_per_message(
    creds: tls.Credentials,
) -> None:
    """It does not announce that it reads several (a rolling deploy: new state service, old
    agent): every message carries one turn."""
    agent, port = FakeAgent("a"), free_port()
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        calls = TurnCalls(ch, width=1, call_seconds=60)
        await calls.turn(turn("first", "0"), 5.0, "")
        answers = await asyncio.gather(
            *(calls.turn(turn(f"m{i}", "0.05"), 5.0, "") for i in range(30))
        )
        assert [a.reply_text for a in answers] == [f"a:m{i}" for i in range(30)]
        assert agent.requests == [1] * 31
        assert agent.asked_more == [True]


class Turning:
    """The agent's turns as its servicer runs them, the Agent a stand-in: each waits until
    `gate` opens, so that they end together; "stale" is refused as a stale fencing token."""

    def __init__(self, turns: int) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0
        self.all_waiting = asyncio.Event()
        self.turns = turns

    async def reply(self, req: TurnRequest, deadline: Deadline) -> TurnResult:
        self.waiting += 1
        if self.waiting == self.turns:
            self.all_waiting.set()
        await self.gate.wait()
        if req.text == "stale":
            raise StaleTurn("held with token 9")
        return TurnResult(outcome="replied", reply_text=f"r:{req.message_id}")


@pytest.mark.parametrize("asks", [False, True], ids=["earlier-state", "reads-several"])
async def test_the_agent_answers_several_turns_per_message_only_to_a_caller_that_asks(
    creds: tls.Credentials, asks: bool
) -> None:
    """A state service of an earlier release (a rolling deploy) neither asks nor reads `more`:
    it gets one answer per message, one turn a message from it being read as before."""
    turning, port = Turning(3), free_port()
    servicer = AgentServicer(cast(Agent, turning), replies=cast(OperatorReplies, object()))
    texts = {1: "hi", 2: "hi", 3: "stale"}
    async with (
        serving(servicer, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        call = agent_pb2_grpc.AgentStub(ch).Turns(
            timeout=10, metadata=(wire.TURNS_MORE,) if asks else None
        )
        requests = [
            agent_pb2.TurnsRequest(
                id=i, turn=turn(f"m{i}", text), timeout_seconds=5, traceparent=""
            )
            for i, text in texts.items()
        ]
        if asks:
            requests[0].more.extend(requests[1:])
            del requests[1:]
        for request in requests:
            await call.write(request)
        async with asyncio.timeout(10):  # every turn read, else the test fails, not hangs
            await turning.all_waiting.wait()
        turning.gate.set()
        await call.done_writing()
        responses = [r async for r in call]
        metadata = await call.initial_metadata()
    answers = {a.id: a for r in responses for a in (r, *r.more)}
    assert (metadata.get(wire.TURNS_MORE[0]) == wire.TURNS_MORE[1]) is asks
    assert [len(r.more) for r in responses] == ([2] if asks else [0, 0, 0])
    assert answers[1].result.reply_text == "r:m1" and answers[2].result.reply_text == "r:m2"
    assert answers[3].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "held with token 9" in answers[3].details


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


async def test_a_reply_sent_by_a_turn_answered_after_its_caller_stopped_waiting_is_handed_over(
    creds: tls.Credentials,
) -> None:
    """A turn that overran its deadline and grace fails for its caller; when its answer comes
    all the same and says its reply went out, unrecorded, the message and the reply's id are
    handed to `unclaimed` (the state service records them), not dropped: the turn's next run
    would find the send in flight and, without a status webhook, send it again. An answer in
    time stays its caller's."""
    agent, port = FakeAgent("a"), free_port()
    unclaimed: list[tuple[str, str]] = []
    async with (
        serving(agent, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch,
    ):
        calls = TurnCalls(
            ch, width=1, call_seconds=60, unclaimed=lambda m, r: unclaimed.append((m, r))
        )
        with pytest.raises(TurnError) as late:
            # Given up at 0.1 s and the grace; answered at the grace and a half second more.
            await calls.turn(turn("m-late", f"sent:{turn_calls.ANSWER_GRACE + 0.6}"), 0.1, "")
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        answer = await calls.turn(turn("m-in-time", "sent:0"), 5.0, "")
        assert answer.sent_unrecorded and answer.reply_message_id == "wamid.OUT.m-in-time"
        for _ in range(100):
            if unclaimed:
                break
            await asyncio.sleep(0.05)
        assert unclaimed == [("m-late", "wamid.OUT.m-late")]


class Sending:
    """The agent's turns as its servicer runs them, the Agent a stand-in: each says its reply
    went out and is its caller's to record. Also the stand-in's pool: what the servicer
    records itself (the messages and replies of each statement) goes to `recorded`."""

    def __init__(self) -> None:
        self.pool = self
        self.recorded: list[dict[str, str]] = []

    async def reply(self, req: TurnRequest, deadline: Deadline) -> TurnResult:
        return TurnResult(
            outcome="replied",
            reply_text="r",
            reply_message_id=f"wamid.OUT.{req.message_id}",
            sent_unrecorded=True,
        )

    async def fetch(self, query: str, messages: list[str], replies: list[str]) -> list[object]:
        self.recorded.append(dict(zip(messages, replies, strict=True)))
        return []


async def a_call_that_ends_normally(port: int, creds: tls.Credentials) -> None:
    """Two turns on one Turns call, both answered, then the call ended by its caller."""
    async with grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch:
        call = agent_pb2_grpc.AgentStub(ch).Turns(timeout=10, metadata=(wire.TURNS_MORE,))
        for i in (1, 2):
            request = agent_pb2.TurnsRequest(id=i, turn=turn(f"m{i}", "hi"), timeout_seconds=5)
            await call.write(request)
        await call.done_writing()
        answers = [a for r in [r async for r in call] for a in (r, *r.more)]
        assert await call.code() == grpc.StatusCode.OK
    assert sorted(a.result.reply_message_id for a in answers) == ["wamid.OUT.m1", "wamid.OUT.m2"]


async def test_a_call_that_ended_normally_has_its_sent_replies_looked_at_again_once(
    creds: tls.Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its caller got every answer, and may still die before it records their replies: the
    agent looks at them again RECHECK_SECONDS after the call ended, all of them in one
    statement, and records those still unrecorded (services/agent/queries.sql)."""
    monkeypatch.setattr(agent_server, "RECHECK_SECONDS", 0.5)
    sending, port = Sending(), free_port()
    servicer = AgentServicer(cast(Agent, sending), replies=cast(OperatorReplies, object()))
    async with serving(servicer, port, creds):
        await a_call_that_ends_normally(port, creds)
        await asyncio.sleep(0.2)
        assert sending.recorded == []  # its caller records them first
        await asyncio.sleep(0.6)
        assert sending.recorded == [{"m1": "wamid.OUT.m1", "m2": "wamid.OUT.m2"}]


async def test_the_agent_on_its_way_out_looks_again_at_once(creds: tls.Credentials) -> None:
    """SIGTERM: once the server has stopped, the calls' replies waiting to be looked at again
    are looked at at once, not RECHECK_SECONDS on, before the pool closes."""
    sending, port = Sending(), free_port()
    servicer = AgentServicer(cast(Agent, sending), replies=cast(OperatorReplies, object()))
    async with serving(servicer, port, creds):
        await a_call_that_ends_normally(port, creds)
    async with asyncio.timeout(agent_server.RECHECK_SECONDS / 2):
        await servicer.close()
    assert sending.recorded == [{"m1": "wamid.OUT.m1", "m2": "wamid.OUT.m2"}]


class Slow:
    """An agent whose turns take the seconds their text says; it notes which were cut off."""

    def __init__(self) -> None:
        self.pool = self
        self.ended: dict[str, str] = {}

    async def reply(self, req: TurnRequest, deadline: Deadline) -> TurnResult:
        try:
            await asyncio.sleep(float(req.text))
        except asyncio.CancelledError:
            self.ended[req.message_id] = "cut off"
            raise
        self.ended[req.message_id] = "finished"
        return TurnResult(outcome="replied", reply_text="r")


async def test_a_stopping_agent_lets_its_turns_run_until_the_drain_ends_then_cuts_them_off(
    creds: tls.Credentials, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM: once the server has stopped (its grace cut the call), the turns still running
    finish until the drain's end; the one still running then is cut off, and said so."""
    slow, port = Slow(), free_port()
    servicer = AgentServicer(cast(Agent, slow), replies=cast(OperatorReplies, object()))
    async with serving(servicer, port, creds):
        async with grpcserver.channel(f"127.0.0.1:{port}", transport=creds) as ch:
            call = agent_pb2_grpc.AgentStub(ch).Turns(timeout=10, metadata=(wire.TURNS_MORE,))
            for i, seconds in ((1, "0.3"), (2, "30")):
                request = agent_pb2.TurnsRequest(
                    id=i, turn=turn(f"m{i}", seconds), timeout_seconds=60
                )
                await call.write(request)
            await asyncio.sleep(0.1)
            call.cancel()  # as the server's grace ends the call
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        await servicer.finish_turns(loop.time() + 0.8)
    assert slow.ended == {"m1": "finished", "m2": "cut off"}
    (said,) = [r for r in caplog.records if r.getMessage().startswith("cutting off turns")]
    assert said.message_ids == ["m2"]  # type: ignore[attr-defined]
