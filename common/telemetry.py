"""OpenTelemetry set-up, once per process, and the correlation id carried across gRPC hops.

With no `OTEL_EXPORTER_OTLP_*ENDPOINT` set, the global no-op tracer stays in place: nothing is
exported and instrumentation costs next to nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span

from . import logs

CORRELATION_HEADER = "x-correlation-id"
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


def _is_health(method: str) -> bool:
    return method.startswith("/grpc.health.v1.") or method.startswith("/grpc.reflection.")


class CorrelationServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Puts the caller's correlation id in the log context and on the server span."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == CORRELATION_HEADER:
                logs.correlation_id.set(str(value))
                break
        else:
            logs.correlation_id.set("")
        return await continuation(handler_call_details)


class _CorrelationClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        cid = logs.correlation_id.get()
        if cid:
            metadata = list(client_call_details.metadata or [])
            metadata.append((CORRELATION_HEADER, cid))
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                grpc.aio.Metadata(*metadata),
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


def server_interceptors() -> list[Any]:
    interceptors: list[Any] = []
    if export_enabled():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        interceptors.append(aio_server_interceptor(filter_=filters.negate(filters.health_check())))
    interceptors.append(CorrelationServerInterceptor())
    return interceptors


def client_interceptors() -> list[Any]:
    interceptors: list[Any] = [_CorrelationClientInterceptor()]
    if export_enabled():
        from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

        interceptors.extend(aio_client_interceptors(filter_=filters.negate(filters.health_check())))
    return interceptors
