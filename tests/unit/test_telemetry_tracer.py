"""common.telemetry.tracer: with no tracer provider installed, a span is the API's no-op one
(the current span stays current, nothing is recorded) at a fraction of its cost; with one,
the provider's spans as ever."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common import telemetry

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_without_a_provider_the_current_span_stays_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    tracer = telemetry.tracer("t")
    api = trace.get_tracer("api")
    token = otel_context.attach(telemetry.context_from_traceparent(PARENT))
    try:
        outer = trace.get_current_span()
        with tracer.start_as_current_span("x") as span, api.start_as_current_span("y") as ref:
            assert span is outer is ref is trace.get_current_span()
            assert not span.is_recording()
            telemetry.annotate(span, correlation_id="c")  # nothing to keep, nothing raised
        assert trace.get_current_span() is outer
    finally:
        otel_context.detach(token)
    with tracer.start_as_current_span("z") as span:
        assert span is trace.INVALID_SPAN


def test_with_a_provider_spans_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    tracer = telemetry.tracer("t")
    with tracer.start_as_current_span("agent.model") as span:
        assert trace.get_current_span() is span and span.is_recording()
        telemetry.annotate(span, correlation_id="c", agent_type="")
    (done,) = exporter.get_finished_spans()
    assert done.name == "agent.model" and dict(done.attributes or {}) == {"wa.correlation_id": "c"}
