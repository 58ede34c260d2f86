"""One SERVER span per HTTP request, continuing a `traceparent` the caller sent only once the
request proved to come from Meta.

This replaces opentelemetry-instrumentation-asgi on the gateway: that middleware cost several
times more per request (collecting a dozen attributes, wrapping receive and send, recording its
own metrics; figures in docs/benchmarks.md), and less again with the lean span of
`fastotel.lean_span`; the acknowledgement's p50 is budgeted at 5 % for all of tracing
(`python -m bench.ack tracing`). The span follows the stable HTTP semantic conventions, with
the attributes an operator searches by. Only for a process whose `init_telemetry` installed a
tracer provider (the gateway adds it when export is on).

Anyone on the internet can send a `traceparent`: honoured before the signature is checked, it
would let an unauthenticated caller choose trace ids (and sampling) of our traces, or attach
our spans to a trace of theirs. So the span is started only when the handler says whether the
caller is trusted (`trust`, after the signature checked out), with the request's start time;
a request the handler never vouched for gets a root span of its own when it ends.
"""

from __future__ import annotations

import time
from contextvars import Token
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import telemetry

if TYPE_CHECKING:
    from fastotel.lean_span import LeanTracer

_PROPAGATED = (b"traceparent", b"tracestate", b"baggage")
SCOPE_KEY = "wa.request_span"
_NO_PARENT = otel_context.Context()


class _RequestSpan:
    """A request's span, started late (once its caller is known trusted or not)."""

    __slots__ = ("scope", "span", "started_ns", "token", "tracer")

    def __init__(self, tracer: LeanTracer | trace.Tracer, scope: Scope) -> None:
        self.tracer = tracer
        self.scope = scope
        self.started_ns = time.time_ns()
        self.span: trace.Span | None = None
        self.token: Token[otel_context.Context] | None = None

    def start(self, trusted: bool) -> trace.Span:
        if self.span is not None:
            return self.span
        parent = _NO_PARENT
        if trusted:
            carrier = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in self.scope["headers"]
                if name in _PROPAGATED
            }
            if carrier:
                parent = propagate.extract(carrier, context=_NO_PARENT)
        method: str = self.scope["method"]
        self.span = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": self.scope["path"]},
            start_time=self.started_ns,
        )
        return self.span


def trust(scope: Scope) -> None:
    """The caller of this request is authenticated: its span starts now, continuing the
    caller's `traceparent`, and is the current span for the rest of the request."""
    pending: _RequestSpan | None = scope.get(SCOPE_KEY)
    if pending is None or pending.span is not None:
        return
    span = pending.start(trusted=True)
    pending.token = otel_context.attach(trace.set_span_in_context(span, _NO_PARENT))


class RequestTracing:
    def __init__(self, app: ASGIApp, *, excluded_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.excluded_paths = excluded_paths
        self.tracer = telemetry.request_tracer(__name__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.excluded_paths:
            await self.app(scope, receive, send)
            return
        pending = _RequestSpan(self.tracer, scope)
        scope[SCOPE_KEY] = pending
        status = 0

        async def traced_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: Exception | None = None
        try:
            await self.app(scope, receive, traced_send)
        except Exception as exc:
            error = exc
            raise
        finally:
            if pending.token is not None:
                otel_context.detach(pending.token)
            span = pending.start(trusted=False)
            if error is not None:
                span.record_exception(error)
                span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
            # The router has matched by now: name the span after the route, not the URL.
            method: str = scope["method"]
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attributes({"http.route": route, "http.response.status_code": status})
            elif status:
                span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
            span.end()
