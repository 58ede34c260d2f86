"""Our OTLP span encoder writes exactly the bytes the SDK's encoder writes, for any span."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from fastotel.span_encoding import LeanOTLPSpanExporter, SpanEncoder
from tests.support.otlp import OtlpReceiver


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


KEEP = Keep()
PROVIDERS = [
    TracerProvider(resource=Resource.create({"service.name": "gateway"})),
    TracerProvider(
        resource=Resource({"service.name": "state", "host.cores": 2}, schema_url="https://s/1"),
        span_limits=SpanLimits(max_span_attributes=3, max_events=1, max_links=1),
    ),
]
for _provider in PROVIDERS:
    _provider.add_span_processor(SimpleSpanProcessor(KEEP))
TRACERS = [
    p.get_tracer(name, version, schema_url)
    for p in PROVIDERS
    for name, version, schema_url in (("a", None, None), ("b", "1.2", "https://schema/2"))
]

scalars = (
    st.text(max_size=20)
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.sampled_from(["POST", "/webhook", "", "wamid.HBgL=="])
    | st.sampled_from([0, 1, 200, True, False, 0.0, -0.0])
)
values = scalars | st.lists(st.text(max_size=5), max_size=3) | st.lists(st.integers(), max_size=3)
attributes = st.dictionaries(
    st.sampled_from(["", "k", "http.route", "wa.stored", "x" * 200]) | st.text(max_size=8),
    values,
    max_size=6,
)
ids = st.integers(min_value=1, max_value=2**64 - 1)
STATUSES = [None, Status(StatusCode.OK), Status(StatusCode.ERROR), Status(StatusCode.ERROR, "x")]
trace_states = st.sampled_from([TraceState(), TraceState([("vendor", "v1"), ("b", "2")])])


@st.composite
def parents(draw: st.DrawFn) -> SpanContext | None:
    if draw(st.booleans()):
        return None
    return SpanContext(
        trace_id=draw(st.integers(min_value=1, max_value=2**128 - 1)),
        span_id=draw(ids),
        is_remote=draw(st.booleans()),
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=draw(trace_states),
    )


@st.composite
def span_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "tracer": draw(st.integers(0, len(TRACERS) - 1)),
        "name": draw(st.text(max_size=12)),
        "kind": draw(st.sampled_from(list(SpanKind))),
        "parent": draw(parents()),
        "attributes": draw(attributes),
        "later": draw(attributes),
        "events": draw(st.lists(st.tuples(st.text(max_size=6), attributes), max_size=2)),
        "links": draw(st.lists(st.tuples(parents(), attributes), max_size=2)),
        "status": draw(st.sampled_from(STATUSES)),
        "times": draw(st.tuples(st.integers(0, 2**63), st.integers(0, 2**63))),
    }


def make_spans(specs: list[dict[str, Any]]) -> list[ReadableSpan]:
    KEEP.spans.clear()
    for spec in specs:
        parent = spec["parent"]
        context = set_span_in_context(NonRecordingSpan(parent)) if parent else None
        links = [Link(ctx, attrs) for ctx, attrs in spec["links"] if ctx is not None]
        start, end = sorted(spec["times"])
        span = TRACERS[spec["tracer"]].start_span(
            spec["name"],
            context=context,
            kind=spec["kind"],
            attributes=spec["attributes"],
            links=links,
            start_time=start,
        )
        span.set_attributes(spec["later"])
        for name, attrs in spec["events"]:
            span.add_event(name, attrs, timestamp=end)
        if spec["status"] is not None:
            span.set_status(spec["status"])
        span.end(end_time=end)
    return list(KEEP.spans)


# One encoder for every example, as the exporter keeps one for the life of the process: what
# one batch left in its caches must not leak into the next one's bytes.
ENCODER = SpanEncoder()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(span_specs(), max_size=6))
def test_bytes_equal_the_sdk_encoders(specs: list[dict[str, Any]]) -> None:
    spans = make_spans(specs)
    expected = encode_spans(spans).SerializeToString()
    assert ENCODER.encode(spans) == expected
    assert SpanEncoder().encode(spans) == expected


def test_the_gateway_request_span() -> None:
    spans = make_spans(
        [
            {
                "tracer": 0,
                "name": "POST /webhook",
                "kind": SpanKind.SERVER,
                "parent": None,
                "attributes": {"http.request.method": "POST", "url.path": "/webhook"},
                "later": {"wa.correlation_id": "c1", "wa.stored": 1, "wa.duplicates": 0},
                "events": [],
                "links": [],
                "status": None,
                "times": (1, 2),
            }
        ]
    )
    data = SpanEncoder().encode(spans)
    request = ExportTraceServiceRequest.FromString(data)
    (span,) = request.resource_spans[0].scope_spans[0].spans
    assert span.name == "POST /webhook"
    assert {a.key: a.value for a in span.attributes}["wa.stored"].int_value == 1


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.url)
    yield r
    r.stop()


def one_span() -> list[ReadableSpan]:
    return make_spans(
        [
            {
                "tracer": 1,
                "name": "turn",
                "kind": SpanKind.INTERNAL,
                "parent": None,
                "attributes": {"wa.correlation_id": "c2"},
                "later": {},
                "events": [("retry", {"attempt": 2})],
                "links": [],
                "status": Status(StatusCode.ERROR, "model down"),
                "times": (5, 9),
            }
        ]
    )


def test_exporter_posts_what_the_receiver_decodes(receiver: OtlpReceiver) -> None:
    spans = one_span()
    exporter = LeanOTLPSpanExporter()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert receiver.requests == [encode_spans(spans)]

    receiver.status = 400  # not retryable: reported at once
    assert exporter.export(spans) is SpanExportResult.FAILURE
    exporter.shutdown()
    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert len(receiver.requests) == 1


def test_a_batch_over_the_request_limit_is_dropped_not_sent(receiver: OtlpReceiver) -> None:
    spans = one_span()
    exporter = LeanOTLPSpanExporter(max_request_size=16)
    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert receiver.requests == []
    exporter.shutdown()
