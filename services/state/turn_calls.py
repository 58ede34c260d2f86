"""The agent's turns, many to a call: `Agent.Turns` streams multiplexed by turn id.

A unary `Agent.Reply` per turn costs both processes more CPU than the rest of the call's work
(a call's set-up, its HTTP/2 stream, metadata, deadlines and completion-queue events on each
side: about 0.55 ms per turn, against about 0.2 ms for a message on an open stream, measured on
this project's 2-core machines). So each turn goes as one message on a `Turns` call that is
already open, and its answer comes back on it, whenever the turn ends: turns of one call do
not wait for each other, and a slow model holds up only its own turn.

Calls are short-lived on purpose: `width` calls are open for new turns at a time, turns go to
them in rotation, and each stops taking turns after `call_seconds` (or `call_turns`) and ends
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

import grpc
from wa.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

# How long past the turn's own deadline (which the agent keeps) the caller waits for its answer.
ANSWER_GRACE = 2.0

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class TurnError(Exception):
    """The turn's call, or the agent for this turn, ended with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _Call:
    """One open `Turns` call: a writer that sends what queues, a reader that answers turns."""

    def __init__(self, stub: agent_pb2_grpc.AgentStub, timeout: float) -> None:
        self.opened = time.monotonic()
        self.turns = 0
        self.retired = False
        self.ended = False
        self._call = stub.Turns(timeout=timeout)
        self._owed: dict[int, asyncio.Future[agent_pb2.ReplyResponse]] = {}
        self._outbox: deque[agent_pb2.TurnsRequest] = deque()
        self._writer: asyncio.Task[None] | None = None
        # Fresh contexts: the call serves many turns and belongs to none of their traces.
        self._reader = asyncio.create_task(
            self._read(), name="agent-turns-reader", context=contextvars.Context()
        )

    def send(self, request: agent_pb2.TurnsRequest) -> asyncio.Future[agent_pb2.ReplyResponse]:
        future: asyncio.Future[agent_pb2.ReplyResponse] = asyncio.get_running_loop().create_future()
        self._owed[request.id] = future
        self._outbox.append(request)
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
                await self._call.write(self._outbox.popleft())
            if self.retired and not self.ended:
                await self._call.done_writing()
        except Exception as exc:  # any failure to write fails the call's turns
            # A turn whose write failed may have reached the agent: like a unary call lost
            # mid-way, it is "unavailable", asked again under a new fencing token.
            self._fail_all(TurnError(grpc.StatusCode.UNAVAILABLE, f"sending the turn: {exc!r}"))

    async def _read(self) -> None:
        error = TurnError(grpc.StatusCode.UNAVAILABLE, "the call ended without answering")
        try:
            async for answer in self._call:
                future = self._owed.pop(answer.id, None)
                if future is None or future.done():
                    continue  # its caller stopped waiting
                if answer.code:
                    code = _CODES.get(answer.code, grpc.StatusCode.UNKNOWN)
                    future.set_exception(TurnError(code, answer.details))
                else:
                    future.set_result(answer.result)
        except grpc.aio.AioRpcError as exc:
            error = TurnError(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = TurnError(grpc.StatusCode.CANCELLED, "the state service is stopping")
            raise
        finally:
            self.ended = True
            self._fail_all(error)

    def _fail_all(self, error: TurnError) -> None:
        self.ended = True
        self._outbox.clear()
        owed, self._owed = self._owed, {}
        for future in owed.values():
            if not future.done():
                future.set_exception(error)

    def cancel(self) -> None:
        self._call.cancel()


class TurnCalls:
    """Sends turns on `width` rotating `Agent.Turns` calls (module docstring)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        width: int = 4,
        call_seconds: float = 1.0,
        call_turns: int = 1024,
        call_timeout: float = 600.0,
    ) -> None:
        self.stub = agent_pb2_grpc.AgentStub(channel)
        self.width = width
        self.call_seconds = call_seconds
        self.call_turns = call_turns
        # A call's own deadline: it takes turns for call_seconds, then its last turn (whose own
        # deadline the agent keeps) must end; this only bounds a call that somehow does not.
        self.call_timeout = call_timeout
        self._slots: list[_Call | None] = [None] * width
        self._next = 0
        self._ids = itertools.count(1)

    async def turn(
        self, turn: agent_pb2.ReplyRequest, timeout: float, traceparent: str
    ) -> agent_pb2.ReplyResponse:
        """The turn's answer; raises TurnError with the status its turn (or call) ended with."""
        turn_id = next(self._ids)
        call = self._call()
        future = call.send(
            agent_pb2.TurnsRequest(
                id=turn_id, turn=turn, timeout_seconds=timeout, traceparent=traceparent
            )
        )
        try:
            async with asyncio.timeout(timeout + ANSWER_GRACE):
                return await future
        except TimeoutError:
            raise TurnError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.1f} s"
            ) from None
        finally:
            call.forget(turn_id)

    def _call(self) -> _Call:
        slot = self._next
        self._next = (slot + 1) % self.width
        call = self._slots[slot]
        if call is not None and not call.ended:
            if call.turns < self.call_turns and time.monotonic() - call.opened < self.call_seconds:
                return call
            call.retire()
        call = _Call(self.stub, self.call_timeout)
        self._slots[slot] = call
        return call

    def close(self) -> None:
        """Ends every call (the turns still owed fail as CANCELLED)."""
        for call in self._slots:
            if call is not None:
                call.cancel()
        self._slots = [None] * self.width
