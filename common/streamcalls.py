"""Requests many to a call: a bidirectional streaming method used as a unary one, answered by id.

A unary call costs both processes more CPU than the work of a small request: the call's set-up,
its HTTP/2 stream, metadata, deadline and completion-queue events on each side. On this
project's 2-core machines, at 100 requests a second, a unary exchange cost about 1.4 ms of CPU
(client and server together) against about 0.85 ms for a message each way on an open stream
(`python -m bench.grpc_hop`). So each request goes as one message on a call that is already
open, and its answer comes back on it, with the request's id, whenever it is done: requests of
one call do not wait for each other, and a slow one holds up only itself.

Calls are short-lived on purpose: `width` calls are open for new requests at a time, messages
go to them in rotation, and each stops taking requests after `call_seconds` (or `call_items`)
and ends once its last request is answered. Every new call is placed by the channel's
`round_robin` on the next replica (common/balancing.py), so the requests keep spreading over
the server's replicas, and a replica that was added is used within `call_seconds`.

Requests queued at the same moment may go in one stream message (a message costs each side a
system call and a few wake-ups whatever it carries) when the server said, in its initial
metadata, that it reads several per message (`several`).

What can go wrong is what could go wrong with a unary call, per request: a call that breaks
fails each request it still owes with its status (UNAVAILABLE: the request may or may not have
been served; the caller decides whether it may be sent again); a request that gets no answer
within the seconds it was given fails with the caller's `late` error. The users:
services/state/turn_calls.py (`Agent.Turns`) and services/gateway/batcher.py (`State.Ingests`).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import grpc

from common.deadlines import Deadlines, Late

I = TypeVar("I")  # noqa: E741 (a request's payload, as the caller gives it)
A = TypeVar("A")  # an answer's payload, as the caller gets it

_CODES = {code.value[0]: code for code in grpc.StatusCode}
# What a server answers a call it will not serve at all, before reading a request.
_REFUSED = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


def _said(exc: Exception) -> str:
    """A failure in one line, as a message's recorded reason shows it to an operator: a gRPC
    error's code and details, without its multi-line repr and debug string."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details() or ''}"
    return repr(exc)


