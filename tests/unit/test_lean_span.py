"""The lean request span behaves as the SDK's span for whatever is done to it: same sampling
decision, same attributes after cleaning and limits, same events, status, name and times,
seen by the span processors the same way, and encoded to the same OTLP bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from common.telemetry import ATTR_CORRELATION, CorrelationSpanProcessor, with_correlation
from fastotel.lean_span import LeanTracer
from fastotel.span_encoding import SpanEncoder

RESOURCE = Resource.create({"service.name": "gateway"})
SCOPE = "services.gateway.tracing"


class CountingIds(IdGenerator):
    """The same ids, in the same order, for both tracers of a comparison."""

    def __init__(self) -> None:
        self.n = 0

    def generate_span_id(self) -> int:
        self.n += 1
        return self.n

    def generate_trace_id(self) -> int:
        self.n += 1
        return 0xABC0 + self.n


class Recorder(SpanProcessor):
    def __init__(self) -> None:
        self.started: list[tuple[Span, Context | None]] = []
        self.ended: list[ReadableSpan] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.started.append((span, parent_context))

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def pair(limits: SpanLimits, sampler: Sampler = ALWAYS_ON) -> tuple[Any, LeanTracer, Recorder]:
    """An SDK tracer and a lean tracer with the same resource, sampler, limits and ids; the
    lean one ends into a recorder (processors are chained as the provider chains them)."""
    provider = TracerProvider(
        resource=RESOURCE, sampler=sampler, id_generator=CountingIds(), span_limits=limits
    )
    recorder = Recorder()
    chain = SynchronousMultiSpanProcessor()
    chain.add_span_processor(recorder)
    lean = LeanTracer(
        resource=RESOURCE,
        sampler=sampler,
        id_generator=CountingIds(),
        limits=limits,
        processor=chain,
        scope=SCOPE,
    )
    return provider.get_tracer(SCOPE), lean, recorder


class Odd:
    def __str__(self) -> str:
        return "odd"


keys = st.sampled_from(["", "k", "http.route", "wa.stored", "x" * 40]) | st.text(max_size=6)
values = (
    st.text(max_size=30)
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.none()
    | st.binary(max_size=4)
    | st.lists(st.text(max_size=12), max_size=3)
    | st.lists(st.integers(-5, 5), max_size=3).map(tuple)
    | st.just(Odd())
)
attribute_maps = st.dictionaries(keys, values, max_size=5)
statuses = st.sampled_from(
    [
        (StatusCode.OK, None),
        (StatusCode.ERROR, None),
        (StatusCode.ERROR, "boom"),
        (StatusCode.UNSET, None),
        (Status(StatusCode.ERROR, "obj"), None),
        (Status(StatusCode.OK), None),
    ]
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("set_attribute"), keys, values),
        st.tuples(st.just("set_attributes"), attribute_maps),
        st.tuples(st.just("update_name"), st.text(max_size=8)),
        st.tuples(st.just("set_status"), statuses),
        st.tuples(st.just("add_event"), st.text(max_size=5), attribute_maps),
        st.tuples(st.just("record_exception"), st.sampled_from([ValueError("v"), KeyError(1)])),
        st.tuples(st.just("end")),
    ),
    max_size=12,
)
limit_values = st.sampled_from([SpanLimits.UNSET, 0, 1, 3])
limits = st.builds(
    SpanLimits,
    max_span_attributes=limit_values,
    max_span_attribute_length=limit_values,
    max_events=limit_values,
    max_event_attributes=limit_values,
    max_attribute_length=limit_values,
)


def apply(span: Span, ops: Sequence[tuple[Any, ...]], clock: list[int]) -> None:
    for op, *args in ops:
        clock[0] += 1
        if op == "set_status":
            status, description = args[0]
            span.set_status(status, description)
        elif op == "add_event":
            span.add_event(args[0], args[1], timestamp=clock[0])
        elif op == "record_exception":
            span.record_exception(args[0], timestamp=clock[0])
        elif op == "end":
            span.end(end_time=clock[0])
        else:
            getattr(span, op)(*args)


def view(span: ReadableSpan) -> dict[str, Any]:
    return {
        "name": span.name,
        "context": span.context,
        "parent": span.parent,
        "kind": span.kind,
        "times": (span.start_time, span.end_time),
        "attributes": list((span.attributes or {}).items()),
        "dropped_attributes": span.dropped_attributes,
        "status": (span.status.status_code, span.status.description),
        "events": [(e.name, list((e.attributes or {}).items()), e.timestamp) for e in span.events],
        "dropped_events": span.dropped_events,
    }


@settings(max_examples=300, deadline=None)
@given(
    limits=limits,
    name=st.text(max_size=8),
    kind=st.sampled_from(list(SpanKind)),
    initial=attribute_maps,
    ops=operations,
)
def test_whatever_is_done_to_it_it_ends_as_the_sdk_span_would(
    limits: SpanLimits,
    name: str,
    kind: SpanKind,
    initial: dict[str, Any],
    ops: list[tuple[Any, ...]],
) -> None:
    sdk_tracer, lean_tracer, recorder = pair(limits)
    sdk = sdk_tracer.start_span(name, kind=kind, attributes=initial, start_time=1)
    lean = lean_tracer.start_span(name, kind=kind, attributes=initial, start_time=1)
    for span in (sdk, lean):
        apply(span, ops, [1])
        span.end(end_time=10_000)  # a second end changes nothing
        assert not span.is_recording()
    assert isinstance(sdk, ReadableSpan) and isinstance(lean, ReadableSpan)
    assert view(lean) == view(sdk)
    assert recorder.ended == [lean]
    # Same bytes on the wire, by the SDK's encoder and by ours (which the exporter uses).
    scope_free = [_without_scope(sdk), _without_scope(lean)]
    sdk_bytes, lean_bytes = (encode_spans([s]).SerializeToString() for s in scope_free)
    assert lean_bytes == sdk_bytes
    assert SpanEncoder().encode([lean]) == encode_spans([lean]).SerializeToString()


def _without_scope(span: ReadableSpan) -> ReadableSpan:
    """The SDK tracer's scope carries a version and attributes ours does not name."""
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=span.events,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
    )


