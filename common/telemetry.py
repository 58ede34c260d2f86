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
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import (
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.trace import Span

from . import logs

if TYPE_CHECKING:
    from fastotel.lean_span import LeanTracer

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
# The provider installed by init_telemetry, its processor chain and limits, and whether the
# fast path (`fastotel`) is on (for request_tracer).
_pipeline: tuple[TracerProvider, SynchronousMultiSpanProcessor, SpanLimits, bool] | None = None


def export_enabled() -> bool:
    return (
        bool(
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
    )


def init_telemetry(service_name: str, *, fast_path: bool = True) -> None:
    """Installs the tracer provider and library instrumentation (idempotent). `fast_path`:
    export with `fastotel`'s encoder and let `request_tracer` give lean spans; off, the stock
    SDK exporter and spans, and `fastotel` (which uses private SDK modules) is never loaded."""
    global _initialised
    if _initialised:
        return
    _initialised = True
    if not export_enabled():
        return
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    class FrozenResource(Resource):
        """The SDK hashes a resource by dumping its attributes to JSON, and the OTLP encoder
        hashes it once per exported span; a resource never changes, so hash it once."""

        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    created = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    global _pipeline
    processors = SynchronousMultiSpanProcessor()
    limits = SpanLimits()
    provider = TracerProvider(
        resource=FrozenResource(created.attributes, created.schema_url),
        active_span_processor=processors,
        span_limits=limits,
    )
    exporter: SpanExporter
    if fast_path:
        from fastotel.span_encoding import LeanOTLPSpanExporter

        exporter = LeanOTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(CorrelationSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _pipeline = (provider, processors, limits, fast_path)
    AsyncPGInstrumentor().instrument()
    RedisInstrumentor().instrument()
    AioHttpClientInstrumentor().instrument()


def request_tracer(scope: str) -> LeanTracer | trace.Tracer:
    """For the one span per request on the acknowledgement's path: a `LeanTracer` over the
    provider `init_telemetry` installed (export must be enabled), or that provider's own SDK
    tracer when the fast path is off."""
    if _pipeline is None:
        raise RuntimeError("init_telemetry() has not installed a tracer provider")
    provider, processors, limits, fast_path = _pipeline
    if not fast_path:
        return provider.get_tracer(scope)
    from fastotel.lean_span import LeanTracer

    return LeanTracer(
        resource=provider.resource,
        sampler=provider.sampler,
        id_generator=provider.id_generator,
        limits=limits,
        processor=processors,
        scope=scope,
    )


def shutdown_telemetry() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def new_correlation_id() -> str:
    # 32 random hex digits, as uuid4().hex gave, at a seventh of its cost (one per delivery).
    return os.urandom(16).hex()


class _Tracer(trace.Tracer):
    """`trace.get_tracer`'s tracer, minus its cost while no provider is installed (tracing off,
    every service's default): the API's no-op then opens two generator context managers and
    attaches a context per span only to leave the current, non-recording span current, and
    that is what this yields, with nothing attached. Once a provider is installed it is the
    API's tracer throughout."""

    def __init__(self, name: str) -> None:
        self._tracer = trace.get_tracer(name)

    def start_span(self, *args: Any, **kwargs: Any) -> Span:
        return self._tracer.start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        if trace._TRACER_PROVIDER is None:
            span = trace.get_current_span()
            if not span.is_recording():
                return contextlib.nullcontext(span)
        return self._tracer.start_as_current_span(*args, **kwargs)


def tracer(name: str) -> trace.Tracer:
    return _Tracer(name)


def traceparent_of(span: Span) -> str:
    """The W3C traceparent naming `span` (what propagate.inject writes, without the
    propagator machinery, which costs the acknowledgement more)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


@contextlib.contextmanager
def continued(name: str, traceparent: str, correlation_id: str, **attributes: str | int) -> Any:
    """A span continuing a message's trace from its stored traceparent, with the correlation id
    in the log context and the baggage (so the next gRPC hops carry it)."""
    cid_token = logs.correlation_id.set(correlation_id)
    if trace._TRACER_PROVIDER is None:
        # Tracing off: no span, no baggage (nothing reads it), only the log context; the
        # API's no-op would still extract, attach and start a non-recording span per turn.
        try:
            yield trace.INVALID_SPAN
        finally:
            logs.correlation_id.reset(cid_token)
        return
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
    """A fresh context (nothing of the caller's, so not its `untraced()` either) holding the
    remote parent a traceparent names."""
    carrier = {"traceparent": traceparent} if traceparent else {}
    return propagate.extract(carrier, context=otel_context.Context())


def untraced() -> contextlib.AbstractContextManager[object]:
    """No spans for the work inside: housekeeping that belongs to no message (polling, leases,
    sweeps, gauges) would otherwise fill the tracing UI with one-span traces. A message's own
    work inside it opens its span with `continued()`, which does trace.

    While tracing is off (no tracer provider, the check `continued()` makes) nothing is traced
    anyway: attaching a context to say so would cost every conversation driver and batch a few
    µs for nothing."""
    if trace._TRACER_PROVIDER is None:
        return contextlib.nullcontext()
    return suppress_instrumentation()  # type: ignore[no-any-return]


def trace_id_of(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else ""


def annotate(span: Span, **attributes: str | int) -> None:
    if not span.is_recording():
        return  # a non-recording span keeps no attribute
    for key, value in attributes.items():
        if value not in ("", None):
            span.set_attribute(key if key.startswith("wa.") else f"wa.{key}", value)


# The correlation id travels in every internal request that concerns a message (and, with
# tracing on, in the span attributes and baggage); no interceptor of ours sits on the hot path.


# Health checks are not traced, nor IngestBatch and Ingests: one group-committed call stores
# deliveries of many traces (each delivery's context travels in its own `traceparent` field, and
# its trace goes on from there when its turn starts); the gateway's request span covers the
# call. Spans per delivery in the state service cost the acknowledgement about a tenth of its
# p50 on their own (`python -m bench.ack tracing`).
UNTRACED_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/wa.v1.State/IngestBatch",
        "/wa.v1.State/Ingests",
        # One call carries the turns of many messages; each turn continues its own trace from
        # its request's traceparent (services/agent/server.py, Turns).
        "/wa.v1.Agent/Turns",
        # Readiness probes (the gateway's /readyz, `wa health`).
        "/wa.v1.State/CheckDependencies",
        "/wa.v1.State/GetSystemHealth",
        "/wa.v1.Agent/GetStatus",
    }
)


def _traced_calls() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*map(filters.full_method_name, UNTRACED_METHODS)))


def server_interceptors() -> list[Any]:
    if not export_enabled():
        return []
    import grpc
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    traced = aio_server_interceptor()

    class SkipUntraced(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        """Untraced methods run their handler `untraced()`, database and Redis calls included;
        the others go through the OTel interceptor. (A set lookup: the interceptor's own filter
        chain costs a handful of Python calls per RPC, on the acknowledgement's path too.)"""

        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            if details.method not in UNTRACED_METHODS:
                return await traced.intercept_service(continuation, details)
            handler = await continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler
            inner = handler.unary_unary

            async def quiet(request: Any, context: Any) -> Any:
                with untraced():
                    return await inner(request, context)

            return handler._replace(unary_unary=quiet)

    return [SkipUntraced()]


def client_interceptors() -> list[Any]:
    interceptors: list[Any] = []
    if export_enabled():
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors.extend(aio_client_interceptors(filter_=_traced_calls()))
    return interceptors