class CallError(Exception):
    """The request's call, or the server for this request, ended with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# Opens a call of the streaming method (with its own deadline and request metadata).
Open = Callable[[], Any]
# The stream message carrying these (id, payload) requests, in order.
Pack = Callable[[list[tuple[int, I]]], Any]
# The (id, code, details, answer) of each request a stream message answers (code 0: OK).
Unpack = Callable[[Any], Iterable[tuple[int, int, str, A | None]]]
# Whether the server, by its initial metadata, reads several requests per message.
Several = Callable[[Any], bool]
# Called with the request and its answer when the answer came after its caller stopped waiting.
Orphan = Callable[[I, A], None]


class _Call(Generic[I, A]):
    """One open call: a writer that sends what queues, a reader that answers requests."""

    def __init__(self, owner: StreamCalls[I, A]) -> None:
        self.owner = owner
        self.opened = time.monotonic()
        self.items = 0
        self.retired = False
        self.ended = False
        # Several requests a message only once the server's initial metadata said so.
        self.several = False
        self._call = owner.open_call()
        self._owed: dict[int, asyncio.Future[A]] = {}
        # Each request, until its answer comes, however late (for `orphan`).
        self._sent: dict[int, I] = {}
        self._outbox: deque[tuple[int, I]] = deque()
        self._writer: asyncio.Task[None] | None = None
        # Fresh contexts: the call serves many requests and belongs to none of their traces.
        self._reader = asyncio.create_task(
            self._read(), name=f"{owner.name}-reader", context=contextvars.Context()
        )
        # Retired when its time to take requests is over, used or not: an idle call left open
        # would hold its server's graceful stop until the call's own deadline.
        self._retiring = asyncio.get_running_loop().call_later(owner.call_seconds, self.retire)

    @property
    def queued(self) -> bool:
        """Requests wait for the writer: one queued now goes in the same message as them."""
        return bool(self._outbox)

    def send(self, request_id: int, item: I) -> asyncio.Future[A]:
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._owed[request_id] = future
        if self.owner.orphan is not None:
            self._sent[request_id] = item
        self._outbox.append((request_id, item))
        self.items += 1
        self._start_writer()
        return future

    def forget(self, request_id: int) -> None:
        self._owed.pop(request_id, None)

    def retire(self) -> None:
        """Takes no more requests; the call ends once the requests it carries are answered."""
        if not self.retired:
            self.retired = True
            self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(
                self._write(), name=f"{self.owner.name}-writer", context=contextvars.Context()
            )

    async def _write(self) -> None:
        try:
            while self._outbox:
                # What is queued goes in one message when the server reads several; what
                # queues during the write goes in the next.
                if self.several:
                    batch = list(self._outbox)
                    self._outbox.clear()
                else:
                    batch = [self._outbox.popleft()]
                await self._call.write(self.owner.pack(batch))
            if self.retired and not self.ended:
                await self._call.done_writing()
        except Exception as exc:  # any failure to write fails the call's requests
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _REFUSED:
                # The server refused the call itself, before reading anything: as the reader
                # has it (a caller falls back, or stops), not taken for a broken call.
                self._fail_all(CallError(exc.code(), exc.details() or ""))
                return
            # A request whose write failed may have reached the server: like a unary call
            # lost mid-way, it is "unavailable". (Not the write's own status: a write that
            # meets the call's end can make grpc record INTERNAL for a call that only broke.)
            self._fail_all(CallError(grpc.StatusCode.UNAVAILABLE, f"sending it: {_said(exc)}"))

    async def _read(self) -> None:
        error = CallError(grpc.StatusCode.UNAVAILABLE, "the call ended without answering")
        try:
            self.several = self.owner.several(await self._call.initial_metadata())
            async for response in self._call:
                for request_id, code, details, answer in self.owner.unpack(response):
                    self._answer(request_id, code, details, answer)
        except grpc.aio.AioRpcError as exc:
            error = CallError(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = CallError(grpc.StatusCode.CANCELLED, "the caller is stopping")
            raise
        finally:
            self.ended = True
            self._retiring.cancel()
            self._fail_all(error)

    def _answer(self, request_id: int, code: int, details: str, answer: A | None) -> None:
        future = self._owed.pop(request_id, None)
        item = self._sent.pop(request_id, None) if self._sent else None
        if future is None or future.done():
            # Its caller stopped waiting (out of time, cancelled).
            if not code and answer is not None and item is not None and self.owner.orphan:
                self.owner.orphan(item, answer)
            return
        if code:
            future.set_exception(CallError(_CODES.get(code, grpc.StatusCode.UNKNOWN), details))
        else:
            future.set_result(answer)  # type: ignore[arg-type]

    def _fail_all(self, error: CallError) -> None:
        self.ended = True
        self._outbox.clear()
        owed, self._owed = self._owed, {}
        for future in owed.values():
            if not future.done():
                future.set_exception(error)

    def cancel(self) -> None:
        self._retiring.cancel()
        self._call.cancel()


class StreamCalls(Generic[I, A]):
    """Sends requests on `width` rotating calls of one streaming method (module docstring).

    `open_call` opens a call (bounded by its own deadline: it takes requests for
    `call_seconds`, then its last request must end; the deadline only bounds a call that somehow
    does not); `pack` makes one stream message of queued requests, `unpack` reads the answers a
    message carries; `several` reads the server's initial metadata; `orphan` gets the answers
    of requests whose callers stopped waiting; `watch_seconds` is how late a request past its
    time may fail."""

    def __init__(
        self,
        name: str,
        open_call: Open,
        pack: Pack[I],
        unpack: Unpack[A],
        *,
        width: int,
        call_seconds: float,
        call_items: int = 1024,
        several: Several = lambda metadata: False,
        orphan: Orphan[I, A] | None = None,
        watch_seconds: float = 0.1,
    ) -> None:
        self.name = name
        self.open_call = open_call
        self.pack = pack
        self.unpack = unpack
        self.several = several
        self.orphan = orphan
        self.width = width
        self.call_seconds = call_seconds
        self.call_items = call_items
        self._slots: list[_Call[I, A] | None] = [None] * width
        self._next = 0
        self._last: _Call[I, A] | None = None
        self._ids = itertools.count(1)
        # The requests awaiting an answer, each until its own time (common/deadlines.py: an
        # asyncio.timeout per request cost more than the rest of sending it).
        self._deadlines = Deadlines(watch_seconds)

    async def ask(self, item: I, seconds: float, late: Late) -> A:
        """The request's answer; raises CallError with the status its request (or call) ended
        with, or `late(seconds)` when none came within `seconds`."""
        request_id = next(self._ids)
        call = self._call()
        future = call.send(request_id, item)
        try:
            return await self._deadlines.wait(future, seconds, late)
        finally:
            call.forget(request_id)

    def _call(self) -> _Call[I, A]:
        # A request joins the ones still queued on the last call, to go in their message; the
        # rotation moves on once they are written, so messages, not requests, take turns.
        last = self._last
        if last is not None and last.several and last.queued and self._open(last):
            return last
        slot = self._next
        self._next = (slot + 1) % self.width
        call = self._slots[slot]
        if call is not None and not call.ended:
            if self._open(call):
                self._last = call
                return call
            call.retire()
        call = _Call(self)
        self._slots[slot] = call
        self._last = call
        return call

    def _open(self, call: _Call[I, A]) -> bool:
        """The call still takes requests: young enough, not full, not retired nor ended."""
        return (
            not call.ended
            and not call.retired
            and call.items < self.call_items
            and time.monotonic() - call.opened < self.call_seconds
        )

    def close(self) -> None:
        """Ends every call (the requests still owed fail as CANCELLED)."""
        self._deadlines.close()
        for call in self._slots:
            if call is not None:
                call.cancel()
        self._slots = [None] * self.width
        self._last = None
