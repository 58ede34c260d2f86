"""The state service's gRPC adapter: requests in, domain calls, domain errors to status codes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
from wa.v1 import common_pb2, state_pb2, state_pb2_grpc

from common import config, db, grpcserver, kv, logs, migrate, telemetry

from . import machine, metrics, store
from .clients import GrpcAgent, GrpcDlq
from .dispatcher import Dispatcher
from .locks import Locks
from .sweeper import Sweeper

log = logging.getLogger(__name__)


def _inbound(m: common_pb2.InboundMessage) -> store.Inbound:
    message_id, reason = m.message_id, m.skip_reason
    if not message_id:
        # The gateway names every message; a caller that did not still loses nothing.
        digest = hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()
        message_id, reason = f"invalid:{digest}", reason or "message without an id"
    if not 0 <= m.timestamp <= store.MAX_TIMESTAMP and not reason:
        reason = "timestamp is not a time in seconds between 1970 and 9999"
    return store.Inbound(
        message_id=message_id,
        phone_number_id=m.phone_number_id,
        wa_id=m.wa_id,
        contact_name=m.contact_name,
        type=m.type or "unknown",
        timestamp=m.timestamp,
        text=m.text,
        payload_json=m.payload_json,
        skip_reason=reason,
        user_id=m.user_id,
        parent_user_id=m.parent_user_id,
        username=m.username,
    )


def _delivery_in(request: state_pb2.IngestRequest) -> store.DeliveryIn:
    return store.DeliveryIn(
        messages=[_inbound(m) for m in request.messages],
        statuses=[
            store.Status(
                message_id=s.message_id,
                phone_number_id=s.phone_number_id,
                recipient_id=s.recipient_id,
                status=s.status,
                timestamp=s.timestamp,
                payload_json=s.payload_json,
                error_code=s.error_code,
                callback_data=s.callback_data,
                recipient_user_id=s.recipient_user_id,
            )
            for s in request.statuses
            if s.message_id
        ],
        correlation_id=request.correlation_id,
        traceparent=request.traceparent,
        events=[
            store.Event(
                event_id=e.event_id,
                phone_number_id=e.phone_number_id,
                kind=e.kind,
                wa_id=e.wa_id,
                user_id=e.user_id,
                previous_user_id=e.previous_user_id,
                parent_user_id=e.parent_user_id,
                timestamp=e.timestamp,
                payload_json=e.payload_json,
                preference_category=e.preference_category,
                preference_value=e.preference_value,
            )
            for e in request.events
            if e.event_id and e.kind in ("user_id_update", "user_preferences")
        ],
    )


def _iso(value: object) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else ""


class StateServicer(state_pb2_grpc.StateServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        locks: Locks,
        dispatcher: Dispatcher | None,
    ) -> None:
        self.pool = pool
        self.locks = locks
        self.dispatcher = dispatcher

    async def Ingest(
        self, request: state_pb2.IngestRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.IngestResponse:
        (answer,) = await self._ingest([request])
        if answer.error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, answer.error)
        return answer

    async def IngestBatch(
        self, request: state_pb2.IngestBatchRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.IngestBatchResponse:
        return state_pb2.IngestBatchResponse(deliveries=await self._ingest(request.deliveries))

    async def _ingest(
        self, requests: Sequence[state_pb2.IngestRequest]
    ) -> list[state_pb2.IngestResponse]:
        deliveries = [_delivery_in(r) for r in requests]
        if deliveries:
            # Log lines about the batch carry its first delivery's correlation id.
            logs.correlation_id.set(deliveries[0].correlation_id)
        try:
            # A value PostgreSQL refuses costs its own message only (stored as a skipped
            # placeholder); an error here means nothing can be stored now (a 503: Meta retries).
            outs = await store.ingest_isolating(self.pool, deliveries)
        except store.PROBLEMS as exc:
            log.error("ingest failed: %s", store.describe(exc))
            error = f"cannot store: {store.describe(exc)}"
            return [state_pb2.IngestResponse(error=error)] * len(requests)
        answers = []
        for out in outs:
            if isinstance(out, str):
                answers.append(state_pb2.IngestResponse(error=out))
                continue
            for r in out.results:
                metrics.INGESTED.labels("duplicate" if r.duplicate else r.status).inc()
                if r.status == machine.RECEIVED and self.dispatcher is not None:
                    self.dispatcher.notify(r.conversation_id)
            answers.append(
                state_pb2.IngestResponse(
                    results=[
                        state_pb2.IngestResult(
                            message_id=r.message_id,
                            duplicate=r.duplicate,
                            status=r.status,
                            conversation_id=r.conversation_id,
                        )
                        for r in out.results
                    ],
                    statuses_stored=out.statuses_stored,
                    events_stored=out.events_stored,
                )
            )
        return answers

    async def ClaimNext(
        self, request: state_pb2.ClaimNextRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.ClaimNextResponse:
        """For external drivers; the built-in dispatcher uses the same domain calls."""
        lease = await self.locks.acquire(request.conversation_id)
        if lease is None:
            return state_pb2.ClaimNextResponse(claimed=False)
        try:
            token = await store.claim_conversation(
                self.pool, request.conversation_id, request.owner or lease.owner
            )
            item = await store.next_message(self.pool, request.conversation_id, token)
        except store.UnknownMessage as exc:
            await self.locks.release(lease)
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        if item is None:
            await store.release_conversation(self.pool, request.conversation_id, token)
            await self.locks.release(lease)
            return state_pb2.ClaimNextResponse(claimed=True, fence_token=token)
        return state_pb2.ClaimNextResponse(
            claimed=True,
            fence_token=token,
            item=state_pb2.WorkItem(
                id=item.id,
                message_id=item.message_id,
                conversation_id=item.conversation_id,
                phone_number_id=item.phone_number_id,
                wa_id=item.wa_id,
                type=item.type,
                text=item.text,
                timestamp=item.timestamp,
                correlation_id=item.correlation_id,
                traceparent=item.traceparent,
                attempts=item.attempts,
                contact_name=item.contact_name,
            ),
        )

    async def _transition(
        self,
        context: grpc.aio.ServicerContext,
        message_id: str,
        to_state: str,
        reason: str,
        token: int | None,
        correlation_id: str,
    ) -> str:
        if to_state not in machine.MESSAGE_STATES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown state {to_state!r}")
        try:
            return await store.transition(
                self.pool,
                message_id,
                to_state,
                reason,
                token=token,
                correlation_id=correlation_id,
            )
        except store.UnknownMessage:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no message {message_id}")
        except store.StaleFence as exc:
            metrics.STALE_WRITES.inc()
            log.warning("refused a stale write: %s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"stale fencing token: {exc}")
        except machine.IllegalTransition as exc:
            log.warning("refused an illegal transition: %s", exc, extra={"message_id": message_id})
            await store.record_illegal(self.pool, message_id, exc, correlation_id)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError("unreachable")

    async def CompleteTurn(
        self, request: state_pb2.CompleteTurnRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.CompleteTurnResponse:
        outcomes = {
            "replied": machine.REPLIED,
            "skipped": machine.SKIPPED,
            "failed": machine.FAILED,
        }
        if request.outcome not in outcomes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "outcome: replied|skipped|failed")
        await self._transition(
            context,
            request.message_id,
            outcomes[request.outcome],
            request.reason or request.outcome,
            request.fence_token,
            request.correlation_id,
        )
        return state_pb2.CompleteTurnResponse(status=outcomes[request.outcome])

    async def Transition(
        self, request: state_pb2.TransitionRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.TransitionResponse:
        from_state = await self._transition(
            context,
            request.message_id,
            request.to_state,
            request.reason or "operator",
            request.fence_token or None,
            request.correlation_id,
        )
        return state_pb2.TransitionResponse(from_state=from_state, to_state=request.to_state)

    async def Redrive(
        self, request: state_pb2.RedriveRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.RedriveResponse:
        if request.correlation_id:
            logs.correlation_id.set(request.correlation_id)
        try:
            await store.transition(
                self.pool,
                request.message_id,
                machine.RECEIVED,
                machine.OPERATOR_REDRIVE
                if request.operator
                else request.reason or "redriven from the dead-letter queue",
                correlation_id=request.correlation_id,
            )
        except store.UnknownMessage:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no message {request.message_id}")
        except machine.IllegalTransition as exc:
            # Already replied/skipped (or waiting): a redrive never causes a second turn.
            current = exc.from_state or ""
            return state_pb2.RedriveResponse(status=current, accepted=False)
        conv = await self.pool.fetchval(store.Q["conversation_of_message"], request.message_id)
        if self.dispatcher is not None and conv is not None:
            self.dispatcher.notify(int(conv))
        return state_pb2.RedriveResponse(status=machine.RECEIVED, accepted=True)

    async def GetTimeline(
        self, request: state_pb2.GetTimelineRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetTimelineResponse:
        try:
            tl = await store.timeline(
                self.pool, request.message_id, request.wa_id, request.limit or 20
            )
        except store.UnknownMessage:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such message or phone")
        return state_pb2.GetTimelineResponse(
            messages=[
                state_pb2.TimelineMessage(
                    message_id=m["message_id"],
                    type=m["message_type"],
                    status=m["status"],
                    status_reason=m["status_reason"] or "",
                    text=m["body"] or "",
                    reply_text=m["reply_text"] or "",
                    reply_message_id=m["reply_message_id"] or "",
                    reply_status=m["reply_status"] or "",
                    correlation_id=m["correlation_id"],
                    trace_id=telemetry.trace_id_of(m["traceparent"]),
                    received_at=_iso(m["received_at"]),
                    conversation_id=m["conversation_id"],
                    attempts=m["attempts"],
                    reply_error_code=m["reply_error_code"] or "",
                    reply_parts=m["reply_parts"] or 0,
                    reply_parts_failed=m["reply_parts_failed"] or 0,
                )
                for m in tl.messages
            ],
            transitions=[
                state_pb2.TimelineTransition(
                    message_id=t["message_id"] or "",
                    entity=t["entity"],
                    from_state=t["from_state"] or "",
                    to_state=t["to_state"],
                    reason=t["reason"],
                    correlation_id=t["correlation_id"],
                    at=_iso(t["created_at"]),
                )
                for t in tl.transitions
            ],
            **{k: v or "" for k, v in (dict(tl.customer) if tl.customer else {}).items()},
        )

    async def GetStats(
        self, request: state_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetStatsResponse:
        hours = request.hours or 1.0
        if hours <= 0 or hours > 24 * 90:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hours must be in (0, 2160]")
        row = await self.pool.fetchrow(store.Q["performance_stats"], hours)
        assert row is not None
        return state_pb2.GetStatsResponse(
            hours=hours,
            total=row["total"] or 0,
            replied=row["replied"] or 0,
            skipped=row["skipped"] or 0,
            failed=row["failed"] or 0,
            dead_lettered=row["dead_lettered"] or 0,
            in_flight=row["in_flight"] or 0,
            avg_ms=float(row["avg_ms"] or 0),
            p95_ms=float(row["p95_ms"] or 0),
            p99_ms=float(row["p99_ms"] or 0),
            delivery_failed=row["delivery_failed"] or 0,
        )

    async def GetSystemHealth(
        self, request: state_pb2.GetSystemHealthRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetSystemHealthResponse:
        rows = await self.pool.fetch(store.Q["system_health"])
        return state_pb2.GetSystemHealthResponse(
            checks=[
                state_pb2.HealthCheck(
                    name=r["check_name"],
                    status=r["status"],
                    value=float(r["value"] or 0),
                    detail=r["detail"] or "",
                )
                for r in rows
            ]
        )

    async def CheckDependencies(
        self, request: state_pb2.CheckDependenciesRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.CheckDependenciesResponse:
        components = []
        try:
            await db.ping(self.pool)
            components.append(common_pb2.Component(name="postgres", healthy=True, detail="ok"))
        except Exception as exc:
            components.append(
                common_pb2.Component(name="postgres", healthy=False, detail=f"{exc!r}"[:200])
            )
        try:
            await asyncio.wait_for(self.locks.ping(), 2.0)
            detail = "ok" if self.dispatcher is not None else "ok (processing is switched off)"
            components.append(common_pb2.Component(name="redis", healthy=True, detail=detail))
        except Exception as exc:
            components.append(
                common_pb2.Component(
                    name="redis",
                    healthy=False,
                    detail=f"processing paused until Redis answers: {exc!r}"[:200],
                )
            )
        return state_pb2.CheckDependenciesResponse(components=components)


@contextlib.asynccontextmanager
async def setup(
    server: grpc.aio.Server, settings: config.StateSettings
) -> AsyncIterator[list[str]]:
    # `make run` and compose's job migrate first; a state service started on its own does it
    # too (the runner's advisory lock makes concurrent starters safe).
    with telemetry.untraced():
        await migrate.migrate(settings.require_database())
    pool = await db.create_pool(settings.require_database(), max_size=20)
    with telemetry.untraced():  # start-up housekeeping, part of no message's trace
        await store.record_stuck_timeout(pool, settings.stuck_timeout_seconds)
    redis = kv.create_client(settings.require_redis())
    locks = Locks(redis, settings.lock_ttl_seconds, prefix=settings.redis_prefix)
    background: list[asyncio.Task[None]] = []
    dispatcher: Dispatcher | None = None
    sweeper: Sweeper | None = None
    async with (
        grpcserver.channel(settings.agent_addr) as agent_ch,
        grpcserver.channel(settings.dlq_addr) as dlq_ch,
    ):
        dlq = GrpcDlq(dlq_ch)
        if settings.enhanced_processing:
            # The one deadline of a turn, end to end: sent as the gRPC deadline, the agent
            # bounds its model and Graph API calls, their retries and waits by it, and sends
            # nothing past it. Shorter than the stuck timeout, so the sweeper never takes over
            # a turn that is still running (and no two turns of one message overlap).
            turn_timeout = turn_deadline_seconds(settings)
            dispatcher = Dispatcher(
                pool,
                locks,
                GrpcAgent(agent_ch, turn_timeout),
                dlq,
                max_concurrent=settings.max_concurrent_conversations,
            )
            sweeper = Sweeper(
                pool, locks, dispatcher, dlq, stuck_timeout=settings.stuck_timeout_seconds
            )
            background.append(asyncio.create_task(sweeper.run(), name="sweeper"))
            background.append(asyncio.create_task(_resume_all(pool, dispatcher), name="resume"))
        else:
            log.warning("WA_ENHANCED_PROCESSING=false: ingest and acknowledge only")
        state_pb2_grpc.add_StateServicer_to_server(StateServicer(pool, locks, dispatcher), server)
        try:
            yield [state_pb2.DESCRIPTOR.services_by_name["State"].full_name]
        finally:
            if sweeper is not None:
                sweeper.stop()
            if dispatcher is not None:
                await dispatcher.close()
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await redis.aclose()
            await pool.close()


def turn_deadline_seconds(settings: config.TurnLimits) -> float:
    """Long enough for the model's retries and the Graph API's, but always ending well before
    the sweeper would consider the turn stuck (STUCK_TIMEOUT_SECONDS)."""
    wanted = (
        (settings.model_timeout_seconds + 2) * (settings.agent_max_retries + 1)
        + (settings.graph_timeout_seconds + 2) * (settings.graph_max_retries + 1)
        + settings.send_confirm_seconds
    )
    stuck = settings.stuck_timeout_seconds
    return max(0.5, min(wanted, stuck - max(2.0, stuck * 0.2)))


async def _resume_all(pool: asyncpg.Pool, dispatcher: Dispatcher) -> None:
    """At start-up, everything acknowledged and unfinished is driven again (after a crash, or
    after processing was switched back on)."""
    delay = 0.5
    while True:
        try:
            with telemetry.untraced():  # housekeeping, like the sweeper's
                conversations = await store.all_waiting_conversations(pool)
            break
        except Exception as exc:
            log.warning("cannot list waiting work yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    if conversations:
        log.info("resuming acknowledged work", extra={"conversations": len(conversations)})
    for conv in conversations:
        dispatcher.notify(conv)
