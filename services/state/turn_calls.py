"""The agent's turns, many to a call: `Agent.Turns` streams multiplexed by turn id.

A unary `Agent.Reply` per turn costs both processes more CPU than the rest of the call's work
(a call's set-up, its HTTP/2 stream, metadata, deadlines and completion-queue events on each
side: about 0.55 ms per turn, against about 0.2 ms for a message on an open stream, measured on
this project's 2-core machines). So each turn goes as one message on a `Turns` call that is
already open, and its answer comes back on it, whenever the turn ends: turns of one call do
not wait for each other, and a slow model holds up only its own turn.

Turns queued at the same moment (the turn statements are batched, so turns start together) go
in one stream message, and the agent answers together the turns that end together: a message
costs each side a system call and a few wake-ups whatever it carries. Both sides say so when
the call opens (`wire.TURNS_MORE`: the caller's request metadata, the agent's initial
metadata); with a peer of an earlier release (a rolling deploy), one turn a message each way.

Calls are short-lived on purpose: `width` calls are open for new turns at a time, messages go
to them in rotation, and each stops taking turns after `call_seconds` (or `call_turns`) and ends
once its last turn is answered. Every new call is placed by the channel's `round_robin` on the
next replica (common/balancing.py), so the turns keep spreading over the agent's replicas, and
a replica that was added is used within `call_seconds`.

What can go wrong is what could go wrong with a unary call, per turn: a call that breaks fails
each turn it still owes with its status (UNAVAILABLE: the turn may not have run, and the driver
asks again under a new fencing token, see dispatcher.py); a turn that gets no answer within its
deadline and `ANSWER_GRACE` is a turn that ran out of time.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable

import grpc
from wa.v1 import agent_pb2, agent_pb2_grpc

from common import wire
from common.deadlines import Deadlines

log = logging.getLogger(__name__)

# Calls open for new turns at a time, and how long each takes them (TurnCalls).
WIDTH = 4
CALL_SECONDS = 1.0
# How long past the turn's own deadline (which the agent keeps) the caller waits for its answer.
ANSWER_GRACE = 2.0
# How often the turns awaiting an answer are looked at for one past its deadline: a turn that
# gets none fails at most this much later than `timeout + ANSWER_GRACE`.
WATCH_SECONDS = 0.1

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class TurnError(Exception):
    """The turn's call, or the agent for this turn, ended with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# A turn waiting to be written: its id, the turn, its timeout and its traceparent.
_Queued = tuple[int, agent_pb2.ReplyRequest, float, str]
# Called with (message id, reply id) for an answer whose caller had stopped waiting and whose
# reply was sent and left to that caller to record (the answer's sent_unrecorded).
UnclaimedSend = Callable[[str, str], None]


