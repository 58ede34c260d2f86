"""The gateway's HTTP connections against slow or oversized requests (slowloris).

uvicorn bounds how long a connection may sit idle between two requests (keep-alive), but not
how long a client may take to send a request's headers, nor its body: a client that sends a
byte a second holds a connection, and a slot of the concurrency limit, for as long as it
likes. This protocol (uvicorn's httptools one, passed as `Config(http=...)`) closes a
connection whose request line and headers are not complete within the header timeout of its
opening or of its previous response, answers 431 to headers larger than the limit, and 408
to a body not complete within the body timeout of its headers.

One timer a connection, not one a deadline: each phase (headers, body, keep-alive idle) only
writes its deadline, and the timer, when it fires, closes what is past its deadline or sleeps
again until the nearest one. Deadlines only move later on a healthy connection, so a request
arms no timer at all (three a request, armed and cancelled, cost the acknowledgement's
throughput several per cent: docs/benchmarks.md). uvicorn's own keep-alive timer is folded in
the same way, with its meaning kept: idle `timeout_keep_alive` seconds after a response, the
connection is closed.

Liveness (`/healthz`) is exempt from the concurrency limit: a flood that fills it must not get
the gateway restarted by its liveness probe, which would drop every connection, Meta's too, and
move the flood to the other replicas. It answers a constant, with no I/O, so the exemption
frees nothing a flood could use. Readiness and `/metrics` stay under the limit: a gateway
answering 503 to deliveries should leave the rotation, and metrics are work.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httptools
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

CLOSED = Counter(
    "wa_gateway_connections_refused_total",
    "Connections closed for a slow or oversized request",
    ["reason"],
)

# What a connection waits for, and so which deadline applies.
_NOTHING = 0  # a request is being answered: no deadline
_HEADERS = 1  # a request line and headers, within the header timeout
_BODY = 2  # the rest of a body, within the body timeout
_NEVER = math.inf
# Answered whatever the concurrency limit (module docstring): the probe's request, no query.
UNLIMITED_PATHS = frozenset({b"/healthz"})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _NOTHING
        self._deadline = _NEVER  # of the phase
        self._header_bytes = 0
        # Keep-alive: no byte since the last response, closed at `_idle_deadline`.
        self._idle = False
        self._idle_deadline = _NEVER
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._await_headers(self.loop.time())

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, minus its keep-alive timer (never armed here), plus the header bytes.
        self._idle = False
        counting = self._phase == _HEADERS
        if counting:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        # Still reading headers after more than the limit: they are larger than it (a body
        # that arrived in the same read as its headers is never counted against them).
        if counting and self._phase == _HEADERS and self._header_bytes > self.max_header_bytes:
            self._refuse(431, "header_too_large")

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        deadline = self._deadline = self.loop.time() + self.body_timeout
        if deadline < self._timer_at:
            self._arm(deadline)
        if self.limit_concurrency is not None and self.url in UNLIMITED_PATHS:
            # uvicorn checks its limit inside on_headers_complete: lifted for this request.
            limit, self.limit_concurrency = self.limit_concurrency, None
            try:
                super().on_headers_complete()
            finally:
                self.limit_concurrency = limit
        else:
            super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # (not an upgrade)
            cycle.transport = OneWrite(self.transport)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._phase = _NOTHING
        answered = self.cycle is not None and self.cycle.response_complete
        super().on_message_complete()
        # Answered before its body was read (413): the next request starts now.
        if answered and not self.pipeline and not self.transport.is_closing():
            self._await_headers(self.loop.time())

    def on_response_complete(self) -> None:
        # uvicorn's, with its keep-alive timer replaced by a deadline of this one's.
        cycle = self.cycle
        if cycle is not None and isinstance(cycle.transport, OneWrite):
            cycle.transport.flush()  # a response without a body (HEAD)
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            # A pipelined request waiting has its headers already.
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        now = self.loop.time()
        self._idle = True
        self._idle_deadline = now + self.timeout_keep_alive
        # A body still arriving (answered early, 413) is not the next request's headers.
        if self.cycle is None or not self.cycle.more_body:
            self._await_headers(now)
        elif self._idle_deadline < self._timer_at:
            self._arm(self._idle_deadline)

    def _await_headers(self, now: float) -> None:
        self._phase = _HEADERS
        self._header_bytes = 0
        deadline = self._deadline = now + self.header_timeout
        if self._idle and self._idle_deadline < deadline:
            deadline = self._idle_deadline
        if deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, at: float) -> None:
        """The timer fires at `at` (earlier than it would have)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(at, self._check)
        self._timer_at = at

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = _NEVER

    def _check(self) -> None:
        """The timer fired: close what is past its deadline, else sleep until the nearest."""
        self._timer = None
        self._timer_at = _NEVER
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._idle and now >= self._idle_deadline:
            # Keep-alive expired, as uvicorn's own timer would have closed it.
            self.transport.close()
            return
        if self._phase != _NOTHING and now >= self._deadline:
            if self._phase == _HEADERS:
                self._headers_timed_out()
            else:
                self._body_timed_out()
            return
        nearest = min(
            self._idle_deadline if self._idle else _NEVER,
            self._deadline if self._phase != _NOTHING else _NEVER,
        )
        if nearest != _NEVER:
            self._arm(nearest)

    def _headers_timed_out(self) -> None:
        # Nothing to answer: the request is not even known yet.
        CLOSED.labels("header_timeout").inc()
        self._phase = _NOTHING
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._phase = _NOTHING
        cycle = self.cycle
        if cycle is None or not cycle.more_body:
            return
        if cycle.response_started:
            CLOSED.labels("body_timeout").inc()
            self.transport.close()
        else:
            self._refuse(408, "body_timeout")

    def _refuse(self, status: int, reason: str) -> None:
        """Answers `status` and closes the connection; the request in progress, if any, sees
        its client gone (its own answer is dropped)."""
        CLOSED.labels(reason).inc()
        self._cancel_timer()
        self._phase = _NOTHING
        self._idle = False
        body = reason.encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()


# What uvicorn writes before a response when a client asked for it: it must not wait.
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class OneWrite:
    """A response's view of its connection: the status line and headers go out with the
    body's first part, in one system call instead of two (uvicorn writes each ASGI message as
    it comes; a system call costs more than the copy). Whatever comes after passes through."""

    __slots__ = ("_held", "_passing", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held = b""  # the status line and headers, until the body's first part
        self._passing = False

    def write(self, data: bytes) -> None:
        if self._passing:
            self._transport.write(data)
        elif self._held:
            self._passing = True
            self._transport.write(self._held + data)
            self._held = b""
        elif data == _CONTINUE:
            self._transport.write(data)
        else:
            self._held = data

    def flush(self) -> None:
        """Writes what is held (a response without a body: HEAD)."""
        self._passing = True
        if self._held:
            self._transport.write(self._held)
            self._held = b""

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol(
    *, header_timeout: float, body_timeout: float, max_header_bytes: int
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with these limits."""
    return type(
        "GatewayHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "max_header_bytes": max_header_bytes,
        },
    )
