"""OpenTelemetry set-up, once per process, and the correlation id carried across gRPC hops.

With no `OTEL_EXPORTER_OTLP_*ENDPOINT` set, the global no-op tracer stays in place: nothing is
exported and instrumentation costs next to nothing.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span

ATTR_CORRELATION = "wa.correlation_id"

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
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument()
    RedisInstrumentor().instrument()
    HTTPXClientInstrumentor().instrument()


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


def server_interceptors() -> list[Any]:
    interceptors: list[Any] = []
    if export_enabled():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        interceptors.append(aio_server_interceptor(filter_=filters.negate(filters.health_check())))
    return interceptors


def client_interceptors() -> list[Any]:
    interceptors: list[Any] = []
    if export_enabled():
        from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

        interceptors.extend(aio_client_interceptors(filter_=filters.negate(filters.health_check())))
    return interceptors