class _Call:
    """One open `Turns` call: a writer that sends what queues, a reader that answers turns."""

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentStub,
        timeout: float,
        unclaimed: UnclaimedSend | None = None,
    ) -> None:
        self.opened = time.monotonic()
        self.turns = 0
        self.retired = False
        self.ended = False
        # The agent reads several turns per message (it said so: wire.TURNS_MORE). Until its
        # initial metadata is read, and with an agent of an earlier release, one a message.
        self.more = False
        self._call = stub.Turns(timeout=timeout, metadata=(wire.TURNS_MORE,))
        self._owed: dict[int, asyncio.Future[agent_pb2.ReplyResponse]] = {}
        # Each turn's message, until its answer comes, however late (for `unclaimed`).
        self._unclaimed = unclaimed
        self._message_of: dict[int, str] = {}
        self._outbox: deque[_Queued] = deque()
        self._writer: asyncio.Task[None] | None = None
        # Fresh contexts: the call serves many turns and belongs to none of their traces.
        self._reader = asyncio.create_task(
            self._read(), name="agent-turns-reader", context=contextvars.Context()
        )

    @property
    def queued(self) -> bool:
        """Turns wait for the writer: a turn queued now goes in the same message as them."""
        return bool(self._outbox)

    def send(
        self, turn_id: int, turn: agent_pb2.ReplyRequest, timeout: float, traceparent: str
    ) -> asyncio.Future[agent_pb2.ReplyResponse]:
        future: asyncio.Future[agent_pb2.ReplyResponse] = asyncio.get_running_loop().create_future()
        self._owed[turn_id] = future
        if self._unclaimed is not None:
            self._message_of[turn_id] = turn.message_id
        self._outbox.append((turn_id, turn, timeout, traceparent))
        self.turns += 1
        self._start_writer()
        return future

    def forget(self, turn_id: int) -> None:
        self._owed.pop(turn_id, None)

    def retire(self) -> None:
        """Takes no more turns; the call ends once the turns it carries are answered."""
        if not self.retired:
            self.retired = True
            self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(
                self._write(), name="agent-turns-writer", context=contextvars.Context()
            )

    async def _write(self) -> None:
        try:
            while self._outbox:
                # Everything queued goes in one message (a write costs each side a system
                # call and a few wake-ups, whatever it carries); what queues during the write
                # goes in the next.
                if self.more:
                    batch = list(self._outbox)
                    self._outbox.clear()
                else:
                    batch = [self._outbox.popleft()]
                await self._call.write(_request(batch))
            if self.retired and not self.ended:
                await self._call.done_writing()
        except Exception as exc:  # any failure to write fails the call's turns
            # A turn whose write failed may have reached the agent: like a unary call lost
            # mid-way, it is "unavailable", asked again under a new fencing token.
            self._fail_all(TurnError(grpc.StatusCode.UNAVAILABLE, f"sending the turn: {exc!r}"))

    async def _read(self) -> None:
        error = TurnError(grpc.StatusCode.UNAVAILABLE, "the call ended without answering")
        try:
            metadata = await self._call.initial_metadata()
            self.more = (
                metadata is not None and metadata.get(wire.TURNS_MORE[0]) == (wire.TURNS_MORE[1])
            )
            async for answer in self._call:
                self._answer(answer)
                for also in answer.more:
                    self._answer(also)
        except grpc.aio.AioRpcError as exc:
            error = TurnError(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = TurnError(grpc.StatusCode.CANCELLED, "the state service is stopping")
            raise
        finally:
            self.ended = True
            self._fail_all(error)

    def _answer(self, answer: agent_pb2.TurnsResponse) -> None:
        future = self._owed.pop(answer.id, None)
        message_id = self._message_of.pop(answer.id, None) if self._message_of else None
        if future is None or future.done():
            # Its caller stopped waiting (the turn ran out of time, its driver was cancelled).
            # A reply it sent is recorded all the same: the next run of the turn would find a
            # send in flight and, without a status webhook, send it again.
            result = answer.result
            if (
                not answer.code
                and result.sent_unrecorded
                and result.reply_message_id
                and message_id
                and self._unclaimed is not None
            ):
                self._unclaimed(message_id, result.reply_message_id)
            return
        if answer.code:
            code = _CODES.get(answer.code, grpc.StatusCode.UNKNOWN)
            future.set_exception(TurnError(code, answer.details))
        else:
            future.set_result(answer.result)

    def _fail_all(self, error: TurnError) -> None:
        self.ended = True
        self._outbox.clear()
        owed, self._owed = self._owed, {}
        for future in owed.values():
            if not future.done():
                future.set_exception(error)

    def cancel(self) -> None:
        self._call.cancel()


def _request(batch: list[_Queued]) -> agent_pb2.TurnsRequest:
    """The first turn in the message's own fields, the others in its `more`."""
    (turn_id, turn, timeout, traceparent), *rest = batch
    request = agent_pb2.TurnsRequest(
        id=turn_id, turn=turn, timeout_seconds=timeout, traceparent=traceparent
    )
    for turn_id, turn, timeout, traceparent in rest:
        request.more.add(id=turn_id, turn=turn, timeout_seconds=timeout, traceparent=traceparent)
    return request


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
        self.width = width
        self.call_seconds = call_seconds
        self.call_turns = call_turns
        # A call's own deadline: it takes turns for call_seconds, then its last turn (whose own
        # deadline the agent keeps) must end; this only bounds a call that somehow does not.
        self.call_timeout = call_timeout
        self._slots: list[_Call | None] = [None] * width
        self._next = 0
        self._last: _Call | None = None
        self._ids = itertools.count(1)
        # The turns awaiting an answer, each until its own timeout and ANSWER_GRACE.
        self._deadlines = Deadlines(WATCH_SECONDS)

    async def turn(
        self, turn: agent_pb2.ReplyRequest, timeout: float, traceparent: str
    ) -> agent_pb2.ReplyResponse:
        """The turn's answer; raises TurnError with the status its turn (or call) ended with."""
        turn_id = next(self._ids)
        call = self._call()
        future = call.send(turn_id, turn, timeout, traceparent)
        # An asyncio.timeout per turn cost more than the rest of sending the turn
        # (common/deadlines.py).
        try:
            return await self._deadlines.wait(future, timeout + ANSWER_GRACE, _late)
        finally:
            call.forget(turn_id)

    def _call(self) -> _Call:
        # A turn joins the turns still queued on the last call, to go in their message; the
        # rotation moves on once they are written, so messages, not turns, take turns.
        last = self._last
        if last is not None and last.more and last.queued and self._open(last):
            return last
        slot = self._next
        self._next = (slot + 1) % self.width
        call = self._slots[slot]
        if call is not None and not call.ended:
            if self._open(call):
                self._last = call
                return call
            call.retire()
        call = _Call(self.stub, self.call_timeout, self.unclaimed)
        self._slots[slot] = call
        self._last = call
        return call

    def _open(self, call: _Call) -> bool:
        """The call still takes turns: young enough, not full, not retired nor ended."""
        return (
            not call.ended
            and not call.retired
            and call.turns < self.call_turns
            and time.monotonic() - call.opened < self.call_seconds
        )

    def close(self) -> None:
        """Ends every call (the turns still owed fail as CANCELLED)."""
        self._deadlines.close()
        for call in self._slots:
            if call is not None:
                call.cancel()
        self._slots = [None] * self.width
        self._last = None
