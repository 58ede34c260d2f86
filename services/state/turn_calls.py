"""The agent's turns, many to a call: `Agent.Turns` streams multiplexed by turn id.

A unary `Agent.Reply` per turn costs both processes more CPU than the rest of the call's work
(about 0.55 ms per turn, against about 0.2 ms for a message on an open stream, measured on
this project's 2-core machines). So each turn goes as one message on a `Turns` call that is
already open, and its answer comes back on it, whenever the turn ends: turns of one call do
not wait for each other, and a slow model holds up only its own turn. The calls, their
rotation over the agent's replicas and their failures are common/streamcalls.py's.

Turns queued at the same moment (the turn statements are batched, so turns start together) go
in one stream message, and the agent answers together the turns that end together: a message
costs each side a system call and a few wake-ups whatever it carries. Both sides say so when
the call opens (`wire.TURNS_MORE`: the caller's request metadata, the agent's initial
metadata); with a peer of an earlier release (a rolling deploy), one turn a message each way.

A call that breaks fails each turn it still owes as UNAVAILABLE: the turn may not have run, and
the driver asks again under a new fencing token (see dispatcher.py); a turn that gets no answer
within its deadline and `ANSWER_GRACE` is a turn that ran out of time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc
from wa.v1 import agent_pb2, agent_pb2_grpc

from common import wire
from common.streamcalls import CallError, StreamCalls

# Calls open for new turns at a time, and how long each takes them.
WIDTH = 4
CALL_SECONDS = 1.0
# How long past the turn's own deadline (which the agent keeps) the caller waits for its answer.
ANSWER_GRACE = 2.0
# How often the turns awaiting an answer are looked at for one past its deadline: a turn that
# gets none fails at most this much later than `timeout + ANSWER_GRACE`.
WATCH_SECONDS = 0.1

# The turn's call, or the agent for this turn, ended with `code`.
TurnError = CallError

# A turn to write: the turn, its timeout and its traceparent.
_Turn = tuple[agent_pb2.ReplyRequest, float, str]
# Called with (message id, reply id) for an answer whose caller had stopped waiting and whose
# reply was sent and left to that caller to record (the answer's sent_unrecorded).
UnclaimedSend = Callable[[str, str], None]


def _request(batch: list[tuple[int, _Turn]]) -> agent_pb2.TurnsRequest:
    """The first turn in the message's own fields, the others in its `more`."""
    (turn_id, (turn, timeout, traceparent)), *rest = batch
    request = agent_pb2.TurnsRequest(
        id=turn_id, turn=turn, timeout_seconds=timeout, traceparent=traceparent
    )
    for turn_id, (turn, timeout, traceparent) in rest:
        request.more.add(id=turn_id, turn=turn, timeout_seconds=timeout, traceparent=traceparent)
    return request


def _answers(
    response: agent_pb2.TurnsResponse,
) -> Iterable[tuple[int, int, str, agent_pb2.ReplyResponse | None]]:
    for answer in (response, *response.more):
        yield answer.id, answer.code, answer.details, answer.result


def _reads_more(metadata: object) -> bool:
    return metadata is not None and metadata.get(wire.TURNS_MORE[0]) == wire.TURNS_MORE[1]  # type: ignore[attr-defined]


def _late(seconds: float) -> TurnError:
    said = f"no answer within {seconds - ANSWER_GRACE:.1f} s (and {ANSWER_GRACE:g} s of grace)"
    return TurnError(grpc.StatusCode.DEADLINE_EXCEEDED, said)


class TurnCalls:
    """Sends turns on `width` rotating `Agent.Turns` calls (module docstring)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        width: int = WIDTH,
        call_seconds: float = CALL_SECONDS,
        call_turns: int = 1024,
        call_timeout: float = 600.0,
        unclaimed: UnclaimedSend | None = None,
    ) -> None:
        self.stub = agent_pb2_grpc.AgentStub(channel)
        self.unclaimed = unclaimed

        def orphan(turn: _Turn, result: agent_pb2.ReplyResponse) -> None:
            # Its caller stopped waiting (the turn ran out of time, its driver was cancelled).
            # A reply it sent is recorded all the same: the next run of the turn would find a
            # send in flight and, without a status webhook, send it again.
            if unclaimed is not None and result.sent_unrecorded and result.reply_message_id:
                unclaimed(turn[0].message_id, result.reply_message_id)

        self._calls: StreamCalls[_Turn, agent_pb2.ReplyResponse] = StreamCalls(
            "agent-turns",
            # A call's own deadline: it takes turns for call_seconds, then its last turn
            # (whose own deadline the agent keeps) must end; this only bounds a call that
            # somehow does not.
            lambda: self.stub.Turns(timeout=call_timeout, metadata=(wire.TURNS_MORE,)),
            _request,
            _answers,
            width=width,
            call_seconds=call_seconds,
            call_items=call_turns,
            several=_reads_more,
            orphan=orphan if unclaimed is not None else None,
            watch_seconds=WATCH_SECONDS,
        )

    async def turn(
        self, turn: agent_pb2.ReplyRequest, timeout: float, traceparent: str
    ) -> agent_pb2.ReplyResponse:
        """The turn's answer; raises TurnError with the status its turn (or call) ended with."""
        return await self._calls.ask((turn, timeout, traceparent), timeout + ANSWER_GRACE, _late)

    def close(self) -> None:
        """Ends every call (the turns still owed fail as CANCELLED)."""
        self._calls.close()
