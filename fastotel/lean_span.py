"""A lean tracer for the one span on the acknowledgement's path: the gateway's request span.

An SDK span costs the gateway's event loop more per request than this one (a lock per span
and per attribute write, each attribute cleaned by a generic recursive function, the SDK's own
span metrics, a ReadableSpan copied at the end; figures in docs/benchmarks.md), and the loop's
CPU is what the acknowledgement waits for (`python -m bench.ack tracing`). This span
keeps what matters for a short span with a handful of scalar attributes, using the provider's
own sampler, id generator, resource, limits and span processors: the sampler decides, the
processors see its start and end like any other span's (so the correlation id processor and
the batch processor work unchanged), attribute limits apply as the SDK applies them, and the
span is itself the read-only view the exporter encodes. Attribute values other than str, bool,
int and float go through the SDK's own cleaning. Every other span in the process is the SDK's.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

_PLAIN = frozenset({str, bool, int, float})
_UNSET = Status(StatusCode.UNSET)


class LeanTracer:
    """Starts `LeanSpan`s; built by `common.telemetry` from the objects its provider uses."""

    def __init__(
        self,
        *,
        resource: Resource,
        sampler: Sampler,
        id_generator: IdGenerator,
        limits: SpanLimits,
        processor: SpanProcessor,
        scope: str,
    ) -> None:
        self.resource = resource
        self.sampler = sampler
        self.id_generator = id_generator
        self.processor = processor
        self.scope = InstrumentationScope(scope)
        self.limits = limits

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, types.AnyValue] | None = None,
        start_time: int | None = None,
    ) -> trace.Span:
        """As `Tracer.start_span`, without links; the parent comes from `context`."""
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
            parent_context: SpanContext | None = parent
        else:
            trace_id = self.id_generator.generate_trace_id()
            random_id = self.id_generator.is_trace_id_random()
            parent_context = None
        sampled = self.sampler.should_sample(context, trace_id, name, kind, attributes)
        flags = TraceFlags.SAMPLED if sampled.decision.is_sampled() else TraceFlags.DEFAULT
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            self.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=sampled.trace_state,
        )
        if not sampled.decision.is_recording():
            return trace.NonRecordingSpan(span_context)
        span = LeanSpan(self, name, span_context, parent_context, kind, start_time)
        # As in the SDK, the span starts with the attributes the sampler returns (by default
        # the ones it was given).
        span.set_attributes(sampled.attributes)
        # Typed for the SDK's span; processors use the API span's methods, which this has.
        self.processor.on_start(cast(Any, span), parent_context=context)
        return span


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span whose attributes are a plain dict; ends into the processors."""

    def __init__(
        self,
        tracer: LeanTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        start_time: int | None = None,
    ) -> None:
        # ReadableSpan's fields, set here: its __init__ would build a resource of its own.
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._resource = tracer.resource
        self._instrumentation_scope = tracer.scope
        self._instrumentation_info = None
        self._attributes: dict[str, types.AnyValue] = {}
        self._dropped_attributes = 0
        self._events: list[Event] = []
        self._dropped_events = 0
        self._links = ()
        self._status = _UNSET
        self._start_time = start_time if start_time is not None else time.time_ns()
        self._end_time: int | None = None

    def get_span_context(self) -> SpanContext:
        return cast(SpanContext, self._context)

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            return
        limits = self._tracer.limits
        max_length = limits.max_span_attribute_length
        if type(value) not in _PLAIN or type(key) is not str or not key:
            cleaned = BoundedAttributes(None, {key: value}, max_value_len=max_length)
            if not cleaned:
                self._dropped_attributes += 1
                return
            ((key, value),) = cleaned.items()
        elif max_length is not None and type(value) is str:
            value = value[:max_length]
        attributes = self._attributes
        if key in attributes:
            del attributes[key]  # a rewritten attribute moves to the end, as in the SDK
        elif (max_attributes := limits.max_span_attributes) is not None:
            if max_attributes == 0:
                self._dropped_attributes += 1
                return
            if len(attributes) >= max_attributes:
                del attributes[next(iter(attributes))]  # the oldest gives way, as in the SDK
                self._dropped_attributes += 1
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None:
            return
        limits = self._tracer.limits
        if limits.max_events is not None and len(self._events) >= limits.max_events:
            self._dropped_events += 1  # the SDK's bounded list drops the oldest too
            if not self._events:
                return
            del self._events[0]
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            immutable=True,
            max_value_len=limits.max_attribute_length,
        )
        self._events.append(Event(name, bounded, timestamp))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK: OK is final, UNSET is ignored, a description only comes with a code."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        event: dict[str, Any] = {
            "exception.type": (
                f"{module}.{kind.__qualname__}"
                if module and module != "builtins"
                else kind.__qualname__
            ),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        processor = self._tracer.processor
        # The SDK's (experimental) hook for processors that act just before the end.
        on_ending = getattr(processor, "_on_ending", None)
        if on_ending is not None:
            on_ending(self)
        processor.on_end(self)

    @property
    def dropped_attributes(self) -> int:
        return self._dropped_attributes

    @property
    def dropped_events(self) -> int:
        return self._dropped_events

    @property
    def dropped_links(self) -> int:
        return 0
