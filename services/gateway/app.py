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
from wa.v1 import state_pb2, state_pb2_grpc

from common import config, grpcserver, logs, telemetry, wire
from services.gateway.settings import GatewaySettings

from . import parse, signature, tracing
from .batcher import IngestBatcher, IngestError, QueueFull
from .readiness import Readiness

log = logging.getLogger(__name__)

DELIVERIES = Counter("wa_gateway_deliveries_total", "Webhook deliveries by result", ["result"])
EVENTS = Counter("wa_gateway_events_total", "Events in accepted deliveries", ["kind"])
ACK_SECONDS = Histogram(
    "wa_gateway_ack_seconds",
    "Time from request to durable acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# The labelled counters of every accepted delivery, looked up once (`labels` per request is a
# lock and a dict lookup each).
STORED = DELIVERIES.labels("stored")
MESSAGES = EVENTS.labels("message")
STATUSES = EVENTS.labels("status")
INGEST_TIMEOUT = 5.0


@dataclass
class GatewayState:
    settings: GatewaySettings
    state: state_pb2_grpc.StateStub
    batcher: IngestBatcher
    readiness: Readiness
    # WHATSAPP_APP_SECRET's one or two secrets, split once.
    secrets: tuple[str, ...]


def _json(code: int, headers: dict[str, str] | None = None, **body: Any) -> Response:
    return Response(
        orjson.dumps(body), status_code=code, headers=headers, media_type="application/json"
    )


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


class Refused(Exception):
    """A delivery answered without being stored: its response says why."""

    def __init__(self, response: Response) -> None:
        self.response = response


async def receive_delivery(request: Request) -> Response:
    """Read, verify, parse, store, answer: 200 only once everything in it is durable."""
    started = time.perf_counter()
    st: GatewayState = request.app.state.gw
    try:
        body = await _read(request, st.settings)
        _verify(request, body, st)
        # Only now is the caller Meta: its trace context and correlation id may be used.
        tracing.trust(request.scope)
        cid = _correlation_id(request)
        delivery = _parse(body)
        if not delivery.messages and not delivery.statuses and not delivery.events:
            DELIVERIES.labels("empty").inc()
            return _json(200, status="ok", stored=0, duplicates=0, correlation_id=cid)
        span = trace.get_current_span()
        resp = await _store(st, delivery, cid, span)
    except Refused as refused:
        return refused.response
    return _answer(delivery, resp, cid, span, started)


def _correlation_id(request: Request) -> str:
    """The caller's correlation id (an authenticated caller's only), or a new one."""
    cid = (
        request.headers.get("x-correlation-id")
        or request.headers.get("x-request-id")
        or telemetry.new_correlation_id()
    )[:128]
    logs.correlation_id.set(cid)
    return cid


async def _read(request: Request, settings: GatewaySettings) -> bytes:
    """The body, within the size limit (413 over it)."""
    try:
        body = await _read_limited(request, settings.max_body_bytes)
    except ClientDisconnect:
        raise Refused(_json(400, error="client disconnected")) from None
    if body is None:
        DELIVERIES.labels("too_large").inc()
        raise Refused(_json(413, error="body over the limit", limit=settings.max_body_bytes))
    return body


# Anyone who can reach the port can send these, and during an outage Meta retries every
# delivery: a line each would be a log flood.
_BAD_SIGNATURE = logs.Sampled(
    log, logging.WARNING, "refused deliveries with a missing or wrong signature"
)
_QUEUE_FULL = logs.Sampled(log, logging.WARNING, "refused deliveries, the ingest queue is full")
_NOT_STORED = logs.Sampled(log, logging.ERROR, "could not store deliveries")


def _verify(request: Request, body: bytes, st: GatewayState) -> None:
    """Meta's signature of the body, with any of the app secrets (401 without it)."""
    if not st.settings.skip_signature and not signature.verify(
        body, request.headers.get("x-hub-signature-256"), st.secrets
    ):
        DELIVERIES.labels("bad_signature").inc()
        _BAD_SIGNATURE()
        raise Refused(_json(401, error="missing or wrong X-Hub-Signature-256"))


def _parse(body: bytes) -> parse.Delivery:
    """The delivery's events (400 for a body that is not one); what cannot be used is said."""
    try:
        delivery = parse.parse(body)
    except (ValueError, parse.NotADelivery) as exc:
        DELIVERIES.labels("bad_json").inc()
        raise Refused(_json(400, error=f"not a webhook delivery: {exc}")) from None
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
    return delivery


async def _store(
    st: GatewayState, delivery: parse.Delivery, cid: str, span: trace.Span
) -> state_pb2.IngestResponse:
    """The delivery, durably stored by the state service (503 when it cannot be now)."""
    if span.is_recording():
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
        messages=[wire.message_to_proto(m) for m in delivery.messages],
        statuses=[wire.status_to_proto(s) for s in delivery.statuses],
        events=[wire.event_to_proto(e) for e in delivery.events],
    )
    try:
        # Statuses and nothing else may wait for company (batcher.py): no customer waits on
        # them. A message, or a customer event that later messages may depend on, goes at once.
        return await st.batcher.submit(
            request_pb,
            urgent=bool(delivery.messages or delivery.events or not delivery.statuses),
        )
    except QueueFull as exc:
        DELIVERIES.labels("queue_full").inc()
        _QUEUE_FULL(error=str(exc))
        raise Refused(
            _json(
                503,
                headers={"Retry-After": str(st.settings.retry_after_seconds)},
                error="too many deliveries waiting to be stored; retry later",
            )
        ) from None
    except IngestError as exc:
        DELIVERIES.labels("unavailable").inc()
        _NOT_STORED(error=str(exc))
        raise Refused(_json(503, error="cannot store the delivery durably; retry later")) from None


