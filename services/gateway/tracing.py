"""One SERVER span per HTTP request, continuing a `traceparent` the caller sent.

This replaces opentelemetry-instrumentation-asgi on the gateway: that middleware cost several
times more per request (collecting a dozen attributes, wrapping receive and send, recording its
own metrics; figures in README, Benchmarks), and less again with the lean span of
`fastotel.lean_span`; the acknowledgement's p50 is budgeted at 15 % for all of tracing
(`python -m bench.ack tracing`). The span follows the stable HTTP semantic conventions, with
the attributes an operator searches by. Only for a process whose `init_telemetry` installed a
tracer provider (the gateway adds it when export is on).
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import telemetry

_PROPAGATED = (b"traceparent", b"tracestate", b"baggage")


class RequestTracing:
    def __init__(self, app: ASGIApp, *, excluded_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.excluded_paths = excluded_paths
        self.tracer = telemetry.request_tracer(__name__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.excluded_paths:
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _PROPAGATED
        }
        parent = propagate.extract(carrier) if carrier else None
        method: str = scope["method"]
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        status = 0

        async def traced_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, traced_send)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            otel_context.detach(token)
            # The router has matched by now: name the span after the route, not the URL.
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attributes({"http.route": route, "http.response.status_code": status})
            elif status:
                span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
            span.end()
