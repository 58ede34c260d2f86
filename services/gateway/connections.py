"""The gateway's HTTP connections against slow or oversized requests (slowloris).

uvicorn bounds how long a connection may sit idle between two requests (keep-alive), but not
how long a client may take to send a request's headers, nor its body: a client that sends a
byte a second holds a connection, and a slot of the concurrency limit, for as long as it
likes. This protocol (uvicorn's httptools one, passed as `Config(http=...)`) closes a
connection whose request line and headers are not complete within the header timeout of its
opening or of its previous response, answers 431 to headers larger than the limit, and 408
to a body not complete within the body timeout of its headers. Two timers a request, armed
and cancelled on the event loop: nothing on the acknowledgement's path waits for them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

CLOSED = Counter(
    "wa_gateway_connections_refused_total",
    "Connections closed for a slow or oversized request",
    ["reason"],
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still reading headers after more than the limit: they are larger than it (a body
        # that arrived in the same read as its headers is never counted against them).
        if self._in_headers and self._header_bytes > self.max_header_bytes:
            self._refuse(431, "header_too_large")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        answered = self.cycle is not None and self.cycle.response_complete
        super().on_message_complete()
        # Answered before its body was read (413): the next request starts now.
        if answered and not self.pipeline and not self.transport.is_closing():
            self._await_headers()

    def on_response_complete(self) -> None:
        # A pipelined request waiting has its headers already: only an empty pipeline waits;
        # and a body still arriving (answered early, 413) is not the next request's headers.
        waiting = bool(self.pipeline) or (self.cycle is not None and self.cycle.more_body)
        super().on_response_complete()
        if not waiting and not self.transport.is_closing():
            self._await_headers()

    def _await_headers(self) -> None:
        self._in_headers = True
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            # Nothing to answer: the request is not even known yet.
            CLOSED.labels("header_timeout").inc()
            self._cancel_timers()
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
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
        self._cancel_timers()
        self._in_headers = False
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