def _answer(
    delivery: parse.Delivery,
    resp: state_pb2.IngestResponse,
    cid: str,
    span: trace.Span,
    started: float,
) -> Response:
    """200, with what was stored and what was a duplicate."""
    duplicates = sum(1 for r in resp.results if r.duplicate)
    stored = len(resp.results) - duplicates + resp.statuses_stored + resp.events_stored
    if span.is_recording():
        # The group-committed batch (State.Ingests) serves many traces and has no span of its own:
        # this span's duration includes it, and says what it stored.
        span.set_attributes({"wa.stored": stored, "wa.duplicates": duplicates})
    STORED.inc()
    if delivery.messages:
        MESSAGES.inc(len(delivery.messages))
    if delivery.statuses:
        STATUSES.inc(len(delivery.statuses))
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
    names = wire.MESSAGE_STATUS
    return _json(
        200,
        status="ok",
        stored=stored,
        duplicates=duplicates,
        correlation_id=cid,
        messages=[
            {"id": r.message_id, "status": names[r.status] or "duplicate"} for r in resp.results
        ],
    )


async def healthz(request: Request) -> Response:
    return _json(200, status="ok")


# `/readyz?for=ingest`: what a delivery's acknowledgement needs, the state service and the
# PostgreSQL it stores in. What routes Meta's deliveries to a gateway (a load balancer's or
# Kubernetes' readiness) asks this: a gateway that can store a delivery durably takes it while
# the agent, the dlq or Redis is down (its turn waits, nothing is lost); with `/readyz`, one of
# those down would take every gateway out of service at once.
READY_FOR = {"ingest": frozenset({"state", "postgres"})}


async def readyz(request: Request) -> Response:
    """The last background check's result (services/gateway/readiness.py), never a new one."""
    st: GatewayState = request.app.state.gw
    scope = request.query_params.get("for")
    if scope is not None and scope not in READY_FOR:
        return _json(400, error=f"for= takes one of {sorted(READY_FOR)}")
    ready, body = st.readiness.answer(READY_FOR[scope] if scope is not None else None)
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(
        prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )


def create_app(settings: GatewaySettings) -> Starlette:
    secrets = settings.app_secrets()
    if not settings.skip_signature and not secrets:
        raise config.ConfigError(
            "WHATSAPP_APP_SECRET is not set (WHATSAPP_SKIP_SIGNATURE=true only for development)"
        )
    if settings.skip_signature:
        log.critical(
            "WHATSAPP_SKIP_SIGNATURE=true: deliveries are NOT authenticated; anyone who reaches "
            "this port can inject messages. For development only, never in production."
        )
    elif len(secrets) > 1:
        log.warning(
            "WHATSAPP_APP_SECRET holds %d secrets: deliveries signed with either are accepted "
            "(remove the old one once the rotation is done)",
            len(secrets),
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # Untraced: each delivery's trace context travels in its IngestRequest.
            channel = await stack.enter_async_context(
                grpcserver.channel(settings.state_addr, traced=False)
            )
            stub = state_pb2_grpc.StateStub(channel)
            batcher = IngestBatcher(
                stub,
                timeout=INGEST_TIMEOUT,
                max_queued=settings.queue_max_deliveries,
                max_queued_bytes=settings.queue_max_bytes,
                linger_seconds=settings.status_linger_seconds,
            )
            readiness = Readiness(settings, stub, settings.ready_refresh_seconds)
            readiness.start()
            stack.push_async_callback(readiness.close)
            app.state.gw = GatewayState(
                settings=settings,
                state=stub,
                batcher=batcher,
                readiness=readiness,
                secrets=secrets,
            )
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
