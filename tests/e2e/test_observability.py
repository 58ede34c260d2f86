"""Guarantee 6 from outside: one trace per message across the services, the correlation id on
every span and every log line, and the operator's views of it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel, model_error
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.system import System

pytestmark = pytest.mark.e2e


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def traced_env(otlp: OtlpReceiver, model: FakeModel) -> dict[str, str]:
    return model.env(
        OTEL_SDK_DISABLED="false",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )


async def send(
    system: System, text: str, wa_id: str, traceparent: str | None = None
) -> tuple[str, str]:
    """Posts one text message (with the caller's traceparent, if given); returns its message
    id and correlation id."""
    msg = payloads.message("text", wa_id=wa_id, text={"body": text})
    headers = {"traceparent": traceparent} if traceparent else None
    resp = await system.post(payloads.delivery(messages=[msg]), headers=headers)
    assert resp.status_code == 200
    return str(msg["id"]), str(resp.json()["correlation_id"])


async def spans_of(
    otlp: OtlpReceiver, cid: str, services: set[str], timeout: float = 20.0
) -> list[ReceivedSpan]:
    deadline = time.monotonic() + timeout
    spans: list[ReceivedSpan] = []
    while time.monotonic() < deadline:
        traces = otlp.traces_with("wa.correlation_id", cid)
        if len(traces) == 1:
            spans = otlp.trace(next(iter(traces)))
            if services <= {s.service for s in spans}:
                await asyncio.sleep(1.0)  # let the last batches arrive
                return otlp.trace(next(iter(traces)))
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"no single trace with {services}: {sorted({s.service for s in spans})}"
        f" traces={otlp.traces_with('wa.correlation_id', cid)}"
    )


def kinds(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {"db": [], "redis": [], "http": []}
    for s in spans:
        system_attr = s.attributes.get("db.system") or s.attributes.get("db.system.name")
        if system_attr == "postgresql":
            out["db"].append(s)
        elif system_attr == "redis":
            out["redis"].append(s)
        elif "http.url" in s.attributes or "url.full" in s.attributes:
            out["http"].append(s)
    return out


async def test_one_trace_per_message_across_services_with_the_correlation_id_everywhere(
    start_system: StartSystem, otlp: OtlpReceiver, model: FakeModel, graph: FakeGraph
) -> None:
    system = await start_system(**traced_env(otlp, model))
    message_id, cid = await send(system, "hello there", "15550001111")
    await system.wait_status([message_id], {"replied"})
    spans = await spans_of(otlp, cid, {"gateway", "state", "agent"})
    by_kind = kinds(spans)
    # PostgreSQL spans always; Redis ones only when the turn renewed a stale lease
    # (Locks.refresh), which a first message's turn does not: those there carry the id below.
    assert by_kind["db"]
    urls = [
        str(s.attributes.get("http.url") or s.attributes.get("url.full")) for s in by_kind["http"]
    ]
    assert any(model.url in u for u in urls), urls
    assert any(graph.url in u and "/messages" in u for u in urls), urls
    missing = [
        (s.service, s.name, str(s.attributes.get("db.statement", ""))[:60])
        for s in spans
        if s.attributes.get("wa.correlation_id") != cid
    ]
    assert missing == [], missing
    assert not any("grpc.health" in s.name for s in otlp.spans)

    second_id, second_cid = await send(system, "and again", "15550002222")
    await system.wait_status([second_id], {"replied"})
    second = await spans_of(otlp, second_cid, {"gateway", "state", "agent"})
    assert second[0].trace_id != spans[0].trace_id

    trace_id = spans[0].trace_id
    lines = [
        line
        for name in ("gateway", "state", "agent", "dlq")
        for line in system.log_lines(name)
        if line.get("correlation_id") == cid
        or line.get("message_id") == message_id
        or message_id in str(line.get("msg"))
    ]
    services = {line["service"] for line in lines}
    assert {"gateway", "state", "agent"} <= services
    bad = [
        line
        for line in lines
        if line.get("correlation_id") != cid or line.get("trace_id") != trace_id
    ]
    assert bad == []


async def test_a_dead_lettered_message_keeps_its_trace_into_the_dlq(
    start_system: StartSystem, otlp: OtlpReceiver, model: FakeModel
) -> None:
    model.script.append(model_error(401))
    system = await start_system(**traced_env(otlp, model))
    message_id, cid = await send(system, "hello", "15550003333")
    await system.wait_status([message_id], {"dead_lettered"})
    spans = await spans_of(otlp, cid, {"gateway", "state", "agent", "dlq"})
    errors = [s for s in spans if s.status_code == 2]
    assert errors, "the failed model call and turn set span status to error"
    assert all(s.attributes.get("wa.correlation_id") == cid for s in spans)


async def test_the_request_span_continues_a_callers_traceparent_and_housekeeping_is_untraced(
    start_system: StartSystem, otlp: OtlpReceiver, model: FakeModel
) -> None:
    system = await start_system(**traced_env(otlp, model), STUCK_TIMEOUT_SECONDS="4")
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    message_id, cid = await send(system, "hi", "15550004444", f"00-{caller_trace}-{caller_span}-01")
    await system.wait_status([message_id], {"replied"})
    spans = await spans_of(otlp, cid, {"gateway", "state", "agent"})
    (request,) = [s for s in spans if s.service == "gateway" and s.kind == 2]
    assert request.trace_id == caller_trace and request.parent_id == caller_span
    assert request.name == "POST /webhook"
    assert request.attributes["http.request.method"] == "POST"
    assert request.attributes["http.route"] == "/webhook"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["wa.message_id"] == message_id
    assert request.attributes["wa.stored"] == 1

    # A caller that does not sample its trace: neither the request nor the work after it
    # (the turn, started later from the stored traceparent) starts a trace of its own.
    unsampled_trace = "5bf92f3577b34da6a3ce929d0e0e4737"
    quiet_id, quiet_cid = await send(
        system, "hi", "15550004445", f"00-{unsampled_trace}-{caller_span}-00"
    )
    await system.wait_status([quiet_id], {"replied"})

    # Probes, polling, leases, sweeps and gauges run all the time and belong to no message:
    # after a few sweeper and DLQ-worker rounds, every span exported is part of a message.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await system.http.get(f"{system.url}{path}")).status_code == 200
    await asyncio.sleep(3.0)
    stray = {(s.service, s.name) for s in otlp.spans if "wa.correlation_id" not in s.attributes}
    assert stray == set()
    assert not otlp.traces_with("wa.correlation_id", quiet_cid)
    assert not [s for s in otlp.spans if s.trace_id == unsampled_trace]