def remote(flags: int) -> Context:
    parent = SpanContext(0x1234, 0x99, is_remote=True, trace_flags=TraceFlags(flags))
    return set_span_in_context(NonRecordingSpan(parent))


class Tagging(Sampler):
    """Samples and adds an attribute and a trace state entry, as some samplers do."""

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(
            Decision.RECORD_AND_SAMPLE, {"sampler.tag": "t"}, TraceState([("s", "1")])
        )

    def get_description(self) -> str:
        return "Tagging"


@pytest.mark.parametrize(
    "sampler",
    [ALWAYS_ON, ALWAYS_OFF, ParentBased(ALWAYS_ON), TraceIdRatioBased(0.5), Tagging()],
    ids=lambda s: s.get_description(),
)
@pytest.mark.parametrize(
    "parent",
    [None, remote(TraceFlags.SAMPLED), remote(TraceFlags.DEFAULT), remote(0x03)],
    ids=["root", "sampled parent", "unsampled parent", "random-id parent"],
)
def test_the_sampler_decides_as_for_an_sdk_span(sampler: Sampler, parent: Context | None) -> None:
    sdk_tracer, lean_tracer, recorder = pair(SpanLimits(), sampler)

    def decisions(tracer: Any) -> list[tuple[bool, SpanContext, dict[str, Any]]]:
        out = []
        for n in range(40):  # the ratio sampler decides by trace id: several ids
            span = tracer.start_span(f"s{n}", parent, SpanKind.SERVER, {"a": 1})
            recorded = dict(span.attributes) if span.is_recording() else {}
            out.append((span.is_recording(), span.get_span_context(), recorded))
            span.end()
        return out

    sdk, lean = decisions(sdk_tracer), decisions(lean_tracer)
    assert lean == sdk
    recorded = sum(1 for recording, _, _ in lean if recording)
    assert len(recorder.started) == len(recorder.ended) == recorded


def test_the_processors_see_it_start_with_its_parent_context_and_end() -> None:
    recorder = Recorder()
    chain = SynchronousMultiSpanProcessor()
    chain.add_span_processor(CorrelationSpanProcessor())
    chain.add_span_processor(recorder)
    tracer = LeanTracer(
        resource=RESOURCE,
        sampler=ParentBased(ALWAYS_ON),
        id_generator=CountingIds(),
        limits=SpanLimits(),
        processor=chain,
        scope=SCOPE,
    )
    parent = with_correlation("cid-1", remote(TraceFlags.SAMPLED))
    span = tracer.start_span("POST", parent, SpanKind.SERVER, {"url.path": "/webhook"})
    assert recorder.started == [(span, parent)] and recorder.ended == []
    span.end()
    (ended,) = recorder.ended
    assert ended is cast(Any, span)
    assert (ended.attributes or {})[ATTR_CORRELATION] == "cid-1"
    assert ended.parent is not None and ended.parent.span_id == 0x99
    assert ended.context.trace_id == 0x1234
    assert baggage.get_baggage(ATTR_CORRELATION, parent) == "cid-1"
