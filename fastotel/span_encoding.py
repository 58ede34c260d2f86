"""OTLP span encoding straight to protobuf wire bytes, and the exporter that uses it.

The SDK's encoder builds a protobuf object per span, attribute and value, then serialises the
tree, in the export thread but holding the GIL the acknowledgement's event loop needs (figures
in docs/benchmarks.md; `python -m bench.ack tracing`). Here the common case (a
span without events or links, attribute values of str, bool, int or float) is written
directly, attribute pairs that repeat (method, route, status, phone number id) are encoded
once, and anything else is handed to the SDK's own encoder for that span or attribute: the
wire format concatenates, so both kinds sit side by side in one request. The output is
byte-for-byte what `encode_spans(spans).SerializeToString()` produces
(`tests/unit/test_span_encoding.py`, with hypothesis).
"""

from __future__ import annotations

import logging
import struct
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_key_value,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_span
from opentelemetry.exporter.otlp.proto.http._common import (
    RequestPayloadTooLargeError,
    _is_request_too_large,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE

log = logging.getLogger(__name__)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
# Attribute pairs seen often enough to be worth keeping encoded; bounded, since some values
# (message ids, correlation ids) never repeat.
_PAIR_CACHE_SIZE = 4096
_CACHED_TYPES = frozenset({str, int, bool})


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (tag already shifted and typed)."""
    n = len(payload)
    return (bytes((tag, n)) if n < 0x80 else bytes((tag,)) + _varint(n)) + payload


def _text(tag: int, text: str) -> bytes:
    """A string field; proto3 leaves an empty one out."""
    return _field(tag, text.encode()) if text else b""


def _any_value(value: Any) -> bytes | None:
    """AnyValue bytes for the fast types; None for what the SDK should encode."""
    kind = type(value)
    if kind is str:
        return _field(0x0A, value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            return None
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    return None


class SpanEncoder:
    """Encodes batches of finished spans into an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, type, Any], bytes] = {}
        self._resources: dict[Resource, bytes] = {}
        self._scopes: dict[InstrumentationScope | None, bytes] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        grouped: defaultdict[Resource, defaultdict[InstrumentationScope | None, list[bytes]]]
        grouped = defaultdict(lambda: defaultdict(list))
        for span in spans:
            grouped[span.resource][span.instrumentation_scope or None].append(self._span(span))
        request = []
        for resource, scopes in grouped.items():
            scope_spans = []
            for scope, encoded in scopes.items():
                body = self._scope(scope) + b"".join(_field(0x12, s) for s in encoded)
                if scope is not None:
                    body += _text(0x1A, scope.schema_url or "")
                scope_spans.append(_field(0x12, body))
            body = self._resource(resource) + b"".join(scope_spans)
            body += _text(0x1A, resource.schema_url or "")
            request.append(_field(0x0A, body))
        return b"".join(request)

    def _resource(self, resource: Resource) -> bytes:
        encoded = self._resources.get(resource)
        if encoded is None:
            encoded = _field(0x0A, _encode_resource(resource).SerializeToString())
            self._resources[resource] = encoded
        return encoded

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            # The SDK's helper takes None too (an empty scope), despite its annotation.
            scope_pb = _encode_instrumentation_scope(scope)  # type: ignore[arg-type]
            encoded = _field(0x0A, scope_pb.SerializeToString())
            self._scopes[scope] = encoded
        return encoded

    def _pair(self, key: str, value: Any) -> bytes:
        """One attribute, as the `attributes` field of a span (KeyValue, field 9)."""
        # The value's type is part of the key (True == 1); floats and sequences are not
        # cached (-0.0 == 0.0, (1,) == (True,)).
        cache_key = (key, type(value), value) if type(value) in _CACHED_TYPES else None
        if cache_key is not None and (encoded := self._pairs.get(cache_key)) is not None:
            return encoded
        try:
            any_value = _any_value(value)
            if any_value is None:
                kv = _encode_key_value(key, value).SerializeToString()
            else:
                kv = _text(0x0A, key) + _field(0x12, any_value)
        except Exception:  # as the SDK does: log, and leave the attribute out
            log.exception("could not encode span attribute %s", key)
            return b""
        encoded = _field(0x4A, kv)
        if cache_key is not None:
            if len(self._pairs) >= _PAIR_CACHE_SIZE:
                self._pairs.clear()
            self._pairs[cache_key] = encoded
        return encoded

    def _span(self, span: ReadableSpan) -> bytes:
        if span.events or span.links:
            return _encode_span(span).SerializeToString()
        ctx = span.get_span_context()
        assert ctx is not None
        parts = [
            b"\x0a\x10",
            ctx.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            ctx.span_id.to_bytes(8, "big"),
        ]
        if ctx.trace_state:
            state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
            parts.append(_text(0x1A, state))
        parent = span.parent
        if parent:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts.append(_text(0x2A, span.name))
        parts.append(bytes((0x30, span.kind.value + 1)))
        if span.start_time:
            parts += (b"\x39", _FIXED64(span.start_time))
        if span.end_time:
            parts += (b"\x41", _FIXED64(span.end_time))
        if span.attributes:
            pair = self._pair
            parts += [pair(k, v) for k, v in span.attributes.items()]
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        if span.dropped_links:
            parts += (b"\x70", _varint(span.dropped_links))
        status = span.status
        body = _text(0x12, status.description or "")
        if status.status_code.value:
            body += bytes((0x18, status.status_code.value))
        parts.append(_field(0x7A, body))
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent and parent.is_remote else 0)
        parts += (b"\x85\x01", _FIXED32(flags))
        return b"".join(parts)


class LeanOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (endpoint, headers, timeout, compression, retries, request
    size limit and its own metrics, from the standard `OTEL_EXPORTER_OTLP_*` variables or the
    arguments), with the encoder above. `export` is the SDK's, but for the encoding line."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            log.warning("exporter already shut down, %d spans dropped", len(spans))
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            try:
                data = self._encoder.encode(spans)
            except Exception as error:
                log.exception("could not encode a batch of %d spans", len(spans))
                result.error = error
                return SpanExportResult.FAILURE
            if _is_request_too_large(data, self._max_request_size):
                log.warning(
                    "span batch dropped: %d bytes, over the %d-byte request limit",
                    len(data),
                    self._max_request_size,
                )
                result.error = RequestPayloadTooLargeError(
                    f"{len(data)} bytes over the {self._max_request_size}-byte limit"
                )
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                if sent.status_code is not None:
                    result.error_attrs = {HTTP_RESPONSE_STATUS_CODE: sent.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
