"""The switch back to stock OpenTelemetry: with the fast path off the request span is the SDK's
own, spans are exported by the SDK's exporter, and `fastotel` (private SDK modules) is never
loaded, so a process still traces when an OpenTelemetry upgrade has broken it. Each case in a
child process: the tracer provider is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.otlp import OtlpReceiver

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys, orjson
from common import runtime, telemetry
from services.gateway.settings import GatewaySettings
runtime.load_settings(GatewaySettings, "gateway")  # where every service starts telemetry
span = telemetry.request_tracer("probe").start_span("probe-span", attributes={"wa.k": "v"})
span.end()
telemetry.shutdown_telemetry()  # flushes the batch processor
kind = type(span)
print(orjson.dumps({
    "span": f"{kind.__module__}.{kind.__qualname__}",
    "fastotel": sorted(m for m in sys.modules if m.split(".")[0] == "fastotel"),
}).decode())
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def probe(receiver: OtlpReceiver, **settings: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WA_"))}
    # No certificates where the probe runs, and it calls no service.
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, GRPC_INSECURE="true", **settings)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result: dict[str, object] = orjson.loads(out.strip().splitlines()[-1])
    return result


def test_with_the_fast_path_off_spans_are_the_sdks_and_fastotel_is_never_loaded(
    receiver: OtlpReceiver,
) -> None:
    result = probe(receiver, WA_OTEL_FAST_PATH="false")
    assert result["span"] == "opentelemetry.sdk.trace._Span"
    assert result["fastotel"] == []
    assert [(s.name, s.attributes.get("wa.k")) for s in receiver.spans] == [("probe-span", "v")]


def test_by_default_spans_are_lean_and_exported_by_fastotel(receiver: OtlpReceiver) -> None:
    result = probe(receiver)
    assert result["span"] == "fastotel.lean_span.LeanSpan"
    assert "fastotel.span_encoding" in result["fastotel"]  # type: ignore[operator]
    assert [(s.name, s.attributes.get("wa.k")) for s in receiver.spans] == [("probe-span", "v")]
