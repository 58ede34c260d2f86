"""The gateway: Meta's handshake, signed deliveries, durable acknowledgement, health, metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import prometheus_client
from opentelemetry import trace
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from wa.v1 import common_pb2, state_pb2, state_pb2_grpc

from common import config, grpcserver, logs, telemetry
from common.components import check_components

from . import parse, signature
from .batcher import IngestBatcher, IngestError

log = logging.getLogger(__name__)

DELIVERIES = Counter("wa_gateway_deliveries_total", "Webhook deliveries by result", ["result"])
EVENTS = Counter("wa_gateway_events_total", "Events in accepted deliveries", ["kind"])
ACK_SECONDS = Histogram(
    "wa_gateway_ack_seconds",
    "Time from request to durable acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INGEST_TIMEOUT = 5.0


@dataclass
class GatewayState:
    settings: config.GatewaySettings
    state: state_pb2_grpc.StateStub
    batcher: IngestBatcher


def _json(code: int, **body: Any) -> Response:
    return Response(orjson.dumps(body), status_code=code, media_type="application/json")


async def verify_handshake(request: Request) -> Response:
    st: GatewayState = request.app.state.gw
    q = request.query_params
    token = st.settings.verify_token.reveal()
    if (
        q.get("hub.mode") == "subscribe"
        and token
        and signature.equal(q.get("hub.verify_token", ""), token)
    ):
        return PlainTextResponse(q.get("hub.challenge", ""))
    DELIVERIES.labels("handshake_refused").inc()
    return PlainTextResponse("forbidden", status_code=403)


async def _read_limited(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_delivery(request: Request) -> Response:
    started = time.perf_counter()
    st: GatewayState = request.app.state.gw
    cid = (
        request.headers.get("x-correlation-id")
        or request.headers.get("x-request-id")
        or telemetry.new_correlation_id()
    )[:128]
    logs.correlation_id.set(cid)
    try:
        body = await _read_limited(request, st.settings.max_body_bytes)
    except ClientDisconnect:
        return _json(400, error="client disconnected")
    if body is None:
        DELIVERIES.labels("too_large").inc()
        return _json(413, error="body over the limit", limit=st.settings.max_body_bytes)
    if not st.settings.skip_signature and not signature.verify(
        body, request.headers.get("x-hub-signature-256"), st.settings.app_secret.reveal()
    ):
        DELIVERIES.labels("bad_signature").inc()
        log.warning("refused a delivery with a missing or wrong signature")
        return _json(401, error="missing or wrong X-Hub-Signature-256")
    try:
        delivery = parse.parse(body)
    except (ValueError, parse.NotADelivery) as exc:
        DELIVERIES.labels("bad_json").inc()
        return _json(400, error=f"not a webhook delivery: {exc}")
    for reason in delivery.dropped:
        EVENTS.labels("dropped").inc()
        log.warning("event not usable, not stored: %s", reason)
    for m in delivery.messages:
        if m.skip_reason:
            EVENTS.labels("invalid").inc()
            log.warning(
                "message not usable, stored as skipped: %s",
                m.skip_reason,
                extra={"message_id": m.message_id},
            )
    if not delivery.messages and not delivery.statuses and not delivery.events:
        DELIVERIES.labels("empty").inc()
        return _json(200, status="ok", stored=0, duplicates=0, correlation_id=cid)
    span = trace.get_current_span()
    tracing = span.is_recording()
    if tracing:
        attributes = {telemetry.ATTR_CORRELATION: cid}
        if delivery.messages:
            attributes["wa.message_id"] = delivery.messages[0].message_id
            attributes["wa.phone_number_id"] = delivery.messages[0].phone_number_id
        span.set_attributes(attributes)
    # The context goes on even when it is not sampled (a caller's unsampled traceparent), so
    # the work started later from it is not sampled either.
    request_pb = state_pb2.IngestRequest(
        correlation_id=cid,
        traceparent=telemetry.traceparent_of(span) if span.get_span_context().is_valid else "",
        messages=[
            common_pb2.InboundMessage(
                message_id=m.message_id,
                phone_number_id=m.phone_number_id,
                display_phone_number=m.display_phone_number,
                wa_id=m.wa_id,
                contact_name=m.contact_name,
                type=m.type,
                timestamp=m.timestamp,
                text=m.text,
                payload_json=m.payload_json,
                context_message_id=m.context_message_id,
                skip_reason=m.skip_reason,
                user_id=m.user_id,
                parent_user_id=m.parent_user_id,
                username=m.username,
            )
            for m in delivery.messages
        ],
        statuses=[
            common_pb2.StatusUpdate(
                message_id=s.message_id,
                phone_number_id=s.phone_number_id,
                recipient_id=s.recipient_id,
                status=s.status,
                timestamp=s.timestamp,
                payload_json=s.payload_json,
                error_code=s.error_code,
                error_title=s.error_title,
                callback_data=s.callback_data,
                recipient_user_id=s.recipient_user_id,
            )
            for s in delivery.statuses
        ],
        events=[
            common_pb2.CustomerEvent(
                event_id=e.event_id,
                phone_number_id=e.phone_number_id,
                kind=e.kind,
                wa_id=e.wa_id,
                user_id=e.user_id,
                previous_user_id=e.previous_user_id,
                parent_user_id=e.parent_user_id,
                preference_category=e.preference_category,
                preference_value=e.preference_value,
                timestamp=e.timestamp,
                payload_json=e.payload_json,
            )
            for e in delivery.events
        ],
    )
    try:
        resp = await st.batcher.submit(request_pb)
    except IngestError as exc:
        DELIVERIES.labels("unavailable").inc()
        log.error("could not store the delivery: %s", exc)
        return _json(503, error="cannot store the delivery durably; retry later")
    duplicates = sum(1 for r in resp.results if r.duplicate)
    if tracing:
        # The group-committed IngestBatch call serves many traces and has no span of its own:
        # this span's duration includes it, and says what it stored.
        span.set_attributes(
            {
                "wa.stored": len(resp.results)
                - duplicates
                + resp.statuses_stored
                + resp.events_stored,
                "wa.duplicates": duplicates,
            }
        )
    DELIVERIES.labels("stored").inc()
    EVENTS.labels("message").inc(len(delivery.messages))
    EVENTS.labels("status").inc(len(delivery.statuses))
    ACK_SECONDS.observe(time.perf_counter() - started)
    if log.isEnabledFor(logging.INFO):
        log.info(
            "delivery acknowledged",
            extra={
                "message_ids": [r.message_id for r in resp.results],
                "message_id": resp.results[0].message_id if resp.results else "",
                "statuses": len(delivery.statuses),
                "duplicates": duplicates,
            },
        )
    return _json(
        200,
        status="ok",
        stored=len(resp.results) - duplicates + resp.statuses_stored + resp.events_stored,
        duplicates=duplicates,
        correlation_id=cid,
        messages=[{"id": r.message_id, "status": r.status or "duplicate"} for r in resp.results],
    )


async def healthz(request: Request) -> Response:
    return _json(200, status="ok")


async def readyz(request: Request) -> Response:
    st: GatewayState = request.app.state.gw
    components = await check_components(st.settings, st.state)
    ready = all(c["healthy"] for c in components)
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "components": components},
        status_code=200 if ready else 503,
    )


async def metrics(request: Request) -> Response:
    return Response(
        prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )


def create_app(settings: config.GatewaySettings) -> Starlette:
    if not settings.skip_signature and not settings.app_secret:
        raise config.ConfigError(
            "WHATSAPP_APP_SECRET is not set (WHATSAPP_SKIP_SIGNATURE=true only for development)"
        )
    if settings.skip_signature:
        log.critical("WHATSAPP_SKIP_SIGNATURE=true: deliveries are NOT authenticated (dev only)")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # Untraced: each delivery's trace context travels in its IngestRequest.
            channel = await stack.enter_async_context(
                grpcserver.channel(settings.state_addr, traced=False)
            )
            stub = state_pb2_grpc.StateStub(channel)
            batcher = IngestBatcher(stub, timeout=INGEST_TIMEOUT)
            app.state.gw = GatewayState(settings=settings, state=stub, batcher=batcher)
            log.info("gateway ready", extra={"port": settings.gateway_port})
            yield
            await batcher.close()

    app = Starlette(
        routes=[
            Route("/webhook", verify_handshake, methods=["GET"]),
            Route("/webhook", receive_delivery, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return app
