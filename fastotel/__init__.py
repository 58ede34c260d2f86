"""The OpenTelemetry fast path of the acknowledgement: a lean request span (`lean_span`) and an
OTLP encoder writing protobuf bytes directly (`span_encoding`).

Both use private modules of the OpenTelemetry SDK and OTLP exporter, so pyproject.toml pins
those packages (`~=`) to the versions they are tested against. An upgrade of OpenTelemetry is
gated by the differential tests tests/unit/test_lean_span.py and
tests/unit/test_span_encoding.py (hypothesis, against the SDK's own span and encoder); until
they pass, `WA_OTEL_FAST_PATH=false` runs the stock SDK span and exporter instead.
"""
