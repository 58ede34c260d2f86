"""OpenTelemetry set-up, once per process, and the correlation id on every span.

With no `OTEL_EXPORTER_OTLP_*ENDPOINT` set, the global no-op tracer stays in place: nothing is
exported and instrumentation costs next to nothing. With one set, every span (our own and the
instrumented gRPC, asyncpg, Redis and HTTP ones) gets `wa.correlation_id` from the baggage or
the log context, and work started later continues the message's trace from the traceparent
stored with it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import Span

from . import logs

ATTR_CORRELATION = "wa.correlation_id"


class CorrelationSpanProcessor(SpanProcessor):
    """Stamps every span with the correlation id of the work it belongs to."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        cid = baggage.get_baggage(ATTR_CORRELATION, parent_context) or logs.correlation_id.get()
        if cid:
            span.set_attribute(ATTR_CORRELATION, str(cid))

    def on_end(self, span: ReadableSpan) -> None:
        pass


def with_correlation(correlation_id: str, ctx: otel_context.Context | None = None) -> Any:
    """A context whose baggage carries the correlation id to the next hops."""
    return baggage.set_baggage(ATTR_CORRELATION, correlation_id, ctx)


_initialised = False


def export_enabled() -> bool:
    return (
        bool(
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
    )


def init_telemetry(service_name: str) -> None:
    """Installs the tracer provider and library instrumentation (idempotent)."""
    global _initialised
    if _initialised:
        return
    _initialised = True
    if not export_enabled():
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(CorrelationSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument()
    RedisInstrumentor().instrument()
    AioHttpClientInstrumentor().instrument()


def shutdown_telemetry() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_traceparent() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@contextlib.contextmanager
def continued(name: str, traceparent: str, correlation_id: str, **attributes: str | int) -> Any:
    """A span continuing a message's trace from its stored traceparent, with the correlation id
    in the log context and the baggage (so the next gRPC hops carry it)."""
    cid_token = logs.correlation_id.set(correlation_id)
    ctx = with_correlation(correlation_id, context_from_traceparent(traceparent))
    token = otel_context.attach(ctx)
    try:
        with trace.get_tracer("wa").start_as_current_span(name) as span:
            annotate(span, correlation_id=correlation_id, **attributes)
            yield span
    finally:
        otel_context.detach(token)
        logs.correlation_id.reset(cid_token)


def context_from_traceparent(traceparent: str) -> Any:
    return propagate.extract({"traceparent": traceparent} if traceparent else {})


def trace_id_of(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else ""


def annotate(span: Span, **attributes: str | int) -> None:
    for key, value in attributes.items():
        if value not in ("", None):
            span.set_attribute(key if key.startswith("wa.") else f"wa.{key}", value)


# The correlation id travels in every internal request that concerns a message (and, with
# tracing on, in the span attributes and baggage); no interceptor of ours sits on the hot path.


def _traced_calls() -> Any:
    """Every RPC but health checks, and but IngestBatch: a batch carries deliveries of many
    traces, so each delivery's context travels in its own `traceparent` field and the state
    service opens a `state.ingest` span in that trace (cheaper on the hot path, too)."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(
        filters.any_of(filters.health_check(), filters.full_method_name("/wa.v1.State/IngestBatch"))
    )


def server_interceptors() -> list[Any]:
    interceptors: list[Any] = []
    if export_enabled():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.append(aio_server_interceptor(filter_=_traced_calls()))
    return interceptors


def client_interceptors() -> list[Any]:
    interceptors: list[Any] = []
    if export_enabled():
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors.extend(aio_client_interceptors(filter_=_traced_calls()))
    return interceptors
